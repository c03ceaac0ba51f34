"""The attention-decoder (AED) exits' joint CTC/attention beam search.

:func:`make_aed_searcher` builds SpeechBrain's joint CTC/attention beam search
over one exit's decoder and CTC head, stepping the decoder one token at a time
(:class:`CachedTransformerBeamSearcher`: cached self-attention keys/values and
encoder-state projections, the same hypotheses as SpeechBrain's searcher), with
the word n-gram fused in when ``lm_weight`` > 0. :func:`decode_exit` and
:func:`decode_states` decode one exit's encoder states with an
:class:`~earlyexit_brain.models.pipeline.EarlyExitAEDModel`'s searcher for that
exit (built once per model and exit).
"""

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from speechbrain.dataio.dataio import length_to_mask
from speechbrain.decoders.seq2seq import S2STransformerBeamSearcher
from torch import nn

from ..models.decoders import ExitDecoders
from ..options import Options, is_int, is_num, option
from .ngram import WordNgramScorer, scorer_builder


class _ExitLogits(nn.Module):
    """Exit ``k``'s CTC output layer as the ``ctc_fc`` module SpeechBrain's ``CTCScorer`` calls."""

    def __init__(self, heads, exit_index: int):
        super().__init__()
        self.heads, self.exit_index = heads, exit_index

    def forward(self, hidden):
        return self.heads.forward_exit(self.exit_index, hidden)


def _heads(x: torch.Tensor, nhead: int) -> torch.Tensor:
    """``(B, L, D)`` -> ``(B, H, L, D / H)``."""
    return x.view(x.shape[0], x.shape[1], nhead, -1).transpose(1, 2)


