"""TED-LIUM release 3 preparation: segment manifests read in place from the ``.sph`` talks.

Expected layout (as unpacked from openslr.org/51), ``data_folder`` being the
``TEDLIUM_release-3`` folder::

    <data_folder>/<partition>/<split>/sph/<talk>.sph
    <data_folder>/<partition>/<split>/stm/<talk>.stm

with ``partition`` ``legacy`` (the release-2 train/dev/test split, the usual
benchmark) or ``speaker-adaptation``, and ``split`` ``train``, ``dev`` or ``test``.

Each stm line is ``<talk> <channel> <speaker> <start> <stop> <label> <words>``
(times in seconds). Preparation keeps one manifest row per segment:

- segments whose words are ``ignore_time_segment_in_scoring`` are dropped;
- words are normalised as SpeechBrain's and Kaldi's TED-LIUM recipes do:
  lower case, the ``<unk>`` mark and other ``<...>``/``{...}``/``[...]`` noise
  marks removed (a literal ``<unk>`` would otherwise be learnt as three
  tokens), a trailing ``(key)`` removed, and split contractions re-attached
  (``it 's`` -> ``it's``, also ``'t 've 'll 'd 'm 're``);
- segments left without words are dropped.

Outputs in ``manifest_folder``: ``<split>.csv`` with columns
``ID,duration,wav,start,stop,spk_id,wrd``: ``wav`` is the talk's ``.sph``
(``$data_root/...``), ``start``/``stop`` are **sample indices** (at the file's
sample rate; ``stop`` exclusive) and ``duration`` is in seconds. The recipes'
audio pipeline reads ``[start, stop)`` from the ``.sph`` on the fly; no cut
copy of the audio is ever written. IDs are ``<talk>-<start cs>-<stop cs>`` (in
centiseconds, as Kaldi's). ``tedlium_prepare.json`` (the stamp) is written last.

Problems (missing split folder, malformed stm line, bad times: not a number,
stop <= start, start beyond the end of the talk or stop more than
:data:`END_TOLERANCE` seconds after it; missing ``.sph``, unreadable header,
wrong sample rate) are collected with file and line and raised together
(``on_error: fail``), or logged and the affected segments or splits left out
(``on_error: skip``). A stop within the tolerance after the end is clipped.
"""

import glob
import logging
import math
import os
import re
from typing import Dict, List, Optional, Sequence

from earlyexit_brain.data.common import (
    CorpusError,
    Problems,
    Stamp,
    check_common_options,
    check_split_list,
    file_fingerprint,
    read_headers,
    write_manifest,
)
from earlyexit_brain.files import claim_folder

logger = logging.getLogger(__name__)

PREP_VERSION = 1
PARTITIONS = ("legacy", "speaker-adaptation")
SPLITS = ("train", "dev", "test")
COLUMNS = ["ID", "duration", "wav", "start", "stop", "spk_id", "wrd"]
STAMP = "tedlium_prepare.json"
IGNORE = "ignore_time_segment_in_scoring"
#: A segment may end at most this many seconds after the end of its talk (then clipped).
END_TOLERANCE = 0.5

_MARK = re.compile(r"^(<[^>]*>|\{[^}]*\}|\[[^\]]*\])$")
_CONTRACTION = re.compile(r" '(s|t|ve|ll|d|m|re)\b")


def normalize_words(words: str) -> str:
    """TED-LIUM transcript normalisation (see the module docstring).

    Example
    -------
    >>> normalize_words("so it 's <unk> what we 've {NOISE} done (2)")
    "so it's what we've done"
    """
    tokens = words.lower().split()
    if tokens and re.fullmatch(r"\([^)]*\)", tokens[-1]):
        tokens = tokens[:-1]
    tokens = [t for t in tokens if not _MARK.match(t)]
    return _CONTRACTION.sub(r"'\1", " ".join(tokens)).strip()


