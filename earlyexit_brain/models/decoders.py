"""Attention-decoder (AED) exits: one Transformer decoder per encoder exit.

Each exit ``k`` of an early-exit encoder feeds its own decoder (SpeechBrain's
``TransformerDecoder`` layers, a token embedding, sinusoidal positions and an
output layer), trained jointly with that exit's CTC head (see
:class:`earlyexit_brain.brain.EarlyExitSeq2SeqBrain`). At inference only the
decoder of the exit an utterance stops at runs: :func:`make_aed_searcher`
builds SpeechBrain's joint CTC/attention beam search for one exit.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from speechbrain.lobes.models.transformer.Transformer import (NormalizedEmbedding,
                                                               PositionalEncoding,
                                                               TransformerDecoder,
                                                               get_lookahead_mask)
from speechbrain.dataio.dataio import length_to_mask
from speechbrain.nnet.linear import Linear
from torch import nn


class ExitDecoder(nn.Module):
    """The decoder of one exit, with the ``decode(tgt, memory, memory_lens)`` method that
    SpeechBrain's ``S2STransformerBeamSearcher`` calls on its model.

    ``embedding`` may be shared between exits (the same module object).
    """

    def __init__(self, embedding: nn.Module, d_model: int, num_layers: int, nhead: int,
                 d_ffn: int, dropout: float, max_len: int):
        super().__init__()
        self.embedding = embedding
        self.positions = PositionalEncoding(d_model, max_len=max_len)
        self.decoder = TransformerDecoder(num_layers=num_layers, nhead=nhead, d_ffn=d_ffn,
                                          d_model=d_model, dropout=dropout, normalize_before=True,
                                          causal=True)
        self.d_model = d_model

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor,
               memory_lens: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decoder states ``(B, U, D)`` and the last layer's cross-attention.

        ``tgt``: ``(B, U)`` token ids starting with bos; ``memory``: the exit's
        encoder states ``(B, T, D)``; ``memory_lens``: absolute frame counts.
        """
        if memory.shape[-1] != self.d_model:
            raise ValueError(f"decoder_d_model: the decoder has d_model {self.d_model} but the "
                             f"encoder exit gives {memory.shape[-1]} features; set "
                             f"decoder_d_model to the encoder's d_model")
        key_padding = None
        if memory_lens is not None:
            key_padding = ~length_to_mask(memory_lens, max_len=memory.shape[1]).bool()
        x = self.embedding(tgt)
        x = x + self.positions(x)
        out, _, cross = self.decoder(x, memory, tgt_mask=get_lookahead_mask(tgt),
                                     memory_key_padding_mask=key_padding)
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

    def __init__(self, d_model: int, vocab_size: int, num_exits: int, num_layers: int = 4,
                 nhead: int = 4, d_ffn: int = 1024, dropout: float = 0.1,
                 share_embedding: bool = False, max_len: int = 2500):
        super().__init__()
        if d_model % nhead != 0:
            raise ValueError(f"decoder_nhead: {nhead} heads do not divide decoder_d_model {d_model}")
        if num_layers < 1:
            raise ValueError(f"decoder_layers: must be >= 1, got {num_layers}")
        self.config = dict(d_model=d_model, vocab_size=vocab_size, num_exits=num_exits,
                           num_layers=num_layers, nhead=nhead, d_ffn=d_ffn, dropout=dropout,
                           share_embedding=share_embedding, max_len=max_len)
        shared = NormalizedEmbedding(d_model, vocab_size) if share_embedding else None
        self.decoders = nn.ModuleList([
            ExitDecoder(shared if shared is not None else NormalizedEmbedding(d_model, vocab_size),
                        d_model, num_layers, nhead, d_ffn, dropout, max_len)
            for _ in range(num_exits)])
        # SpeechBrain's Linear: its beam searcher reads the vocabulary size from ``fc.w``
        self.out = nn.ModuleList([Linear(input_size=d_model, n_neurons=vocab_size)
                                  for _ in range(num_exits)])

    @property
    def num_exits(self) -> int:
        return len(self.decoders)

    def forward_exit(self, exit_index: int, memory: torch.Tensor, memory_rel_lens: torch.Tensor,
                     tokens_bos: torch.Tensor) -> torch.Tensor:
        """Teacher-forced log-probabilities ``(B, U, V)`` of one exit's decoder."""
        lens = torch.round(memory_rel_lens * memory.shape[1]).long()
        hidden, _ = self.decoders[exit_index].decode(tokens_bos, memory, lens)
        return torch.log_softmax(self.out[exit_index](hidden), dim=-1)

    def forward(self, memories: Sequence[torch.Tensor], memory_rel_lens: torch.Tensor,
                tokens_bos: torch.Tensor) -> List[torch.Tensor]:
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
    >>> bos.tolist(), eos.tolist(), lens.tolist()
    ([[1, 5, 6], [1, 7, 0]], [[5, 6, 2], [7, 2, 0]], [1.0, 0.6666666865348206])
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


