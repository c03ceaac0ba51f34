"""What a Hub folder is made from: the experiment folder (its report, its training
hyperparameters with their paths resolved, its inference folder), the corpus it names, and the
example audio; the names of the files a Hub folder holds."""

import csv
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import soundfile

from ..audio_check import read_utterance, row_segment
from ..config import ConfigError, read_raw_hparams
from ..utils import looks_like_repo_id

#: The loadables an inference hyperparams.yaml names (besides itself).
MODEL_FILES = (
    "hyperparams.yaml",
    "model.ckpt",
    "normalizer.ckpt",
    "tokenizer.ckpt",
    "exit_policies.ckpt",
    "latency_table.ckpt",
)
EXAMPLE_FILE = "example.wav"
PLOT_FILE = "wer_vs_compute.png"
ONNX_FOLDER = "onnx"  # the ONNX export (fp32 and int8) for the runtime without PyTorch, with --onnx
MAX_EXAMPLE_SECONDS = 10.0
OPTIONAL_FILES = ("ngram_lm.ckpt",)  # the n-gram of models decoded with ctc_beam or a fused aed_beam


#: corpus (matched in the prepare function's module) -> (Hub dataset id, name)
CORPORA = {
    "librispeech": ("openslr/librispeech_asr", "LibriSpeech"),
    "tedlium": ("LIUM/tedlium", "TED-LIUM 3"),
    "synthetic": ("earlyexit_brain-synthetic", "earlyexit_brain synthetic spoken corpus"),
}


class PublishError(ValueError):
    """The experiment cannot be published as asked; the message says why."""


def check_repo_id(repo_id: str) -> str:
    """``OWNER/NAME`` with the Hub's allowed characters, or a :class:`PublishError`."""
    if not looks_like_repo_id(repo_id):
        raise PublishError(
            f"--repo-id: {repo_id!r} is not of the form OWNER/NAME (letters, digits, "
            f"'-', '_' and '.', not starting or ending with '-' or '.', no '--' or '..')"
        )
    return repo_id


def read_experiment(folder: str) -> Dict:
    """Check an experiment folder and return ``report``, ``hparams`` (raw) and ``inference`` (folder)."""
    if not os.path.isdir(folder):
        raise PublishError(f"{folder}: no such experiment folder")
    report_path = os.path.join(folder, "report.json")
    hparams_path = os.path.join(folder, "hyperparams.yaml")
    for path in (report_path, hparams_path):
        if not os.path.isfile(path):
            raise PublishError(
                f"{folder} is not an experiment folder: {os.path.basename(path)} is "
                f"missing (train it with recipes/train.py first)"
            )
    try:
        with open(report_path) as fin:
            report = json.load(fin)
    except json.JSONDecodeError as err:
        raise PublishError(f"{report_path}: not valid JSON ({err})") from None
    if not report.get("exits"):
        raise PublishError(
            f"{report_path}: no per-exit results (the evaluation did not finish; run recipes/evaluate.py {folder})"
        )
    try:
        hparams = resolve_training_paths(read_raw_hparams(hparams_path), folder)
    except ConfigError as err:
        raise PublishError(str(err)) from None
    inference = os.path.join(folder, "inference")
    if not os.path.isdir(inference):
        raise PublishError(
            f"{folder}: no inference/ folder (the best checkpoint exported with its "
            f"calibrated exit policies); run: python recipes/evaluate.py {folder}"
        )
    missing = [name for name in MODEL_FILES if not os.path.isfile(os.path.join(inference, name))]
    if missing:
        raise PublishError(
            f"{inference}: missing {', '.join(missing)} (the checkpoint export is "
            f"incomplete); rerun: python recipes/evaluate.py {folder}"
        )
    return {"report": report, "hparams": hparams, "inference": inference}


#: hyperparams keys naming data paths (``test_csv`` maps test sets to manifests)
DATA_PATH_KEYS = ("data_folder", "train_csv", "valid_csv", "test_csv")