def parse_stm(path: str, problems: Problems) -> Dict:
    """Segments of one stm file: ``{"segments": [...], "ignored": n, "empty": n}``.

    Each segment: ``talk, spk_id, start, stop`` (seconds), ``wrd`` and
    ``source`` (path, line). Bad lines are added to ``problems``.
    """
    segments, ignored, empty = [], 0, 0
    with open(path, encoding="utf-8", errors="replace") as fin:
        for line_no, line in enumerate(fin, 1):
            if not line.strip() or line.startswith(";;"):
                continue
            fields = line.split()
            if len(fields) < 5:
                problems.add(
                    path,
                    "malformed stm line (expected <talk> <channel> <speaker> <start> <stop> <label> <words>)",
                    line_no,
                )
                continue
            talk, _channel, speaker, start_s, stop_s = fields[:5]
            rest = fields[5:]
            if rest and rest[0].startswith("<") and "," in rest[0]:
                rest = rest[1:]  # the <o,f0,male> label
            words = " ".join(rest)
            if words == IGNORE or speaker == "inter_segment_gap":
                ignored += 1
                continue
            try:
                start, stop = float(start_s), float(stop_s)
            except ValueError:
                problems.add(path, f"bad times: start {start_s!r}, stop {stop_s!r} are not numbers", line_no)
                continue
            if not (math.isfinite(start) and math.isfinite(stop)) or start < 0:
                problems.add(path, f"bad times: start {start_s}, stop {stop_s}", line_no)
                continue
            if stop <= start:
                problems.add(path, f"bad times: stop {stop_s} is not after start {start_s}", line_no)
                continue
            wrd = normalize_words(words)
            if not wrd:
                empty += 1
                continue
            segments.append(dict(talk=talk, spk_id=speaker, start=start, stop=stop, wrd=wrd, source=(path, line_no)))
    return dict(segments=segments, ignored=ignored, empty=empty)


