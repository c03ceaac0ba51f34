"""Decoding a CTC exit: greedy, or SpeechBrain's CTC beam search with a KenLM word n-gram.

:class:`CTCDecoder` turns an exit's log-probabilities into texts
(``ctc_greedy`` or ``ctc_beam``); :func:`make_ctc_beam_searcher` builds the
SpeechBrain searcher that ``ctc_beam`` and the N-best posterior policy use.
Why the word-level searcher and not the prefix searcher: docs/performance.md.
"""

import dataclasses
from typing import List, Optional

import torch
from speechbrain.decoders import ctc_greedy_decode

from ..options import Options, is_int, is_num, null_or_file, option
from ..utils import tokenizer_pieces, tokens_to_text
from .ngram import check_lm_file, is_kenlm_binary


def ctc_vocab_list(tokenizer, size: int) -> List[str]:
    """SentencePiece pieces as a CTC beam searcher's vocabulary, padded to ``size``."""
    vocab = tokenizer_pieces(tokenizer)
    vocab += [f"<unused{i}>" for i in range(size - len(vocab))]
    return vocab


def check_token_prune(value) -> float:
    """A CTC beam search's ``token_prune_min_logp``: a negative number (a log-probability)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value < 0:
        raise ValueError(f"token_prune_min_logp: must be a negative log-probability, got {value!r}")
    return float(value)


def make_ctc_beam_searcher(
    tokenizer,
    vocab_size: int,
    blank_index: int = 0,
    beam_size: int = 10,
    prefix: bool = False,
    topk: Optional[int] = None,
    kenlm_model_path: Optional[str] = None,
    token_prune_min_logp: Optional[float] = None,
    **lm_weights,
):
    """SpeechBrain CTC beam searcher returning the ``topk``-best list (default: the whole beam).

    ``kenlm_model_path``: an n-gram LM (KenLM ``.arpa`` or ``.bin``; needs the
    ``kenlm`` module, from the ``camel-kenlm`` wheels, and ``pygtrie``), weighted by
    ``alpha``/``beta`` in ``lm_weights``. ``token_prune_min_logp``: at each frame the
    search extends its hypotheses only with the tokens whose log-probability is above
    it (and the best token); None keeps SpeechBrain's default (-5).
    """
    from speechbrain.decoders.ctc import CTCBeamSearcher, CTCPrefixBeamSearcher

    if not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size: must be an integer >= 1, got {beam_size!r}")
    if kenlm_model_path is not None:
        check_lm_file(kenlm_model_path)
        try:
            import kenlm  # noqa: F401
            import speechbrain.integrations.decoders.kenlm_scorer  # noqa: F401  (needs pygtrie)
        except ImportError as err:
            raise ValueError(
                f"ctc_lm_path: decoding with an n-gram LM needs the KenLM bindings and "
                f"pygtrie (pip install camel-kenlm pygtrie; both are in "
                f"requirements.txt): {err}"
            ) from None
        from speechbrain.integrations.decoders.kenlm_scorer import load_unigram_set_from_arpa

        # the known words for partial-word scoring, whatever the file is called
        # (SpeechBrain reads them only from names ending in .arpa)
        if (
            "unigrams" not in lm_weights
            and not kenlm_model_path.endswith(".arpa")
            and not is_kenlm_binary(kenlm_model_path)
        ):
            lm_weights["unigrams"] = sorted(load_unigram_set_from_arpa(kenlm_model_path))
    if token_prune_min_logp is not None:
        lm_weights["token_prune_min_logp"] = check_token_prune(token_prune_min_logp)
    cls = CTCPrefixBeamSearcher if prefix else CTCBeamSearcher
    return cls(
        blank_index=blank_index,
        vocab_list=ctc_vocab_list(tokenizer, vocab_size),
        space_token="▁",
        beam_size=beam_size,
        topk=topk or beam_size,
        kenlm_model_path=kenlm_model_path,
        **lm_weights,
    )


#: The decoders of CTC exits (:class:`CTCDecoder`).
CTC_DECODERS = ("ctc_greedy", "ctc_beam")


@dataclasses.dataclass(frozen=True)
class CTCDecodingOptions(Options):
    """How ``ctc_beam`` decodes a CTC exit (the recipe YAML key of each field in brackets).

    Arguments
    ---------
    beam_size : int
        The beam (``ctc_beam_size``).
    lm_path : str, optional
        A KenLM word n-gram, ``.arpa`` or ``.bin`` (``ctc_lm_path``; the recipes build one from
        ``train_csv`` with ``ngram_order``); None: no LM.
    alpha, beta : float
        The LM's weight and the word insertion bonus (``ctc_lm_alpha``, ``ctc_lm_beta``).
    """

    beam_size: int = option("ctc_beam_size", 10, lambda v: is_int(v) and v >= 1, "an integer >= 1")
    lm_path: Optional[str] = option("ctc_lm_path", None, null_or_file, "null or an existing KenLM file (.arpa or .bin)")
    alpha: float = option("ctc_lm_alpha", 0.5, lambda v: is_num(v) and v >= 0, "a number >= 0")
    beta: float = option("ctc_lm_beta", 1.0, is_num, "a number")


class CTCDecoder:
    """Texts of a CTC exit's hypotheses: ``ctc_greedy``, or ``ctc_beam`` (SpeechBrain's CTC
    beam search, ``CTCBeamSearcher``, with a KenLM n-gram when ``lm_path`` names one; its
    word-level LM scoring decodes better than the prefix searcher's: docs/performance.md)."""

    def __init__(
        self, name: str, tokenizer, vocab_size: int, blank_index: int = 0, options: Optional[CTCDecodingOptions] = None
    ):
        if name not in CTC_DECODERS:
            raise ValueError(f"decoder: {name!r} is not a CTC decoder (ctc_greedy or ctc_beam)")
        self.name, self.tokenizer, self.blank_index = name, tokenizer, blank_index
        self.options = options or CTCDecodingOptions()
        self.searcher = None
        if name == "ctc_beam":
            o = self.options
            self.searcher = make_ctc_beam_searcher(
                tokenizer,
                vocab_size,
                blank_index,
                int(o.beam_size),
                prefix=False,
                topk=1,
                kenlm_model_path=o.lm_path,
                alpha=float(o.alpha),
                beta=float(o.beta),
            )

    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> List[str]:
        """``(B, T, V)`` log-probabilities and relative lengths -> B texts."""
        if self.searcher is None:
            ids = ctc_greedy_decode(log_probs, lengths, blank_id=self.blank_index)
            return [tokens_to_text(self.tokenizer, h) for h in ids]
        nbest = self.searcher(log_probs.detach().float().cpu(), lengths.detach().float().cpu())
        return [" ".join(hyps[0].text.split()) if hyps else "" for hyps in nbest]