def training_directory(folder: str, hparams: Dict) -> Optional[str]:
    """The directory training ran in, or None when it cannot be told.

    Relative paths in an experiment's ``hyperparams.yaml`` (e.g.
    ``results/synthetic/data/test.csv``) are relative to it. It is known when
    ``output_folder`` is relative and ``folder`` still ends with it: ``folder``
    minus that suffix.
    """
    output = hparams.get("output_folder")
    if not isinstance(output, str) or not output or os.path.isabs(output):
        return None
    here, suffix = os.path.abspath(folder), os.path.normpath(output)
    if suffix.startswith(os.pardir) or not here.endswith(os.sep + suffix):
        return None
    return here[: -len(suffix) - 1] or os.sep


def resolve_training_paths(hparams: Dict, folder: str) -> Dict:
    """``hparams`` with its relative data paths (:data:`DATA_PATH_KEYS`) made absolute
    against the directory training ran in, so publishing works from any directory."""
    base = training_directory(folder, hparams)
    if base is None:
        return hparams

    def resolve(path: Any) -> Any:
        relative = isinstance(path, str) and path and not os.path.isabs(path)
        return os.path.join(base, path) if relative else path

    resolved = dict(hparams)
    for key in set(DATA_PATH_KEYS) & set(hparams):
        value = hparams[key]
        resolved[key] = {k: resolve(v) for k, v in value.items()} if isinstance(value, dict) else resolve(value)
    return resolved


def _not_found_cause(path: str) -> str:
    """Why a path named by the experiment is missing, as the error's remedy says it."""
    if os.path.isabs(path):
        return "the corpus was moved or deleted"
    return (
        f"a path relative to the directory training ran in, which the experiment folder does "
        f"not tell, and not found from this one, {os.getcwd()}: run from that directory"
    )


def corpus_info(hparams: Dict) -> Tuple[str, str]:
    """(Hub dataset id, readable name) of the corpus an experiment was trained on."""
    prepare = str(hparams.get("prepare_corpus", ""))
    for key, info in CORPORA.items():
        if key in prepare:
            return info
    return ("custom", "custom corpus")


def _manifest_rows(path: str, data_folder: str) -> List[Dict]:
    with open(path, newline="") as fin:
        reader = csv.DictReader(fin)
        rows = list(reader)
    if rows and "wav" not in (reader.fieldnames or []):
        raise PublishError(f"{path}: no 'wav' column; pass --example AUDIO")
    for row in rows:
        row["wav"] = row["wav"].replace("$data_root", data_folder)
    return rows


def write_example_audio(hparams: Dict, path: str, source: Optional[str] = None) -> str:
    """Write a 16-bit mono example for the card and the validation.

    ``source`` (an audio file) when given, else the first utterance of at most
    10 s of the experiment's first test set (segments are cut by their
    ``start``/``stop`` samples). Returns the file it came from.
    """

    sample_rate = int(hparams.get("sample_rate", 16000))
    segment, label, hint = (0, None), f"--example: {source}", ""
    if source is None:
        test_csv = hparams.get("test_csv") or {}
        names = hparams.get("test_sets") or list(test_csv)
        if not names or names[0] not in test_csv:
            raise PublishError("the experiment's hyperparams.yaml names no test set; pass --example AUDIO")
        manifest = test_csv[names[0]]
        if not os.path.isfile(manifest):
            raise PublishError(
                f"test manifest not found: {manifest} ({_not_found_cause(manifest)}); pass --example AUDIO"
            )
        rows = _manifest_rows(manifest, str(hparams.get("data_folder", "")))
        if not rows:
            raise PublishError(f"{manifest}: no utterance; pass --example AUDIO")
        row = next((r for r in rows if float(r.get("duration", 0) or 0) <= MAX_EXAMPLE_SECONDS), rows[0])
        source, label, hint = row["wav"], row["wav"], "; pass --example AUDIO"
        if not os.path.isfile(source):
            raise PublishError(
                f"{manifest}: audio not found: {source} ({_not_found_cause(source)}); pass --example AUDIO"
            )
        segment = row_segment(row.get("start"), row.get("stop"))
    elif not os.path.isfile(source):
        raise PublishError(f"--example: {source}: no such audio file")
    try:  # down-mixed and resampled to the model's rate
        signal = read_utterance(source, *segment, sample_rate=sample_rate)
    except Exception as err:
        raise PublishError(f"{label}: cannot be decoded as audio ({err}){hint}") from err
    soundfile.write(path, signal.float().clamp(-1, 1).numpy(), sample_rate, subtype="PCM_16")
    return source
