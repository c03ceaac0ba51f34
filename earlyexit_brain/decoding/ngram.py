"""Word n-gram language models for CTC beam search and the attention decoders' search.

A recipe with ``ngram_order: N`` estimates an N-gram model from its training
transcripts (the ``wrd`` column of ``train_csv``) and writes it in ARPA format,
which KenLM and SpeechBrain's CTC beam searchers read (``ctc_lm_path``).
KenLM's Python bindings only query models; its estimator (``lmplz``) is a
separate C++ program that no pip package ships, so the estimation is done here.

Smoothing: interpolated modified Kneser-Ney (Chen & Goodman, 1998), as ``lmplz``
does it. For order ``n`` with context ``h`` and adjusted count ``a(h, w)``
(the raw count at the highest order and for n-grams that start with ``<s>``;
otherwise the number of distinct words seen before the n-gram)::

    p(w | h) = (a(h, w) - D_n(a(h, w))) / A(h) + gamma(h) p(w | h')
    gamma(h) = (D_n1 N1(h) + D_n2 N2(h) + D_n3+ N3+(h)) / A(h)

where ``A(h)`` sums ``a(h, .)``, ``N_k(h)`` counts the words with ``a(h, w) = k``,
``h'`` drops the first word of ``h``, and the discounts come from the counts of
counts: ``Y = t1 / (t1 + 2 t2)``, ``D_k = k - (k + 1) Y t_{k+1} / t_k``. The
unigrams interpolate with the uniform distribution over the vocabulary
(``</s>`` and ``<unk>`` included). In ARPA form ``gamma(h)`` is the backoff
weight of ``h``, so every context's distribution sums to one.
"""

import csv
import functools
import logging
import math
import os
from collections import Counter, defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from ..files import atomic_write_text
from ..utils import uses_decoders

logger = logging.getLogger(__name__)

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # lmplz's --discount_fallback defaults

Gram = Tuple[str, ...]


def count_ngrams(sentences: Iterable[str], order: int) -> List[Counter]:
    """Raw counts of every n-gram up to ``order``, sentences padded with ``<s>`` and ``</s>``."""
    if not isinstance(order, int) or order < 2:
        raise ValueError(f"ngram_order: must be an integer >= 2 (KenLM reads bigram models and up), got {order!r}")
    counts = [Counter() for _ in range(order)]
    for sentence in sentences:
        words = [BOS] + sentence.split() + [EOS]
        for n in range(1, order + 1):
            for i in range(len(words) - n + 1):
                counts[n - 1][tuple(words[i : i + n])] += 1
    del counts[0][(BOS,)]  # <s> is a context, never predicted
    return counts


def adjusted_counts(counts: List[Counter]) -> List[Dict[Gram, int]]:
    """Kneser-Ney adjusted counts: raw counts at the highest order and for n-grams
    starting with ``<s>``, numbers of distinct left neighbours otherwise."""
    order = len(counts)
    adjusted: List[Dict[Gram, int]] = [dict() for _ in range(order)]
    adjusted[-1] = dict(counts[-1])
    for n in range(order - 1):
        left = Counter(gram[1:] for gram in counts[n + 1])
        adjusted[n] = {gram: (count if gram[0] == BOS else left[gram]) for gram, count in counts[n].items()}
    return adjusted


def discounts(adjusted: Dict[Gram, int]) -> Tuple[float, float, float]:
    """Modified Kneser-Ney discounts ``(D1, D2, D3+)`` from one order's counts of counts;
    lmplz's fallback values when the counts cannot give valid ones (tiny corpora)."""
    t = Counter(min(count, 4) for count in adjusted.values())
    if not all(t[k] for k in (1, 2, 3, 4)):
        return FALLBACK_DISCOUNTS
    y = t[1] / (t[1] + 2 * t[2])
    d = tuple(k - (k + 1) * y * t[k + 1] / t[k] for k in (1, 2, 3))
    if not all(0 < d[k - 1] < k for k in (1, 2, 3)):
        return FALLBACK_DISCOUNTS
    return d