def _attend(
    att: nn.MultiheadAttention,
    x: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    keep: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One query position ``x`` ``(B, 1, D)`` through ``att`` (torch's multi-head attention,
    as SpeechBrain's ``MultiheadAttention`` wraps it) over projected ``keys``/``values``
    ``(B, H, L, D / H)``; ``keep`` ``(B, 1, 1, L)``: the keys to attend to. Returns the
    output ``(B, 1, D)`` and the weights averaged over heads ``(B, 1, L)``."""
    d = x.shape[-1]
    q = _heads(nn.functional.linear(x, att.in_proj_weight[:d], att.in_proj_bias[:d]), att.num_heads)
    scores = torch.matmul(q * (q.shape[-1] ** -0.5), keys.transpose(-2, -1))
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    out = torch.matmul(weights, values).transpose(1, 2).reshape(x.shape[0], 1, d)
    return att.out_proj(out), weights.mean(dim=1)


def _keys_values(att: nn.MultiheadAttention, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The key and value projections of ``x`` ``(B, L, D)``, split into heads."""
    d = x.shape[-1]
    w, b = att.in_proj_weight, att.in_proj_bias
    return (
        _heads(nn.functional.linear(x, w[d : 2 * d], b[d : 2 * d]), att.num_heads),
        _heads(nn.functional.linear(x, w[2 * d :], b[2 * d :]), att.num_heads),
    )


class _SearchMemory:
    """What :class:`CachedTransformerBeamSearcher` carries from step to step: each layer's
    self-attention keys and values for the tokens so far (None before the first token),
    and each layer's projection of the encoder states (computed once per search)."""

    def __init__(self, self_kv, cross_kv, keep):
        self.self_kv, self.cross_kv, self.keep = self_kv, cross_kv, keep

    @property
    def position(self) -> int:
        """How many tokens the decoder has read: the next token's position."""
        return 0 if self.self_kv[0] is None else self.self_kv[0][0].shape[2]


def _cacheable(decoder) -> bool:
    """Whether ``decoder`` (an :class:`ExitDecoder`) has the pre-norm, regular multi-head
    attention layers that :class:`CachedTransformerBeamSearcher` steps incrementally."""
    from speechbrain.nnet.attention import MultiheadAttention

    layers = getattr(getattr(decoder, "decoder", None), "layers", None)
    return bool(layers) and all(
        layer.normalize_before
        and isinstance(layer.self_attn, MultiheadAttention)
        and isinstance(layer.multihead_attn, MultiheadAttention)
        and layer.self_attn.att.in_proj_weight is not None
        and layer.multihead_attn.att.in_proj_weight is not None
        for layer in layers
    )


class CachedTransformerBeamSearcher(S2STransformerBeamSearcher):
    """SpeechBrain's ``S2STransformerBeamSearcher`` stepping an :class:`ExitDecoder`
    incrementally: each step runs only the new token through the decoder, reusing
    the earlier tokens' self-attention keys and values and the encoder states'
    cross-attention projections, instead of the whole prefix and the encoder
    states' projections again at every step (what the stock searcher does). The
    decoder is causal, so the result is the same up to float rounding. The
    attention it returns is the last layer's cross-attention of the new token
    ``(B, 1, T)``. In training mode, or for a decoder it cannot step, it falls back
    to the stock step."""

    def reset_mem(self, batch_size, device):
        return None

    def permute_mem(self, memory, index):
        if not isinstance(memory, _SearchMemory):
            return super().permute_mem(memory, index)
        # the encoder-state projections need no permuting: a hypothesis's
        # predecessor is a hypothesis of the same utterance, with the same states
        return _SearchMemory(
            [(k.index_select(0, index), v.index_select(0, index)) for k, v in memory.self_kv],
            memory.cross_kv,
            memory.keep,
        )

    def forward_step(self, inp_tokens, memory, enc_states, enc_lens):
        model = self.model
        # whether the decoder can be stepped is decided once, at a search's first step: a
        # search that started with the stock step carries its token tensor as memory
        if model.training or not (isinstance(memory, _SearchMemory) or (memory is None and _cacheable(model))):
            return super().forward_step(inp_tokens, memory, enc_states, enc_lens)
        layers = model.decoder.layers
        if memory is None:  # first step: project the encoder states once
            keep = None
            if enc_lens is not None:
                keep = length_to_mask(enc_lens, max_len=enc_states.shape[1]).bool()[:, None, None]
            memory = _SearchMemory(
                [None] * len(layers), [_keys_values(layer.multihead_attn.att, enc_states) for layer in layers], keep
            )
        position = memory.position
        x = model.embedding(inp_tokens.unsqueeze(1))
        x = x + model.positions.pe[:, position : position + 1].to(x.dtype)
        self_kv, attn = [], None
        for layer, past, (ck, cv) in zip(layers, memory.self_kv, memory.cross_kv):
            h = layer.norm1(x)
            k, v = _keys_values(layer.self_attn.att, h)
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            self_kv.append((k, v))
            x = x + _attend(layer.self_attn.att, h, k, v)[0]
            out, attn = _attend(layer.multihead_attn.att, layer.norm2(x), ck, cv, memory.keep)
            x = x + out
            x = x + layer.pos_ffn(layer.norm3(x))
        x = model.decoder.norm(x)
        log_probs = self.softmax(self.fc(x[:, -1]) / self.temperature)
        return log_probs, _SearchMemory(self_kv, memory.cross_kv, memory.keep), attn


def make_aed_searcher(
    decoders: ExitDecoders,
    ctc_heads,
    exit_index: int,
    bos_index: int,
    eos_index: int,
    blank_index: int = 0,
    beam_size: int = 10,
    ctc_weight: float = 0.4,
    length_normalization: bool = True,
    length_reward: float = 0.0,
    max_decode_ratio: float = 1.0,
    topk: int = 1,
    lm_path: Optional[str] = None,
    lm_weight: float = 0.0,
    pieces: Optional[Sequence[str]] = None,
    lm_word_bonus: float = 0.0,
    lm_oov_penalty: float = 10.0,
    cached: bool = True,
):
    """SpeechBrain's joint CTC/attention beam search over one exit's decoder and CTC head.

    ``ctc_weight`` in [0, 1] weighs the CTC prefix score against the decoder's
    (0: attention only); ``length_reward`` adds a per-token bonus (SpeechBrain's
    ``LengthScorer``; it cannot be combined with ``length_normalization``).
    ``lm_weight`` > 0 fuses the word n-gram ``lm_path`` into the search
    (:class:`~earlyexit_brain.decoding.ngram.WordNgramScorer` over the tokenizer's ``pieces``),
    with ``lm_word_bonus`` per word and ``lm_oov_penalty`` for a partial word that no
    word of the n-gram starts with. ``cached``: step the decoder incrementally
    (``CachedTransformerBeamSearcher``, the same hypotheses in a fraction of the time);
    False: SpeechBrain's searcher, which runs the whole prefix at every step.
    """
    from speechbrain.decoders import CTCScorer
    from speechbrain.decoders.scorer import LengthScorer

    check_search_options(beam_size, ctc_weight)
    full, weights = [], {}
    if ctc_weight > 0:
        full.append(CTCScorer(ctc_fc=_ExitLogits(ctc_heads, exit_index), blank_index=blank_index, eos_index=eos_index))
        weights["ctc"] = ctc_weight
    if length_reward:
        if length_normalization:
            raise ValueError("aed_length_reward: cannot be combined with aed_length_normalization; set one of them off")
        full.append(LengthScorer(vocab_size=decoders.config["vocab_size"]))
        weights["length"] = length_reward
    if lm_weight:
        if lm_path is None or pieces is None:
            raise ValueError(
                "aed_lm_weight: fusing a word n-gram needs the n-gram (ctc_lm_path or "
                "ngram_order) and the tokenizer's pieces"
            )
        full.append(
            WordNgramScorer(
                lm_path, pieces, decoders.config["vocab_size"], eos_index, lm_weight, lm_word_bonus, lm_oov_penalty
            )
        )
        weights["wordngram"] = 1.0
    scorer = scorer_builder(full_scorers=full, weights=weights) if full else None
    searcher_class = CachedTransformerBeamSearcher if cached else S2STransformerBeamSearcher
    return searcher_class(
        modules=[decoders.decoders[exit_index], decoders.out[exit_index]],
        bos_index=bos_index,
        eos_index=eos_index,
        min_decode_ratio=0.0,
        max_decode_ratio=max_decode_ratio,
        beam_size=beam_size,
        scorer=scorer,
        length_normalization=length_normalization,
        using_eos_threshold=False,
        return_topk=topk > 1,
        topk=topk,
    )


def _num_at_least(low: float):
    return lambda v: is_num(v) and v >= low


@dataclasses.dataclass(frozen=True)
class AEDSearchOptions(Options):
    """The joint CTC/attention beam search of attention-decoder exits (:func:`make_aed_searcher`);
    the recipe YAML key of each field in brackets.

    Arguments
    ---------
    bos_index, eos_index : int
        The decoders' begin and end tokens (``bos_index``, ``eos_index``).
    blank_index : int
        The CTC blank (``blank_index``).
    beam_size : int
        The beam in test and in the exported model (``beam_size``).
    valid_beam_size : int, optional
        The beam in validation (``valid_beam_size``; null: ``beam_size``).
    ctc_weight : float
        The CTC prefix score's weight in [0, 1] (``decode_ctc_weight``; 0: attention only).
    length_normalization : bool
        Divide the scores by the hypothesis length (``aed_length_normalization``).
    length_reward : float
        A per-token bonus (``aed_length_reward``; not with length normalisation).
    max_decode_ratio : float
        The longest hypothesis in tokens per encoder frame (``max_decode_ratio``).
    lm_weight, lm_word_bonus, lm_oov_penalty : float
        The fused word n-gram's weight (0: not fused), per-word bonus and the penalty of a partial
        word no n-gram word starts with (``aed_lm_weight``, ``aed_lm_word_bonus``, ``aed_lm_oov_penalty``).
    """

    bos_index: int = option("bos_index", dataclasses.MISSING, lambda v: is_int(v) and v >= 0, "an integer >= 0")
    eos_index: int = option("eos_index", dataclasses.MISSING, lambda v: is_int(v) and v >= 0, "an integer >= 0")
    blank_index: int = option("blank_index", 0, lambda v: is_int(v) and v >= 0, "an integer >= 0")
    beam_size: int = option("beam_size", 10, lambda v: is_int(v) and v >= 1, "an integer >= 1")
    valid_beam_size: Optional[int] = option(
        "valid_beam_size", None, lambda v: v is None or (is_int(v) and v >= 1), "an integer >= 1"
    )
    ctc_weight: float = option("decode_ctc_weight", 0.4, lambda v: is_num(v) and 0 <= v <= 1, "a number in [0, 1]")
    length_normalization: bool = option(
        "aed_length_normalization", True, lambda v: isinstance(v, bool), "true or false"
    )
    length_reward: float = option("aed_length_reward", 0.0, _num_at_least(0), "a number >= 0")
    max_decode_ratio: float = option("max_decode_ratio", 1.0, lambda v: is_num(v) and v > 0, "a number > 0")
    lm_weight: float = option("aed_lm_weight", 0.0, _num_at_least(0), "a number >= 0")
    lm_word_bonus: float = option("aed_lm_word_bonus", 0.0, is_num, "a number")
    lm_oov_penalty: float = option("aed_lm_oov_penalty", 10.0, _num_at_least(0), "a number >= 0")

    def searcher_kwargs(self, beam_size: Optional[int] = None) -> Dict:
        """:func:`make_aed_searcher`'s (and ``EarlyExitAEDModel``'s) keyword arguments, with
        ``beam_size`` instead of the option's when given."""
        kwargs = self.as_dict()
        del kwargs["valid_beam_size"]  # the Brain's choice of beam, not a search option
        if beam_size is not None:
            kwargs["beam_size"] = int(beam_size)
        return kwargs


#: The fused word n-gram's YAML keys and their defaults (not fused).
AED_LM_DEFAULTS = {key: value for key, value in AEDSearchOptions.defaults().items() if key.startswith("aed_lm_")}


def check_search_options(beam_size: int, ctc_weight: float):
    """Raise a ValueError naming the key for a beam size below 1 or a CTC weight outside [0, 1]."""
    if not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size: must be an integer >= 1, got {beam_size!r}")
    if not 0.0 <= float(ctc_weight) <= 1.0:
        raise ValueError(f"ctc_weight: must be in [0, 1], got {ctc_weight!r}")


def exit_searcher(model, exit_index: int):
    """The joint CTC/attention beam searcher of one exit of an
    :class:`~earlyexit_brain.models.pipeline.EarlyExitAEDModel` (built once, with the
    model's search options and the n-gram of its ``use_lm``)."""
    if exit_index not in model._searchers:
        model._searchers[exit_index] = make_aed_searcher(
            model.decoders, model.heads, exit_index, **model.search_options, **model.lm
        )
    return model._searchers[exit_index]


@torch.no_grad()
def decode_exit(
    model, exit_index: int, hidden: torch.Tensor, rel_lens: Optional[torch.Tensor] = None
) -> List[List[int]]:
    """Token ids of the best hypothesis per utterance of exit ``exit_index``'s states
    ``(B, T, D)``; only that exit's decoder runs."""
    if rel_lens is None:
        rel_lens = torch.ones(hidden.shape[0], device=hidden.device)
    hyps, _, _, _ = exit_searcher(model, exit_index)(hidden, rel_lens.to(hidden.device))
    return [list(map(int, h)) for h in hyps]


def decode_states(model, exit_index: int, states: List[torch.Tensor]) -> List[List[int]]:
    """:func:`decode_exit` of utterances' unpadded states ``(T_b, D)``, padded into one batch."""
    frames = torch.tensor([s.shape[0] for s in states], dtype=torch.float32)
    padded = torch.nn.utils.rnn.pad_sequence(states, batch_first=True)
    return decode_exit(model, exit_index, padded, frames / padded.shape[1])