class _ExitLogits(nn.Module):
    """Exit ``k``'s CTC output layer as the ``ctc_fc`` module SpeechBrain's ``CTCScorer`` calls."""

    def __init__(self, heads, exit_index: int):
        super().__init__()
        self.heads, self.exit_index = heads, exit_index

    def forward(self, hidden):
        return self.heads.forward_exit(self.exit_index, hidden)


def make_aed_searcher(decoders: ExitDecoders, ctc_heads, exit_index: int, bos_index: int,
                      eos_index: int, blank_index: int = 0, beam_size: int = 10,
                      ctc_weight: float = 0.4, length_normalization: bool = True,
                      length_reward: float = 0.0, max_decode_ratio: float = 1.0,
                      topk: int = 1, lm_path: Optional[str] = None, lm_weight: float = 0.0,
                      pieces: Optional[Sequence[str]] = None, lm_word_bonus: float = 0.0,
                      lm_oov_penalty: float = 10.0):
    """SpeechBrain's joint CTC/attention beam search over one exit's decoder and CTC head.

    ``ctc_weight`` in [0, 1] weighs the CTC prefix score against the decoder's
    (0: attention only); ``length_reward`` adds a per-token bonus (SpeechBrain's
    ``LengthScorer``; it cannot be combined with ``length_normalization``).
    ``lm_weight`` > 0 fuses the word n-gram ``lm_path`` into the search
    (:class:`~earlyexit_brain.ngram.WordNgramScorer` over the tokenizer's ``pieces``),
    with ``lm_word_bonus`` per word and ``lm_oov_penalty`` for a partial word that no
    word of the n-gram starts with.
    """
    from speechbrain.decoders import CTCScorer, S2STransformerBeamSearcher
    from speechbrain.decoders.scorer import LengthScorer

    from ..ngram import scorer_builder

    check_search_options(beam_size, ctc_weight)
    full, weights = [], {}
    if ctc_weight > 0:
        full.append(CTCScorer(ctc_fc=_ExitLogits(ctc_heads, exit_index), blank_index=blank_index,
                              eos_index=eos_index))
        weights["ctc"] = ctc_weight
    if length_reward:
        if length_normalization:
            raise ValueError("aed_length_reward: cannot be combined with aed_length_normalization; "
                             "set one of them off")
        full.append(LengthScorer(vocab_size=decoders.config["vocab_size"]))
        weights["length"] = length_reward
    if lm_weight:
        from ..ngram import WordNgramScorer

        if lm_path is None or pieces is None:
            raise ValueError("aed_lm_weight: fusing a word n-gram needs the n-gram (ctc_lm_path or "
                             "ngram_order) and the tokenizer's pieces")
        full.append(WordNgramScorer(lm_path, pieces, decoders.config["vocab_size"], eos_index,
                                    lm_weight, lm_word_bonus, lm_oov_penalty))
        weights["wordngram"] = 1.0
    scorer = scorer_builder(full_scorers=full, weights=weights) if full else None
    return S2STransformerBeamSearcher(
        modules=[decoders.decoders[exit_index], decoders.out[exit_index]],
        bos_index=bos_index, eos_index=eos_index, min_decode_ratio=0.0,
        max_decode_ratio=max_decode_ratio, beam_size=beam_size, scorer=scorer,
        length_normalization=length_normalization, using_eos_threshold=False,
        return_topk=topk > 1, topk=topk)


# the fused word n-gram's keys (``aed_`` + the search option) and their defaults: not fused
AED_LM_DEFAULTS = {"aed_lm_weight": 0.0, "aed_lm_word_bonus": 0.0, "aed_lm_oov_penalty": 10.0}


def aed_search_options(get) -> Dict:
    """:func:`make_aed_searcher`'s options from a recipe's hparams, with their defaults.

    ``get(key, default)`` reads one hyperparameter (``dict.get`` of a loaded
    YAML, or ``getattr`` on a Brain's ``hparams``).
    """
    return dict(bos_index=int(get("bos_index", None)), eos_index=int(get("eos_index", None)),
                blank_index=int(get("blank_index", 0)), beam_size=int(get("beam_size", 10)),
                ctc_weight=float(get("decode_ctc_weight", 0.4)),
                length_normalization=bool(get("aed_length_normalization", True)),
                length_reward=float(get("aed_length_reward", 0.0)),
                max_decode_ratio=float(get("max_decode_ratio", 1.0)),
                **{key[4:]: float(get(key, default)) for key, default in AED_LM_DEFAULTS.items()})


def check_search_options(beam_size: int, ctc_weight: float):
    """Raise a ValueError naming the key for a beam size below 1 or a CTC weight outside [0, 1]."""
    if not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size: must be an integer >= 1, got {beam_size!r}")
    if not 0.0 <= float(ctc_weight) <= 1.0:
        raise ValueError(f"ctc_weight: must be in [0, 1], got {ctc_weight!r}")