def estimate(sentences: Sequence[str], order: int) -> Tuple[List[Dict[Gram, float]], List[Dict[Gram, float]]]:
    """Interpolated modified Kneser-Ney: ``(probs, backoffs)``, one dict per order
    (1-based order ``n`` at index ``n - 1``), natural probabilities and backoff weights."""
    counts = count_ngrams(sentences, order)
    if not counts[0]:
        raise ValueError("the n-gram training text has no words")
    adjusted = adjusted_counts(counts)
    vocab_size = len(adjusted[0]) + 1  # the words and </s>, plus <unk>
    probs: List[Dict[Gram, float]] = []
    backoffs: List[Dict[Gram, float]] = [dict() for _ in range(order)]
    for n in range(1, order + 1):
        d = discounts(adjusted[n - 1])
        totals: Dict[Gram, int] = defaultdict(int)
        mass: Dict[Gram, float] = defaultdict(float)
        for gram, count in adjusted[n - 1].items():
            totals[gram[:-1]] += count
            mass[gram[:-1]] += d[min(count, 3) - 1]
        gammas = {h: mass[h] / totals[h] for h in totals}
        level: Dict[Gram, float] = {}
        for gram, count in adjusted[n - 1].items():
            h = gram[:-1]
            lower = 1.0 / vocab_size if n == 1 else probs[n - 2][gram[1:]]
            level[gram] = (count - d[min(count, 3) - 1]) / totals[h] + gammas[h] * lower
        if n == 1:
            level[(UNK,)] = gammas[()] / vocab_size
        else:
            backoffs[n - 2] = gammas
        probs.append(level)
    return probs, backoffs


def arpa_text(sentences: Sequence[str], order: int) -> str:
    """The ARPA file of an interpolated modified Kneser-Ney ``order``-gram model."""
    probs, backoffs = estimate(sentences, order)
    probs[0][(BOS,)] = 0.0  # listed (it has a backoff weight) but never predicted
    lines = ["\\data\\"] + [f"ngram {n + 1}={len(level)}" for n, level in enumerate(probs)]
    for n, level in enumerate(probs):
        lines += ["", f"\\{n + 1}-grams:"]
        for gram in sorted(level):
            p = level[gram]
            logp = -99.0 if p <= 0.0 else math.log10(p)
            fields = [f"{logp:.6f}", " ".join(gram)]
            if n < order - 1:
                fields.append(f"{math.log10(backoffs[n].get(gram, 1.0)):.6f}")
            lines.append("\t".join(fields))
    lines += ["", "\\end\\", ""]
    return "\n".join(lines)


def manifest_sentences(csv_path: str, column: str = "wrd", unique: bool = True) -> List[str]:
    """The transcripts of a SpeechBrain manifest (each sentence once with ``unique``)."""
    with open(csv_path, newline="", encoding="utf-8") as fin:
        reader = csv.DictReader(fin)
        if column not in (reader.fieldnames or []):
            raise ValueError(f"{csv_path}: no '{column}' column for the n-gram training text")
        sentences = [row[column].strip() for row in reader if row[column].strip()]
    return sorted(set(sentences)) if unique else sentences


def build_ngram_lm(train_csv: str, order: int, path: str, unique: bool = True) -> str:
    """Estimate an ``order``-gram model on ``train_csv``'s transcripts into ``path`` (ARPA).

    Sentences spoken several times (the synthetic corpus's voices) count once
    with ``unique``, so the counts of counts, hence the discounts, are the
    text's. Written atomically; returns ``path``.
    """
    sentences = manifest_sentences(train_csv, unique=unique)
    text = arpa_text(sentences, order)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, text)
    sizes = ", ".join(line.split()[1] for line in text.splitlines()[1 : order + 1])
    logger.info("N-gram LM: %s from %d sentences of %s (%s)", path, len(sentences), train_csv, sizes)
    return path


def prepare_recipe_lm(hparams: Dict) -> Optional[str]:
    """A recipe's n-gram LM: ``ctc_lm_path`` when set, else, with ``ngram_order`` > 0,
    ``<save_folder>/ngram_<order>.arpa`` estimated from ``train_csv`` (written on the
    main process). Returns its path (None: no LM); the recipe puts it in its ``ctc_lm_path``."""
    import speechbrain as sb

    order = hparams.get("ngram_order") or 0
    if hparams.get("ctc_lm_path") is not None or order == 0:
        return hparams.get("ctc_lm_path")
    path = os.path.join(hparams["save_folder"], f"ngram_{order}.arpa")
    sb.utils.distributed.run_on_main(build_ngram_lm, args=[hparams["train_csv"], order, path])
    return path


