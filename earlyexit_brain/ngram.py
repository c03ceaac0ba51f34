"""Word n-gram language models for CTC beam search.

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
import logging
import math
import os
from collections import Counter, defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .utils import atomic_write_text

logger = logging.getLogger(__name__)

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # lmplz's --discount_fallback defaults

Gram = Tuple[str, ...]


def count_ngrams(sentences: Iterable[str], order: int) -> List[Counter]:
    """Raw counts of every n-gram up to ``order``, sentences padded with ``<s>`` and ``</s>``."""
    if not isinstance(order, int) or order < 2:
        raise ValueError(f"ngram_order: must be an integer >= 2 (KenLM reads bigram models "
                         f"and up), got {order!r}")
    counts = [Counter() for _ in range(order)]
    for sentence in sentences:
        words = [BOS] + sentence.split() + [EOS]
        for n in range(1, order + 1):
            for i in range(len(words) - n + 1):
                counts[n - 1][tuple(words[i:i + n])] += 1
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
        adjusted[n] = {gram: (count if gram[0] == BOS else left[gram])
                       for gram, count in counts[n].items()}
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


def estimate(sentences: Sequence[str], order: int) -> Tuple[List[Dict[Gram, float]],
                                                             List[Dict[Gram, float]]]:
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
    sizes = ", ".join(line.split()[1] for line in text.splitlines()[1:order + 1])
    logger.info("N-gram LM: %s from %d sentences of %s (%s)", path, len(sentences), train_csv, sizes)
    return path


def prepare_recipe_lm(hparams: Dict) -> Optional[str]:
    """A recipe's n-gram LM: ``ctc_lm_path`` when set, else, with ``ngram_order`` > 0,
    ``<save_folder>/ngram_<order>.arpa`` estimated from ``train_csv`` (written on the
    main process). Sets ``hparams["ctc_lm_path"]`` and returns it (None: no LM)."""
    import speechbrain as sb

    order = hparams.get("ngram_order") or 0
    if hparams.get("ctc_lm_path") is not None or order == 0:
        return hparams.get("ctc_lm_path")
    path = os.path.join(hparams["save_folder"], f"ngram_{order}.arpa")
    sb.utils.distributed.run_on_main(build_ngram_lm, args=[hparams["train_csv"], order, path])
    hparams["ctc_lm_path"] = path
    return path


def lm_summary(hparams: Dict) -> Optional[Dict]:
    """report.json's ``ctc_lm``: the n-gram used by ``ctc_beam`` (file name, order read
    from an ARPA header, weights), or None without one."""
    path = hparams.get("ctc_lm_path")
    if not path:
        return None
    order = None
    with open(path, "rb") as fin:
        for _, line in zip(range(20), fin):  # the ARPA header; a binary file has none
            if line.startswith(b"ngram "):
                order = int(line.split(b"=")[0].split()[1])
    return {"file": os.path.basename(path), "order": order,
            "alpha": float(hparams.get("ctc_lm_alpha", 0.5)),
            "beta": float(hparams.get("ctc_lm_beta", 1.0))}
