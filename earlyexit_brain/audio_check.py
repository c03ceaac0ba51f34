"""Bad audio in the manifests a recipe reads, whatever corpus wrote them.

Two layers, chosen by the YAML key ``bad_audio`` (``skip``, the default, or
``fail``):

- Before training, :func:`check_manifest_audio` reads every file's header
  (no decoding): a missing file, a zero-byte file, an unreadable header, no
  samples, a WAV file holding less data than its header promises (truncated),
  a segment outside its file, or audio longer than ``max_audio_seconds`` is a
  problem. ``skip`` leaves those utterances out with one warning listing them
  (and a count in report.json); ``fail`` stops with one error listing them
  all. A sample rate other than ``sample_rate`` and several channels are not
  problems: they are counted and the audio is resampled and down-mixed when
  read.
- While reading, :func:`read_utterance` decodes, down-mixes (mean of the
  channels) and resamples. A file that fails to decode, a truncated WAV file
  or one holding NaN/inf samples raises naming the file (``fail``) or is
  logged and replaced (``skip``): in training by a non-finite signal, so that
  the batch is skipped by the Brain's non-finite-loss rule (counted in the
  epoch's ``skipped``); in evaluation by silence, so the utterance counts as
  errors.

Header checks are cached per manifest in ``<save_folder>/audio_check/``
(keyed by the manifest's content and the options).
"""

import hashlib
import json
import logging
import os
import struct
from typing import Dict, List, Optional

import soundfile as sf
import torch
import torchaudio

from .files import atomic_write_text

logger = logging.getLogger(__name__)

BAD_AUDIO = ("skip", "fail")
MAX_LISTED = 50
REPLACEMENT_SECONDS = 0.1


class BadAudioError(ValueError):
    """Bad audio with ``bad_audio: fail``; the message names every file."""


#: WAV format tags whose block (``block_align`` bytes) is one sample of every channel:
#: integer PCM, IEEE float, A-law, mu-law, extensible
_PCM_TAGS = (1, 3, 6, 7, 0xFFFE)
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)  # what streaming writers put before the size is known


def wav_truncation(path: str) -> Optional[str]:
    """``"truncated: ..."`` when a WAV file holds less audio data than its header promises.

    libsndfile reads such a file up to the cut without a word and reports the
    samples it holds, so the data chunk's size is compared with the bytes that
    follow it (RIFF, RIFX and RF64 files; others, and a size a streaming writer
    left unset, give None).
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fin:
            head = fin.read(12)
            if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX", b"RF64") or head[8:] != b"WAVE":
                return None
            order = ">" if head[:4] == b"RIFX" else "<"
            pos, tag, block, data64 = 12, None, 0, None
            while pos + 8 <= size:
                fin.seek(pos)
                chunk_id, chunk_size = struct.unpack(order + "4sI", fin.read(8))
                if chunk_id == b"ds64":  # RF64: riffSize, dataSize, sampleCount (64 bits each)
                    data64 = struct.unpack("<QQ", fin.read(16))[1]
                elif chunk_id == b"fmt ":
                    fmt = fin.read(14)
                    if len(fmt) == 14:
                        tag, block = struct.unpack(order + "H10xH", fmt)
                elif chunk_id == b"data":
                    if data64 is not None and chunk_size == 0xFFFFFFFF:
                        chunk_size = data64
                    held = size - pos - 8
                    if chunk_size in _UNKNOWN_SIZES or held >= chunk_size:
                        return None
                    if tag in _PCM_TAGS and block:
                        return (
                            f"truncated: the header promises {chunk_size // block} samples, "
                            f"the file holds {held // block}"
                        )
                    return f"truncated: the header promises {chunk_size} bytes of audio, the file holds {held}"
                pos += 8 + chunk_size + (chunk_size & 1)  # chunks are padded to even sizes
    except (OSError, struct.error):
        return None  # unreadable: the decoder reports it
    return None


def _header(path: str):
    """``(frames, sample_rate, channels, problem)`` of an audio file, from its header."""
    if not os.path.isfile(path):
        return None, None, None, "missing file"
    if os.path.getsize(path) == 0:
        return None, None, None, "zero-byte file"
    try:
        info = sf.info(path)
    except Exception as err:  # soundfile raises LibsndfileError, RuntimeError, OSError...
        return None, None, None, f"unreadable or corrupt header ({err})"
    return int(info.frames), int(info.samplerate), int(info.channels), wav_truncation(path)


def row_segment(start, stop):
    """``(start, stop)`` sample indices from a manifest's string columns (empty: whole file)."""
    start, stop = str(start or "").strip(), str(stop or "").strip()
    return (int(start) if start else 0), (int(stop) if stop else None)


