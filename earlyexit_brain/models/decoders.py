"""Attention-decoder (AED) exits: one Transformer decoder per encoder exit.

Each exit ``k`` of an early-exit encoder feeds its own decoder (SpeechBrain's
``TransformerDecoder`` layers, a token embedding, sinusoidal positions and an
output layer), trained jointly with that exit's CTC head (see
:class:`earlyexit_brain.brain.EarlyExitSeq2SeqBrain`). At inference only the
decoder of the exit an utterance stops at runs:
:func:`earlyexit_brain.decoding.attention.make_aed_searcher` builds SpeechBrain's
joint CTC/attention beam search for one exit.
"""

from typing import List, Optional, Sequence, Tuple

import torch
from speechbrain.dataio.dataio import length_to_mask
from speechbrain.lobes.models.transformer.Transformer import (
    NormalizedEmbedding,
    PositionalEncoding,
    TransformerDecoder,
    get_lookahead_mask,
)
from speechbrain.nnet.linear import Linear
from torch import nn


class ExitDecoder(nn.Module):
    """The decoder of one exit, with the ``decode(tgt, memory, memory_lens)`` method that
    SpeechBrain's ``S2STransformerBeamSearcher`` calls on its model.

    ``embedding`` may be shared between exits (the same module object).
    """

    def __init__(
        self, embedding: nn.Module, d_model: int, num_layers: int, nhead: int, d_ffn: int, dropout: float, max_len: int
    ):
        super().__init__()
        self.embedding = embedding
        self.positions = PositionalEncoding(d_model, max_len=max_len)
        self.decoder = TransformerDecoder(
            num_layers=num_layers,
            nhead=nhead,
            d_ffn=d_ffn,
            d_model=d_model,
            dropout=dropout,
            normalize_before=True,
            causal=True,
        )
        self.d_model = d_model

    def decode(
        self, tgt: torch.Tensor, memory: torch.Tensor, memory_lens: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decoder states ``(B, U, D)`` and the last layer's cross-attention.

        ``tgt``: ``(B, U)`` token ids starting with bos; ``memory``: the exit's
        encoder states ``(B, T, D)``; ``memory_lens``: absolute frame counts.
        """
        if memory.shape[-1] != self.d_model:
            raise ValueError(
                f"decoder_d_model: the decoder has d_model {self.d_model} but the "
                f"encoder exit gives {memory.shape[-1]} features; set "
                f"decoder_d_model to the encoder's d_model"
            )
        key_padding = None
        if memory_lens is not None:
            key_padding = ~length_to_mask(memory_lens, max_len=memory.shape[1]).bool()
        x = self.embedding(tgt)
        x = x + self.positions(x)
        out, _, cross = self.decoder(x, memory, tgt_mask=get_lookahead_mask(tgt), memory_key_padding_mask=key_padding)
        return out, cross[-1]


class ExitDecoders(nn.Module):
    """One Transformer decoder per exit.

    Arguments
    ---------
    d_model : int
        Width of the decoder; must equal the encoder's ``d_model``.
    vocab_size : int
        Output tokens (the CTC heads' vocabulary, bos/eos included).
    num_exits : int
        Number of encoder exits, one decoder each.
    num_layers, nhead, d_ffn, dropout :
        Each decoder's Transformer layers (the paper: 4 layers).
    share_embedding : bool
        One token embedding for every exit's decoder instead of one each.
    max_len : int
        Longest token sequence the positional encoding covers.

    Example
    -------
    >>> dec = ExitDecoders(d_model=16, vocab_size=10, num_exits=2, num_layers=1, nhead=2, d_ffn=32)
    >>> mem = [torch.randn(3, 7, 16), torch.randn(3, 7, 16)]
    >>> out = dec(mem, torch.ones(3), torch.randint(0, 10, (3, 5)))
    >>> [o.shape for o in out]
    [torch.Size([3, 5, 10]), torch.Size([3, 5, 10])]
    """

    def __init__(
        self,
        d_model: int,
        vocab_size: int,
        num_exits: int,
        num_layers: int = 4,
        nhead: int = 4,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        share_embedding: bool = False,
        max_len: int = 2500,
    ):
        super().__init__()
        if d_model % nhead != 0:
            raise ValueError(f"decoder_nhead: {nhead} heads do not divide decoder_d_model {d_model}")
        if num_layers < 1:
            raise ValueError(f"decoder_layers: must be >= 1, got {num_layers}")
        self.config = dict(
            d_model=d_model,
            vocab_size=vocab_size,
            num_exits=num_exits,
            num_layers=num_layers,
            nhead=nhead,
            d_ffn=d_ffn,
            dropout=dropout,
            share_embedding=share_embedding,
            max_len=max_len,
        )
        shared = NormalizedEmbedding(d_model, vocab_size) if share_embedding else None
        self.decoders = nn.ModuleList(
            [
                ExitDecoder(
                    shared if shared is not None else NormalizedEmbedding(d_model, vocab_size),
                    d_model,
                    num_layers,
                    nhead,
                    d_ffn,
                    dropout,
                    max_len,
                )
                for _ in range(num_exits)
            ]
        )
        # SpeechBrain's Linear: its beam searcher reads the vocabulary size from ``fc.w``
        self.out = nn.ModuleList([Linear(input_size=d_model, n_neurons=vocab_size) for _ in range(num_exits)])

    @property
    def num_exits(self) -> int:
        return len(self.decoders)

    def forward_exit(
        self, exit_index: int, memory: torch.Tensor, memory_rel_lens: torch.Tensor, tokens_bos: torch.Tensor
    ) -> torch.Tensor:
        """Teacher-forced log-probabilities ``(B, U, V)`` of one exit's decoder."""
        lens = torch.round(memory_rel_lens * memory.shape[1]).long()
        hidden, _ = self.decoders[exit_index].decode(tokens_bos, memory, lens)
        return torch.log_softmax(self.out[exit_index](hidden), dim=-1)

    def forward(
        self, memories: Sequence[torch.Tensor], memory_rel_lens: torch.Tensor, tokens_bos: torch.Tensor
    ) -> List[torch.Tensor]:
        """Teacher-forced log-probabilities for every exit."""
        return [self.forward_exit(k, m, memory_rel_lens, tokens_bos) for k, m in enumerate(memories)]

    def params_of_exit(self, exit_index: int) -> int:
        """Parameters used by one exit's decoder (a shared embedding counted once)."""
        params = {id(p): p for p in self.decoders[exit_index].parameters()}
        params.update({id(p): p for p in self.out[exit_index].parameters()})
        return sum(p.numel() for p in params.values())


def add_bos_eos(tokens: torch.Tensor, rel_lens: torch.Tensor, bos_index: int, eos_index: int):
    """Teacher-forcing input and target from padded tokens ``(B, U)``.

    Returns ``tokens_bos`` ``(B, U + 1)`` (bos then the tokens), ``tokens_eos``
    ``(B, U + 1)`` (the tokens then eos, padded with 0 after it) and the
    targets' relative lengths (eos included), as SpeechBrain's ``nll_loss``
    takes them.

    Example
    -------
    >>> bos, eos, lens = add_bos_eos(torch.tensor([[5, 6], [7, 0]]), torch.tensor([1.0, 0.5]), 1, 2)
    >>> bos.tolist(), eos.tolist(), [round(x, 4) for x in lens.tolist()]
    ([[1, 5, 6], [1, 7, 0]], [[5, 6, 2], [7, 2, 0]], [1.0, 0.6667])
    """
    batch, max_len = tokens.shape
    abs_lens = torch.round(rel_lens * max_len).long()
    bos = torch.full((batch, 1), bos_index, dtype=tokens.dtype, device=tokens.device)
    tokens_bos = torch.cat([bos, tokens], dim=1)
    keep = length_to_mask(abs_lens, max_len=max_len + 1).bool()
    tokens_eos = torch.cat([tokens, torch.zeros_like(bos)], dim=1) * keep
    tokens_eos[torch.arange(batch, device=tokens.device), abs_lens.to(tokens.device)] = eos_index
    tokens_bos = tokens_bos * length_to_mask(abs_lens + 1, max_len=max_len + 1).to(tokens.dtype)
    eos_lens = (abs_lens + 1).to(rel_lens.dtype) / (max_len + 1)
    return tokens_bos, tokens_eos, eos_lens