def lm_summary(hparams: Dict) -> Optional[Dict]:
    """report.json's ``ctc_lm``: the n-gram used by ``ctc_beam`` (file name, order read
    from an ARPA header, weights; ``aed_weight`` and ``aed_word_bonus`` when the attention
    search fuses it too), or None without one."""
    path = hparams.get("ctc_lm_path")
    if not path:
        return None
    order = None
    with open(path, "rb") as fin:
        for _, line in zip(range(20), fin):  # the ARPA header; a binary file has none
            if line.startswith(b"ngram "):
                order = int(line.split(b"=")[0].split()[1])
    summary = {
        "file": os.path.basename(path),
        "order": order,
        "alpha": float(hparams.get("ctc_lm_alpha", 0.5)),
        "beta": float(hparams.get("ctc_lm_beta", 1.0)),
    }
    if float(hparams.get("aed_lm_weight") or 0.0) > 0 and uses_decoders(hparams):
        summary["aed_weight"] = float(hparams["aed_lm_weight"])
        summary["aed_word_bonus"] = float(hparams.get("aed_lm_word_bonus", 0.0))
    return summary


def check_lm_file(path: str) -> None:
    """Raise a ValueError naming ``ctc_lm_path`` when the n-gram file ``path`` is missing."""
    if not os.path.isfile(path):
        raise ValueError(f"ctc_lm_path: no such n-gram file: {path}")


def is_kenlm_binary(path: str) -> bool:
    """Whether ``path`` is a KenLM binary file (else ARPA text)."""
    with open(path, "rb") as fin:
        return fin.read(32).startswith(b"mmap lm http://kheafield.com")


def arpa_vocabulary(path: str) -> Optional[Set[str]]:
    """The words of an n-gram file's unigrams (SpeechBrain's ARPA reader; ``<s>``,
    ``</s>`` and ``<unk>`` left out), or None for a KenLM binary file, whose
    vocabulary the bindings do not list."""
    if is_kenlm_binary(path):
        return None
    from speechbrain.integrations.decoders.kenlm_scorer import load_unigram_set_from_arpa

    return load_unigram_set_from_arpa(path) - {BOS, EOS, UNK}


@functools.lru_cache(maxsize=4)
def _loaded_ngram(path: str, mtime_ns: int, size: int):
    """A KenLM model and the prefixes of its words (None for a binary file), loaded once
    for all the exits' searchers (the file's time and size in the key: a rewritten file
    is loaded again)."""
    import kenlm

    words = arpa_vocabulary(path)
    prefixes = None if words is None else {w[:i] for w in words for i in range(1, len(w) + 1)}
    return kenlm.Model(path), prefixes