def check_rows(rows: Dict[str, Dict], sample_rate: int, max_audio_seconds: float, num_workers: int = 4) -> Dict:
    """Header checks of manifest rows ``{id: {"wav", ["start", "stop"]}}``.

    Returns ``{"problems": {id: "path: problem"}, "resampled": n, "downmixed": n}``.
    """
    from concurrent.futures import ThreadPoolExecutor

    paths = sorted({row["wav"] for row in rows.values()})
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        headers = dict(zip(paths, pool.map(_header, paths)))
    problems, resampled, downmixed = {}, 0, 0
    for uid, row in rows.items():
        frames, rate, channels, problem = headers[row["wav"]]
        if problem is None:
            start, stop = row_segment(row.get("start"), row.get("stop"))
            stop = frames if stop is None else stop
            if frames == 0 or stop - start <= 0:
                problem = "zero-length audio (no samples)"
            elif stop > frames:
                problem = f"segment [{start}, {stop}) ends after the file's {frames} samples"
            elif (stop - start) / rate > max_audio_seconds:
                problem = f"{(stop - start) / rate:.0f} s of audio, longer than max_audio_seconds={max_audio_seconds}"
        if problem is not None:
            problems[uid] = f"{row['wav']}: {problem}"
            continue
        resampled += rate != sample_rate
        downmixed += channels > 1
    return {"problems": problems, "resampled": resampled, "downmixed": downmixed}


def check_manifest_audio(
    dataset,
    name: str,
    manifest: str,
    sample_rate: int,
    bad_audio: str,
    max_audio_seconds: float,
    cache_folder: Optional[str] = None,
    num_workers: int = 4,
):
    """Check one dataset's audio headers; returns ``(dataset, summary)``.

    With ``bad_audio: skip`` the returned dataset leaves the problem utterances
    out; with ``fail`` a :class:`BadAudioError` lists them all.
    """
    rows = {uid: dataset.data[uid] for uid in dataset.data_ids}
    key = hashlib.sha1(
        json.dumps(
            [
                sorted((u, r["wav"], r.get("start"), r.get("stop")) for u, r in rows.items()),
                sample_rate,
                max_audio_seconds,
            ]
        ).encode()
    ).hexdigest()
    cache = os.path.join(cache_folder, f"{name}.json") if cache_folder else None
    summary = None
    if cache and os.path.isfile(cache):
        with open(cache) as fin:
            stored = json.load(fin)
        if stored.get("key") == key:
            summary = stored["summary"]
    if summary is None:
        summary = check_rows(rows, sample_rate, max_audio_seconds, num_workers)
        if cache:
            os.makedirs(cache_folder, exist_ok=True)
            atomic_write_text(cache, json.dumps({"key": key, "summary": summary}) + "\n")
    problems: Dict[str, str] = summary["problems"]
    notes = []
    if summary["resampled"]:
        notes.append(f"{summary['resampled']} to be resampled to {sample_rate} Hz")
    if summary["downmixed"]:
        notes.append(f"{summary['downmixed']} to be down-mixed to mono")
    if notes:
        logger.info("%s (%s): %s", name, manifest, ", ".join(notes))
    if problems:
        listed = list(problems.values())
        listing = "\n".join(f"  - {p}" for p in listed[:MAX_LISTED])
        if len(listed) > MAX_LISTED:
            listing += f"\n  ... and {len(listed) - MAX_LISTED} more"
        if bad_audio == "fail":
            raise BadAudioError(
                f"{manifest}: {len(problems)} utterance(s) with bad audio:\n"
                f"{listing}\n(bad_audio: fail; set bad_audio: skip to leave "
                f"them out with a warning)"
            )
        logger.warning(
            "%s (%s): %d utterance(s) with bad audio left out (bad_audio: skip):\n%s",
            name,
            manifest,
            len(problems),
            listing,
        )
        dataset = dataset.filtered_sorted(key_test={"id": lambda uid: uid not in problems})
    return dataset, {"skipped": len(problems), "resampled": summary["resampled"], "downmixed": summary["downmixed"]}


def read_utterance(path: str, start: int = 0, stop: Optional[int] = None, sample_rate: int = 16000) -> torch.Tensor:
    """Decode ``[start, stop)`` of a file (its own sample indices) as mono at ``sample_rate``."""
    data, rate = sf.read(path, start=start, stop=stop, dtype="float32", always_2d=True)
    signal = torch.from_numpy(data).mean(dim=1)
    if rate != sample_rate:
        signal = torchaudio.functional.resample(signal, rate, sample_rate)
    return signal


def make_reader(sample_rate: int, bad_audio: str, training: bool):
    """``read(wav, start, stop) -> signal`` applying the run-time rule of ``bad_audio``."""

    def read(wav: str, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        problem = wav_truncation(wav)  # decoded, it would give the samples before the cut
        if problem is None:
            try:
                signal = read_utterance(wav, start, stop, sample_rate)
                if signal.numel() == 0:
                    problem = "no samples"
                elif not bool(torch.isfinite(signal).all()):
                    problem = "NaN or infinite samples"
            except Exception as err:  # decoding errors come in several types
                problem = f"cannot be decoded ({type(err).__name__}: {err})"
        if problem is None:
            return signal
        if bad_audio == "fail":
            raise BadAudioError(f"{wav}: {problem} (bad_audio: fail)")
        logger.warning(
            "%s: %s; %s (bad_audio: skip)", wav, problem, "its batch is skipped" if training else "read as silence"
        )
        fill = float("nan") if training else 0.0
        return torch.full((int(REPLACEMENT_SECONDS * sample_rate),), fill)

    return read


__all__: List[str] = [
    "BAD_AUDIO",
    "BadAudioError",
    "check_manifest_audio",
    "check_rows",
    "make_reader",
    "read_utterance",
    "row_segment",
    "wav_truncation",
]
