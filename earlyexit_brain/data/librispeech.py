"""LibriSpeech preparation: SpeechBrain CSV manifests from the standard tree.

Expected layout (as unpacked from openslr.org/12), ``data_folder`` being the
``LibriSpeech`` folder::

    <data_folder>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
    <data_folder>/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt

where each transcript line is ``<speaker>-<chapter>-<utt> WORDS IN CAPITALS``.

Outputs in ``manifest_folder`` (``ID,duration,wav,spk_id,wrd``; ``wav`` is
``$data_root/<split>/...``, which the recipes replace with ``data_folder``, so
manifests survive a move of the corpus):

- ``train.csv``: every split of ``train_splits`` merged;
- ``<split>.csv`` for each split of ``dev_splits`` and ``test_splits``;
- ``librispeech_prepare.json``: the stamp (options, input fingerprint, counts),
  written last.

Durations come from the audio headers (``soundfile.info``), not from decoding.
Every problem (missing split folder, malformed transcript line, missing audio,
unreadable header, wrong sample rate, duplicated ID) is collected with its file
and line; with ``on_error: fail`` (default) one error lists them all and no
manifest is written, with ``on_error: skip`` they are logged as warnings and the
affected utterances (or splits) are left out.

A second call with the same options and unchanged transcript files (paths,
sizes, modification times) returns at once.
"""

import glob
import logging
import os
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
TRAIN_SPLITS = ("train-clean-100", "train-clean-360", "train-other-500")
EVAL_SPLITS = ("dev-clean", "dev-other", "test-clean", "test-other")
SPLITS = TRAIN_SPLITS + EVAL_SPLITS
COLUMNS = ["ID", "duration", "wav", "spk_id", "wrd"]
STAMP = "librispeech_prepare.json"


def _read_transcripts(split_dir: str, split: str, problems: Problems) -> List[Dict]:
    """Utterances of one split from its ``*.trans.txt`` files (no audio access)."""
    utts = []
    files = sorted(glob.glob(os.path.join(split_dir, "*", "*", "*.trans.txt")))
    if not files:
        problems.add(
            split_dir,
            "no <speaker>-<chapter>.trans.txt transcript found under this "
            "split folder (expected <split>/<speaker>/<chapter>/)",
        )
    for path in files:
        prefix = os.path.basename(path)[: -len(".trans.txt")]
        spk = prefix.split("-")[0]
        folder = os.path.dirname(path)
        with open(path, encoding="utf-8", errors="replace") as fin:
            for line_no, line in enumerate(fin, 1):
                if not line.strip():
                    continue
                parts = line.split(maxsplit=1)
                utt_id = parts[0]
                words = " ".join(parts[1].split()).upper() if len(parts) > 1 else ""
                if not utt_id.startswith(prefix + "-"):
                    problems.add(path, f"utterance ID {utt_id!r} does not start with {prefix}-", line_no)
                    continue
                if not words:
                    problems.add(path, f"utterance {utt_id} has an empty transcript", line_no)
                    continue
                utts.append(
                    dict(
                        ID=utt_id,
                        spk_id=spk,
                        wrd=words,
                        split=split,
                        audio=os.path.join(folder, utt_id + ".flac"),
                        source=(path, line_no),
                    )
                )
    return utts