def prepare_tedlium(
    data_folder: str,
    manifest_folder: str,
    partition: str = "legacy",
    splits: Sequence[str] = SPLITS,
    max_utterances: Optional[int] = None,
    on_error: str = "fail",
    sample_rate: int = 16000,
    num_workers: int = 8,
) -> Dict[str, str]:
    """Write (or reuse) TED-LIUM 3 segment manifests.

    Arguments
    ---------
    data_folder : str
        The ``TEDLIUM_release-3`` folder (read only).
    manifest_folder : str
        Where ``<split>.csv`` and the stamp are written (created if missing).
    partition : str
        ``legacy`` or ``speaker-adaptation``.
    splits : list of str
        Any of ``train``, ``dev``, ``test``.
    max_utterances : int, optional
        At most this many segments per manifest (the first ones, talks in name
        order): for quick runs. None keeps everything.
    on_error : str
        ``fail``: raise one :class:`CorpusError` listing every problem;
        ``skip``: warn and leave the affected segments or splits out.
    sample_rate : int
        Expected sample rate of every talk (another one is a problem).
    num_workers : int
        Threads reading audio headers.

    Returns
    -------
    dict
        Split name -> manifest path (only the manifests written).
    """
    check_common_options("TED-LIUM", on_error, max_utterances, sample_rate, num_workers)
    if partition not in PARTITIONS:
        raise CorpusError(f"TED-LIUM corpus option 'partition' must be one of {list(PARTITIONS)}, got {partition!r}")
    splits = check_split_list("TED-LIUM", "splits", splits, SPLITS, False)
    if not os.path.isdir(data_folder):
        raise CorpusError(f"TED-LIUM data_folder is not a folder: {data_folder}")
    data_folder = os.path.abspath(data_folder)
    # only ever a folder this function made: it deletes and rewrites the manifests there
    claim_folder(manifest_folder, "manifest_folder", "manifest_folder", legacy=(STAMP,))
    paths = {split: os.path.join(manifest_folder, f"{split}.csv") for split in splits}

    problems = Problems("TED-LIUM")
    stm_files: Dict[str, List[str]] = {}
    for split in splits:
        folder = os.path.join(data_folder, partition, split)
        if not os.path.isdir(os.path.join(folder, "stm")):
            problems.add(folder, f"split folder '{partition}/{split}' (with stm/ and sph/) not found")
            continue
        stm_files[split] = sorted(glob.glob(os.path.join(folder, "stm", "*.stm")))
        if not stm_files[split]:
            problems.add(os.path.join(folder, "stm"), "no .stm file found")
    key = dict(
        version=PREP_VERSION,
        data_folder=data_folder,
        partition=partition,
        splits=splits,
        max_utterances=max_utterances,
        on_error=on_error,
        sample_rate=sample_rate,
        inputs=file_fingerprint([p for files in stm_files.values() for p in files]),
        missing=len(problems),
    )
    stamp = Stamp(os.path.join(manifest_folder, STAMP), key, list(paths.values()))
    if stamp.up_to_date():
        logger.info("TED-LIUM manifests in %s are up to date; reusing them.", manifest_folder)
        return {name: p for name, p in paths.items() if p in stamp.stored_manifests()}
    stamp.invalidate()

    selected: Dict[str, List[Dict]] = {}
    dropped = {"ignored": 0, "empty": 0}
    for split, files in stm_files.items():
        segs: List[Dict] = []
        for path in files:
            parsed = parse_stm(path, problems)
            for k in dropped:
                dropped[k] += parsed[k]
            for seg in parsed["segments"]:
                seg["audio"] = os.path.join(data_folder, partition, split, "sph", seg["talk"] + ".sph")
            segs.extend(parsed["segments"])
        selected[split] = segs[:max_utterances] if max_utterances else segs

    # one header per talk; a missing or unreadable talk is one problem, at its first line
    talks: Dict[str, Dict] = {}
    for segs in selected.values():
        for seg in segs:
            talks.setdefault(seg["audio"], dict(first=seg["source"], n=0))["n"] += 1
    missing = {a for a in talks if not os.path.isfile(a)}
    for audio in sorted(missing):
        path, line = talks[audio]["first"]
        problems.add(
            path, f"audio file not found: {audio} (needed by {talks[audio]['n']} segment(s) of this stm file)", line
        )
    readable = [a for a in talks if a not in missing]
    headers = dict(
        zip(readable, read_headers(readable, num_workers, f"TED-LIUM: reading {len(readable)} talk headers"))
    )
    for audio, (_frames, rate, err) in headers.items():
        path, line = talks[audio]["first"]
        if err is not None:
            problems.add(audio, f"{err} (stm {path}:{line})")
        elif rate != sample_rate:
            problems.add(audio, f"sample rate {rate} Hz, expected {sample_rate} Hz (corpus option sample_rate)")
    summary, written, ids = {}, {}, set()
    rows_by_split: Dict[str, List[Dict]] = {}
    for split, segs in selected.items():
        rows = []
        for seg in segs:
            frames, rate, err = headers.get(seg["audio"], (None, None, "missing"))
            if err is not None or rate != sample_rate:
                continue
            path, line = seg["source"]
            end = frames / rate
            if seg["start"] >= end or seg["stop"] > end + END_TOLERANCE:
                problems.add(
                    path,
                    f"bad times: segment {seg['start']:.2f}-{seg['stop']:.2f} s "
                    f"goes beyond the end of {os.path.basename(seg['audio'])} "
                    f"({end:.2f} s)",
                    line,
                )
                continue
            start = int(round(seg["start"] * rate))
            stop = min(int(round(seg["stop"] * rate)), frames)
            utt_id = f"{seg['talk']}-{int(round(seg['start'] * 100)):07d}-{int(round(seg['stop'] * 100)):07d}"
            if utt_id in ids:
                problems.add(path, f"segment {utt_id} appears twice", line)
                continue
            ids.add(utt_id)
            rows.append(
                dict(
                    ID=utt_id,
                    duration=f"{(stop - start) / rate:.4f}",
                    wav="$data_root/" + os.path.relpath(seg["audio"], data_folder).replace(os.sep, "/"),
                    start=start,
                    stop=stop,
                    spk_id=seg["spk_id"],
                    wrd=seg["wrd"],
                )
            )
        rows_by_split[split] = rows
    problems.resolve(on_error)  # raises before anything is written when on_error is fail

    for split, rows in rows_by_split.items():
        if not rows:
            logger.warning("TED-LIUM: no usable segment for split %s; manifest not written", split)
            continue
        write_manifest(paths[split], rows, COLUMNS)
        written[split] = paths[split]
        summary[split] = dict(
            utterances=len(rows),
            speakers=len({r["spk_id"] for r in rows}),
            hours=round(sum(float(r["duration"]) for r in rows) / 3600.0, 3),
        )
    if not written:
        raise CorpusError(f"TED-LIUM: no usable segment in {partition}/{splits} under {data_folder}")
    summary.update(
        dropped_ignore_segments=dropped["ignored"],
        dropped_empty_segments=dropped["empty"],
        problems_skipped=len(problems),
    )
    stamp.write(list(written.values()), summary)
    logger.info("TED-LIUM manifests written to %s: %s", manifest_folder, summary)
    return written
