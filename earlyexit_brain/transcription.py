"""What both transcribers return, :class:`Transcription`, and how they transcribe many files:
:func:`transcribe_files_in_batches` (bad files reported, the others transcribed in batches).
Shared by :class:`earlyexit_brain.inference.EarlyExitASR` (PyTorch) and
:class:`earlyexit_brain.runtime.EarlyExitONNX` (numpy and onnxruntime): this module imports
neither PyTorch nor onnxruntime."""

import logging
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

logger = logging.getLogger(__name__)

SILENCE_PEAK = 1e-5  # peak amplitude below which a file counts as silent (-100 dBFS)


@dataclass
class Transcription:
    """One utterance's result: ``text``, ``exit`` (1-based), ``layers`` computed.

    For ``transcribe_files``, a file that could not be read has ``text`` None and ``error``
    naming the file and the reason; for ``transcribe_batch``, a row that cannot be transcribed
    has ``text`` None and ``error`` naming the row and the reason.
    """

    text: Optional[str]
    exit: Optional[int] = None
    layers: Optional[int] = None
    path: Optional[str] = None
    error: Optional[str] = None


def transcribe_files_in_batches(
    paths: Sequence[str],
    load: Callable[[str], object],
    transcribe: Callable[[list], List[Transcription]],
    batch_size: int,
) -> List[Transcription]:
    """Every file of ``paths`` in order: ``load(path)`` (a ValueError naming the file makes its
    result's ``error``, with a warning), then ``transcribe(signals)`` on the loaded files in
    batches of ``batch_size``; each result gets its file's ``path``."""
    results: List[Optional[Transcription]] = [None] * len(paths)
    good = []
    for i, path in enumerate(paths):
        try:
            good.append((i, load(path)))
        except ValueError as err:
            logger.warning("skipping %s", err)
            results[i] = Transcription(text=None, path=path, error=str(err))
    for start in range(0, len(good), batch_size):
        chunk = good[start : start + batch_size]
        for (i, _), res in zip(chunk, transcribe([signal for _, signal in chunk])):
            res.path = paths[i]
            results[i] = res
    return results