def prepare_librispeech(
    data_folder: str,
    manifest_folder: str,
    train_splits: Sequence[str] = TRAIN_SPLITS,
    dev_splits: Sequence[str] = ("dev-clean",),
    test_splits: Sequence[str] = ("test-clean", "test-other"),
    max_utterances: Optional[int] = None,
    on_error: str = "fail",
    sample_rate: int = 16000,
    num_workers: int = 8,
) -> Dict[str, str]:
    """Write (or reuse) LibriSpeech manifests.

    Arguments
    ---------
    data_folder : str
        The ``LibriSpeech`` folder holding the split folders (read only).
    manifest_folder : str
        Where the manifests and the stamp are written (created if missing).
    train_splits : list of str
        Training splits, merged into ``train.csv`` (may be empty).
    dev_splits, test_splits : list of str
        Splits written to ``<split>.csv`` each.
    max_utterances : int, optional
        At most this many utterances per manifest (the first ones in split,
        speaker, chapter, utterance order; ``train.csv`` counts the merged
        splits): for quick runs. None keeps everything.
    on_error : str
        ``fail``: raise one :class:`CorpusError` listing every problem;
        ``skip``: warn and leave the affected utterances or splits out.
    sample_rate : int
        Expected sample rate of every file (another one is a problem).
    num_workers : int
        Threads reading audio headers.

    Returns
    -------
    dict
        ``train`` and each dev/test split name -> manifest path (only the
        manifests written).
    """
    check_common_options("LibriSpeech", on_error, max_utterances, sample_rate, num_workers)
    train_splits = check_split_list("LibriSpeech", "train_splits", train_splits, SPLITS, True)
    dev_splits = check_split_list("LibriSpeech", "dev_splits", dev_splits, SPLITS, True)
    test_splits = check_split_list("LibriSpeech", "test_splits", test_splits, SPLITS, True)
    if not (train_splits or dev_splits or test_splits):
        raise CorpusError("LibriSpeech corpus options 'train_splits', 'dev_splits' and 'test_splits' are all empty")
    if not os.path.isdir(data_folder):
        raise CorpusError(f"LibriSpeech data_folder is not a folder: {data_folder}")
    data_folder = os.path.abspath(data_folder)
    # only ever a folder this function made: it deletes and rewrites the manifests there
    claim_folder(manifest_folder, "manifest_folder", "manifest_folder", legacy=(STAMP,))

    outputs: Dict[str, List[str]] = {}
    if train_splits:
        outputs["train"] = train_splits
    for split in list(dev_splits) + list(test_splits):
        outputs.setdefault(split, [split])
    paths = {name: os.path.join(manifest_folder, f"{name}.csv") for name in outputs}

    problems = Problems("LibriSpeech")
    split_dirs = {}
    for split in dict.fromkeys(s for splits in outputs.values() for s in splits):
        folder = os.path.join(data_folder, split)
        if os.path.isdir(folder):
            split_dirs[split] = folder
        else:
            problems.add(folder, f"split folder '{split}' not found")
    transcripts = sorted(
        p for folder in split_dirs.values() for p in glob.glob(os.path.join(folder, "*", "*", "*.trans.txt"))
    )
    key = dict(
        version=PREP_VERSION,
        data_folder=data_folder,
        outputs=outputs,
        max_utterances=max_utterances,
        on_error=on_error,
        sample_rate=sample_rate,
        inputs=file_fingerprint(transcripts),
        missing=len(problems),
    )
    stamp = Stamp(os.path.join(manifest_folder, STAMP), key, list(paths.values()))
    if stamp.up_to_date():
        logger.info("LibriSpeech manifests in %s are up to date; reusing them.", manifest_folder)
        return {name: p for name, p in paths.items() if p in stamp.stored_manifests()}
    stamp.invalidate()

    by_split = {split: _read_transcripts(folder, split, problems) for split, folder in split_dirs.items()}
    selected: Dict[str, List[Dict]] = {}
    for name, splits in outputs.items():
        utts = [u for s in splits for u in by_split.get(s, [])]
        selected[name] = utts[:max_utterances] if max_utterances else utts
    seen: Dict[str, str] = {}
    for name, utts in selected.items():
        for u in utts:
            if u["ID"] in seen and seen[u["ID"]] != name:
                path, line = u["source"]
                problems.add(path, f"utterance {u['ID']} also appears in manifest {seen[u['ID']]}", line)
                u["bad"] = True
            seen.setdefault(u["ID"], name)

    todo = [u for utts in selected.values() for u in utts if not u.get("bad")]
    for u in todo:
        if not os.path.isfile(u["audio"]):
            path, line = u["source"]
            problems.add(path, f"audio file not found: {u['audio']}", line)
            u["bad"] = True
    todo = [u for u in todo if not u.get("bad")]
    headers = read_headers([u["audio"] for u in todo], num_workers, f"LibriSpeech: reading {len(todo)} audio headers")
    for u, (frames, rate, err) in zip(todo, headers):
        path, line = u["source"]
        if err is not None:
            problems.add(u["audio"], f"{err} (transcript {path}:{line})")
        elif rate != sample_rate:
            problems.add(u["audio"], f"sample rate {rate} Hz, expected {sample_rate} Hz (corpus option sample_rate)")
        elif frames == 0:
            problems.add(u["audio"], f"no audio samples (transcript {path}:{line})")
        else:
            u["duration"] = frames / rate
            continue
        u["bad"] = True
    problems.resolve(on_error)  # raises before anything is written when on_error is fail

    summary, written = {}, {}
    for name, utts in selected.items():
        rows = [
            dict(
                ID=u["ID"],
                duration=f"{u['duration']:.4f}",
                wav="$data_root/" + os.path.relpath(u["audio"], data_folder).replace(os.sep, "/"),
                spk_id=u["spk_id"],
                wrd=u["wrd"],
            )
            for u in utts
            if not u.get("bad")
        ]
        if not rows:
            logger.warning(
                "LibriSpeech: no usable utterance for manifest %s (splits %s); not written", name, outputs[name]
            )
            continue
        write_manifest(paths[name], rows, COLUMNS)
        written[name] = paths[name]
        summary[name] = dict(
            utterances=len(rows),
            speakers=len({r["spk_id"] for r in rows}),
            hours=round(sum(float(r["duration"]) for r in rows) / 3600.0, 3),
        )
    if train_splits and "train" not in written:
        raise CorpusError(f"LibriSpeech: no usable training utterance in {train_splits} under {data_folder}")
    summary["problems_skipped"] = len(problems)
    stamp.write(list(written.values()), summary)
    logger.info("LibriSpeech manifests written to %s: %s", manifest_folder, summary)
    return written
