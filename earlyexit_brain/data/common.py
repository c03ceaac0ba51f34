"""Pieces shared by the real-corpus preparations (LibriSpeech, TED-LIUM 3).

- :class:`Problems` collects every problem found while reading a corpus (file
  and line), so preparation reports them all at once: it raises one
  :class:`CorpusError` listing them (``on_error: fail``, the default) or logs
  them as warnings and leaves the affected utterances out (``on_error: skip``).
- :func:`write_manifest` writes a SpeechBrain CSV manifest atomically.
- :class:`Stamp` makes preparation idempotent: a JSON file written after the
  manifests records the options and a fingerprint of the input files
  (transcript/stm paths, sizes and modification times; audio files are
  checked, not fingerprinted); when it matches, every manifest exists and no
  problem was skipped, preparation returns at once. A stale stamp and the
  manifests it vouched for are removed before anything else, so a manifest
  without a matching stamp is never taken for a finished one.
"""

import csv
import hashlib
import io
import json
import logging
import os
from typing import Dict, Iterable, List, Optional, Sequence

from earlyexit_brain.files import atomic_write_text

logger = logging.getLogger(__name__)

ON_ERROR = ("fail", "skip")
#: How many problems are printed in full before the rest are counted.
MAX_LISTED = 200


class CorpusError(ValueError):
    """The corpus has problems; the message lists each one with its file and line."""


class Problems:
    """Problems found in a corpus, each with the file (and line) it comes from."""

    def __init__(self, corpus: str):
        self.corpus = corpus
        self.items: List[str] = []

    def add(self, path: str, message: str, line: Optional[int] = None) -> None:
        where = f"{path}:{line}" if line is not None else path
        self.items.append(f"{where}: {message}")

    def __len__(self) -> int:
        return len(self.items)

    def listing(self) -> str:
        shown = self.items[:MAX_LISTED]
        text = "\n".join(f"  - {p}" for p in shown)
        if len(self.items) > MAX_LISTED:
            text += f"\n  ... and {len(self.items) - MAX_LISTED} more"
        return text

    def resolve(self, on_error: str) -> None:
        """Raise one :class:`CorpusError` listing every problem (``fail``), or warn (``skip``)."""
        if not self.items:
            return
        if on_error == "fail":
            raise CorpusError(
                f"{self.corpus} preparation found {len(self.items)} problem(s):\n{self.listing()}\n"
                "Fix them, or set the corpus option on_error: skip (corpus_options in the YAML) "
                "to leave the affected utterances out with a warning."
            )
        logger.warning(
            "%s preparation: %d problem(s), the affected utterances are left out (on_error: skip):\n%s",
            self.corpus,
            len(self.items),
            self.listing(),
        )


def check_common_options(corpus: str, on_error, max_utterances, sample_rate, num_workers) -> None:
    """Validate the options every real-corpus preparation takes; errors name the option."""
    if on_error not in ON_ERROR:
        raise CorpusError(f"{corpus} corpus option 'on_error' must be 'fail' or 'skip', got {on_error!r}")
    if max_utterances is not None and (
        isinstance(max_utterances, bool) or not isinstance(max_utterances, int) or max_utterances < 1
    ):
        raise CorpusError(
            f"{corpus} corpus option 'max_utterances' must be null or an integer >= 1, got {max_utterances!r}"
        )
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate < 1:
        raise CorpusError(f"{corpus} corpus option 'sample_rate' must be an integer >= 1, got {sample_rate!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise CorpusError(f"{corpus} corpus option 'num_workers' must be an integer >= 1, got {num_workers!r}")


def check_split_list(corpus: str, key: str, value, allowed: Sequence[str], allow_empty: bool) -> List[str]:
    """A list of split names, each among ``allowed``; errors name the option."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise CorpusError(f"{corpus} corpus option '{key}' must be a list of split names, got {value!r}")
    if not value and not allow_empty:
        raise CorpusError(f"{corpus} corpus option '{key}' must name at least one split")
    bad = [v for v in value if v not in allowed]
    if bad:
        raise CorpusError(f"{corpus} corpus option '{key}': unknown split(s) {bad}; accepted: {list(allowed)}")
    return list(value)


def write_manifest(path: str, rows: Iterable[Dict], columns: Sequence[str]) -> None:
    """Write a SpeechBrain CSV manifest (header ``columns``) atomically."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row[k] for k in columns})
    atomic_write_text(path, text.getvalue())


def file_fingerprint(paths: Iterable[str]) -> str:
    """Hash of ``(path, size, mtime_ns)`` of each file (cheap: one ``stat`` each)."""
    digest = hashlib.sha1()
    for path in sorted(paths):
        st = os.stat(path)
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class Stamp:
    """Options + inputs stamp written beside the manifests, after them.

    Arguments
    ---------
    path : str
        The stamp file (JSON).
    key : dict
        Everything the manifests depend on (options, corpus version, input
        fingerprint); its hash is compared.
    manifests : list of str
        The outputs a preparation may write (removed when the stamp is stale).
    """

    def __init__(self, path: str, key: Dict, manifests: Sequence[str]):
        self.path = path
        self.key = key
        self.digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()
        self.manifests = list(manifests)

    def _stored(self) -> Dict:
        try:
            with open(self.path) as fin:
                return json.load(fin)
        except (OSError, ValueError):
            return {}

    def up_to_date(self) -> bool:
        """True when the stored hash matches and every manifest it vouches for exists.

        A preparation that skipped problems (``on_error: skip``) is never up to
        date: the next call checks the corpus again, so fixed files come back
        and the remaining problems are reported again.
        """
        stored = self._stored()
        return (
            stored.get("hash") == self.digest
            and bool(stored.get("manifests"))
            and not stored.get("summary", {}).get("problems_skipped")
            and all(os.path.isfile(p) for p in stored["manifests"])
        )

    def stored_manifests(self) -> List[str]:
        return list(self._stored().get("manifests", []))

    def invalidate(self) -> None:
        """Remove the stamp, then the manifests it vouched for and those about to be written."""
        previous = self.stored_manifests()
        if os.path.exists(self.path):
            os.remove(self.path)
        for path in set(previous) | set(self.manifests):
            if os.path.isfile(path):
                os.remove(path)

    def write(self, written: Sequence[str], summary: Dict) -> None:
        """Record the manifests actually ``written`` (last step of a preparation)."""
        atomic_write_text(
            self.path,
            json.dumps(
                {"hash": self.digest, "manifests": list(written), "key": self.key, "summary": summary}, indent=1
            ),
        )


def _header(path: str):
    import soundfile as sf

    try:
        info = sf.info(path)
    except Exception as err:  # soundfile raises LibsndfileError, RuntimeError, OSError...
        return None, None, f"cannot read the audio header ({type(err).__name__}: {err})"
    return int(info.frames), int(info.samplerate), None


def read_headers(paths: Sequence[str], num_workers: int, desc: str) -> List:
    """``(frames, sample_rate, error)`` of each audio file from its header (no decoding).

    Headers are read by ``num_workers`` threads (the files often live on a
    network file system, where latency, not CPU, is the cost), with a progress bar.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    if not paths:
        return []
    with ThreadPoolExecutor(max(1, int(num_workers))) as pool:
        return list(tqdm(pool.map(_header, paths), total=len(paths), desc=desc, dynamic_ncols=True, mininterval=1.0))