class WordNgramScorer:
    """A word n-gram (KenLM) as a full scorer of SpeechBrain's token-level beam searches.

    SpeechBrain's own ``KenLMScorer`` looks tokens up as the n-gram's words, so it needs
    an n-gram over tokens; this one fuses a *word* n-gram (the recipes' ``ngram_order``
    model, ``ctc_lm_path``) into the joint CTC/attention search. Each hypothesis carries
    its n-gram state (the words it has completed) and the partial word after them. A
    hypothesis's LM score is

        S(y) = sum over its completed words w_i of ln p(w_i | w_{i-2} w_{i-1})
               + (ln p(</s> | ...) once it has ended)
               - oov_penalty   (while its partial word is a prefix of no word of the n-gram)

    and the score of token ``t`` is ``weight * (S(y t) - S(y))``, plus ``word_bonus`` for
    each word it completes (as ``ctc_lm_alpha`` and ``ctc_lm_beta`` do in CTC beam
    search). A piece that starts a word (``▁...``) or ``</s>`` completes the partial
    word and adds its log-probability; a piece inside a word adds nothing unless it
    leaves the n-gram's vocabulary, which costs ``oov_penalty`` at once instead of only
    when the word ends (the partial-word rule of CTC decoders such as pyctcdecode;
    ``<unk>`` counts as such a piece). Tokens that are never text (``<s>``, ids the
    tokenizer has no piece for) are blocked, as SpeechBrain's CTC scorer blocks the
    blank: they would be free tokens otherwise. Without an ARPA vocabulary (KenLM binary
    files) there is no partial-word penalty. Registered under the name ``wordngram``
    (see :func:`scorer_builder`).
    """

    def __init__(
        self,
        lm_path: str,
        pieces: Sequence[str],
        vocab_size: int,
        eos_index: int,
        weight: float = 0.5,
        word_bonus: float = 0.0,
        oov_penalty: float = 10.0,
    ):
        import numpy as np

        try:
            import kenlm
        except ImportError as err:
            raise ValueError(
                "aed_lm_weight: fusing the n-gram into the attention search needs the KenLM bindings (requirements.txt)"
            ) from err
        check_lm_file(lm_path)
        self.np, self.kenlm = np, kenlm
        stat = os.stat(lm_path)
        self.lm, self.prefixes = _loaded_ngram(os.path.abspath(lm_path), stat.st_mtime_ns, stat.st_size)
        self.ln10 = math.log(10.0)
        self.weight, self.word_bonus = float(weight), float(word_bonus)
        self.oov_penalty = float(oov_penalty)
        # token kinds: 0 is never text (<s>, control pieces, ids without a piece: blocked),
        # 1 starts a word, 2 continues one (<unk>: a character no word has), 3 is </s>
        self.vocab_size = int(vocab_size)
        self.kind = np.zeros(self.vocab_size, dtype=np.int64)
        self.text = [""] * self.vocab_size
        for i, piece in enumerate(pieces[: self.vocab_size]):
            if piece == UNK:
                self.kind[i], self.text[i] = 2, "\x00"
            elif not (piece.startswith("<") and piece.endswith(">")):
                self.kind[i] = 1 if piece.startswith("\u2581") else 2
                self.text[i] = piece.lstrip("\u2581")
        self.kind[eos_index] = 3
        self.never = np.flatnonzero(self.kind == 0)
        self.starts = np.flatnonzero(self.kind == 1)
        self.inside = np.flatnonzero(self.kind == 2)
        self.eos_index = int(eos_index)
        self.start_penalty = np.array([self._penalty(self.text[i]) for i in self.starts])
        self._rows: Dict = {}
        self._words: Dict = {}

    def _penalty(self, partial: str) -> float:
        if not partial or self.prefixes is None or partial in self.prefixes:
            return 0.0
        return -self.oov_penalty

    def _word(self, state, word: str):
        """(ln p(word | state), the state after it), cached per decoding batch."""
        key = (state, word)
        if key not in self._words:
            out = self.kenlm.State()
            self._words[key] = (self.lm.BaseScore(state, word, out) * self.ln10, out)
        return self._words[key]

    def _advance(self, hyp, token: int):
        state, partial = hyp
        kind = self.kind[token] if 0 <= token < self.vocab_size else 0
        if kind == 1:
            if partial:
                state = self._word(state, partial)[1]
            return state, self.text[token]
        if kind == 2:
            return state, partial + self.text[token]
        return hyp

    def _row(self, hyp):
        """The score of every token after ``hyp`` (cached per decoding batch)."""
        if hyp not in self._rows:
            state, partial = hyp
            np = self.np
            row = np.zeros(self.vocab_size, dtype=np.float32)
            before = self._penalty(partial)
            done, after = self._word(state, partial) if partial else (0.0, state)
            row[self.starts] = done + self.start_penalty - before
            row[self.inside] = [self._penalty(partial + self.text[i]) - before for i in self.inside]
            row[self.eos_index] = done + self._word(after, EOS)[0] - before
            row *= self.weight
            row[self.never] = -1e20  # as SpeechBrain's scorers block tokens
            if partial:
                row[self.starts] += self.word_bonus
                row[self.eos_index] += self.word_bonus
            self._rows[hyp] = row
        return self._rows[hyp]

    def score(self, inp_tokens, memory, candidates, attn):
        """Scores ``(batch x beam, vocab)`` of every next token, and the hypotheses' states
        after ``inp_tokens`` (the tokens chosen at the previous step)."""
        import torch

        tokens = inp_tokens.tolist()
        if memory is None:
            start = self.kenlm.State()
            self.lm.BeginSentenceWrite(start)
            memory = [(start, "")] * len(tokens)
        hyps = [self._advance(hyp, token) for hyp, token in zip(memory, tokens)]
        rows = self.np.stack([self._row(hyp) for hyp in hyps])
        return torch.from_numpy(rows).to(inp_tokens.device), hyps

    def permute_mem(self, memory, index):
        """The states of the hypotheses the beam kept (``index``: their predecessors)."""
        return [memory[i] for i in index.tolist()]

    def reset_mem(self, x, enc_lens):
        """A new batch: forget the cached scores (memory starts at ``<s>`` in :meth:`score`)."""
        self._rows, self._words = {}, {}
        return None


def scorer_builder(full_scorers, weights):
    """SpeechBrain's ``ScorerBuilder`` that also accepts :class:`WordNgramScorer` (weight
    key ``wordngram``, 1: the scorer weighs itself); SpeechBrain admits only its own
    scorers' names."""
    from speechbrain.decoders import ScorerBuilder

    class _Builder(ScorerBuilder):
        def _validate_scorer(self, scorer_names):
            super()._validate_scorer(list(scorer_names) + ["wordngram"])

    return _Builder(full_scorers=full_scorers, weights=weights)
