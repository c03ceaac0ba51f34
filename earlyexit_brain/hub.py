"""Publish a trained experiment to the Hugging Face Hub.

:func:`build_hub_folder` turns an experiment folder (``report.json``,
``hyperparams.yaml`` and the ``inference/`` folder that training or
``recipes/evaluate.py`` exports from the best checkpoint) into a Hub-ready
folder: the inference ``hyperparams.yaml`` and the loadables it names
(``model.ckpt``, ``normalizer.ckpt``, ``tokenizer.ckpt``,
``exit_policies.ckpt``, ``latency_table.ckpt``), ``config.json``, an example
audio file, the WER-vs-compute plot, ``report.json`` and a ``README.md`` model
card. :func:`validate_hub_folder` loads the folder back with
:class:`~earlyexit_brain.inference.EarlyExitASR` and with SpeechBrain's stock
``EncoderASR`` and transcribes the example; :func:`upload_hub_folder` creates
the repository and uploads the folder with ``HfApi``. ``recipes/publish.py`` is
the command line; see docs/publishing.md.
"""

import csv
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import soundfile

from . import __version__
from .config import ConfigError, read_raw_hparams
from .report import report_markdown
from .files import OWNER_MARKER, atomic_folder, atomic_write_text
from .audio_check import read_utterance, row_segment
from .inference import EarlyExitASR
from .onnx_export import export_onnx_folder
from .runtime import EarlyExitONNX, is_onnx_folder
from .utils import looks_like_repo_id

logger = logging.getLogger(__name__)

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


def eval_results(report: Dict, dataset: Tuple[str, str]):
    """One huggingface_hub EvalResult per exit and test set (WER in percent)."""
    from huggingface_hub import EvalResult

    results = []
    for entry in report["exits"]:
        for set_name, stats in entry["sets"].items():
            results.append(
                EvalResult(
                    task_type="automatic-speech-recognition",
                    task_name="Speech Recognition",
                    dataset_type=dataset[0],
                    dataset_name=dataset[1],
                    dataset_split=set_name,
                    metric_type="wer",
                    metric_value=float(stats["wer"]),
                    metric_name=f"WER exit {entry['exit']} (layer {entry['layer']})",
                )
            )
    return results


CARD_TEMPLATE = """
# {title}

An **early-exit** speech recogniser trained with earlyexit_brain on SpeechBrain: one
{encoder_kind} of {num_layers} layers with {exit_kind} after layers {exit_layers}, trained with
the multi-exit loss of Wright et al., *Training early-exit architectures for automatic speech
recognition* (arXiv 2309.09546), on the {dataset_name}. At inference the model stops at the exit
chosen by a fixed depth, a latency budget or a confidence policy, and the layers above it are not
computed.

## Usage

```python
# pip install earlyexit_brain
from earlyexit_brain.inference import EarlyExitASR

asr = EarlyExitASR.from_hparams(source="{repo_id}", savedir="pretrained_models/{name}")
asr.transcribe_file("example.wav")                 # calibrated default policy ({default})
asr.transcribe_file("example.wav", exit=1)         # the first exit: fastest
asr.transcribe_file("example.wav", policy="entropy", threshold=0.2)
asr.transcribe_file("example.wav", policy="budget", threshold=50)   # milliseconds
```

From the command line: `python -m earlyexit_brain.transcribe {repo_id} example.wav --exit 1`.

Plain SpeechBrain (no dynamic exits; the default exit, {default_exit}; greedy CTC decoding, so
without any beam search or n-gram LM listed under Results), with `earlyexit_brain` installed
for the model classes:

```python
from speechbrain.inference.ASR import EncoderASR

asr = EncoderASR.from_hparams(source="{repo_id}", savedir="pretrained_models/{name}")
asr.transcribe_file("example.wav")
```

{onnx_section}## Results

{tables}

![WER against the average number of encoder layers computed]({plot})

## Files

`hyperparams.yaml` (inference configuration), `model.ckpt` (encoder, exit heads and any exit decoders),
`normalizer.ckpt` (feature statistics), `tokenizer.ckpt` (SentencePiece), `exit_policies.ckpt`
(calibrated thresholds), `latency_table.ckpt` (per-exit latency measured on the training machine;
re-measure it on yours for the `budget` policy), `ngram_lm.ckpt` when the model decodes with CTC
beam search and a word n-gram, or fuses one into its attention search (ARPA text), `report.json`
(every figure above), `example.wav`{onnx_files}.

Published with earlyexit_brain {version}.
"""


def encoder_kind(hparams: Dict) -> Tuple[str, str]:
    """(words, tag) for the model card from the experiment's ``encoder`` entry."""
    if "ssl" in str(hparams.get("encoder", "")).lower():
        return ("pre-trained self-supervised (wav2vec2-family) encoder, fine-tuned,", "wav2vec2")
    if "splitformer" in str(hparams.get("encoder", "")).lower():
        return (
            "Splitformer encoder (a Conformer with parallel downsampled layers beside the blocks of some exits)",
            "splitformer",
        )
    return ("Conformer encoder", "conformer")


ONNX_SECTION = """## Without PyTorch (ONNX)

`onnx/` holds the model as ONNX graphs, fp32 and int8 (the front end, one graph per encoder
segment between exits, one per exit head), for onnxruntime with numpy, sentencepiece and
soundfile only; decoding is greedy CTC (no beam search or n-gram LM):

```python
# EARLYEXIT_BRAIN_RUNTIME_ONLY=1 pip install "earlyexit_brain[runtime]"
from earlyexit_brain.runtime import EarlyExitONNX

asr = EarlyExitONNX.from_folder("onnx", threads=2)         # precision="int8" for the int8 graphs
asr.transcribe_file("example.wav", policy="entropy")
```

"""


def build_model_card(
    report: Dict,
    repo_id: str,
    dataset: Tuple[str, str],
    policies: Dict,
    license: str = "apache-2.0",
    language: str = "en",
    with_plot: bool = True,
    encoder: Tuple[str, str] = ("Conformer encoder", "conformer"),
    with_onnx: bool = False,
):
    """The model card (huggingface_hub ``ModelCard``) with a model-index of every exit's WER."""
    from huggingface_hub import ModelCard, ModelCardData

    name = repo_id.split("/")[1]
    data = ModelCardData(
        language=language,
        license=license,
        library_name="speechbrain",
        pipeline_tag="automatic-speech-recognition",
        tags=["early-exit", "speechbrain", "earlyexit_brain", "ctc", encoder[1], "speech"],
        datasets=[dataset[0]],
        metrics=["wer"],
        model_name=name,
        eval_results=eval_results(report, dataset),
    )
    default = policies.get("default") or {"policy": "fixed"}
    default_text = (
        f"{default['policy']} {default['threshold']:.4g}"
        if default.get("threshold") is not None
        else f"exit {default.get('exit', len(report['exits']))}"
    )
    tables = report_markdown(report).split("\n", 1)[1].strip()  # without its title
    body = CARD_TEMPLATE.format(
        title=name,
        encoder_kind=encoder[0],
        num_layers=report.get("num_layers", "?"),
        exit_kind=(
            "a CTC head and an attention decoder (joint CTC/attention beam search) at an exit"
            if "aed_beam" in report.get("test_decoders", [])
            else "a CTC exit"
        ),
        exit_layers=", ".join(str(e["layer"]) for e in report["exits"]),
        dataset_name=dataset[1],
        repo_id=repo_id,
        name=name,
        default=default_text,
        default_exit=default.get("exit") or len(report["exits"]),
        tables=tables,
        plot=PLOT_FILE if with_plot else "",
        version=__version__,
        onnx_section=ONNX_SECTION if with_onnx else "",
        onnx_files=(
            ", `onnx/` (the ONNX export: `manifest.json` lists every file with its sha256)" if with_onnx else ""
        ),
    )
    if not with_plot:
        body = body.replace("![WER against the average number of encoder layers computed]()\n", "")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def build_hub_folder(
    experiment: str,
    out: str,
    repo_id: str,
    license: str = "apache-2.0",
    language: str = "en",
    example: Optional[str] = None,
    onnx: bool = False,
) -> str:
    """Build the Hub folder for ``experiment`` at ``out``; returns ``out``.

    With ``onnx``, the folder gets ``onnx/``: the experiment's ONNX export when it has one
    with fp32 and int8 graphs (``recipes/export.py --int8``), else one exported now
    (:func:`~earlyexit_brain.onnx_export.export_onnx_folder`, checked against PyTorch).

    ``out`` is replaced atomically, and only if it is absent, empty or a Hub folder this
    function built (:func:`~earlyexit_brain.files.atomic_folder`): ``--out .`` or any
    other folder is refused with a :class:`~earlyexit_brain.files.NotOurFolderError`.
    """
    check_repo_id(repo_id)
    exp = read_experiment(experiment)
    out = os.path.abspath(out)
    with atomic_folder(out, "hub_folder", "--out", prefix=".hub-", legacy=("exit_policies.ckpt",)) as tmp:
        for name in MODEL_FILES + OPTIONAL_FILES:
            if name in MODEL_FILES or os.path.isfile(os.path.join(exp["inference"], name)):
                shutil.copyfile(os.path.join(exp["inference"], name), os.path.join(tmp, name))
        with open(os.path.join(tmp, "exit_policies.ckpt")) as fin:
            policies = json.load(fin)
        plot = os.path.join(experiment, PLOT_FILE)
        if os.path.isfile(plot):
            shutil.copyfile(plot, os.path.join(tmp, PLOT_FILE))
        source = write_example_audio(exp["hparams"], os.path.join(tmp, EXAMPLE_FILE), example)
        logger.info("example audio from %s", source)
        report = exp["report"]
        atomic_write_text(
            os.path.join(tmp, "report.json"),
            json.dumps({k: v for k, v in report.items() if k != "inference_folder"}, indent=2) + "\n",
        )
        dataset = corpus_info(exp["hparams"])
        default = policies.get("default") or {}
        config = {
            # what SpeechBrain's Hub integration reads: the stock interface (default exit)
            "speechbrain": {"interface": "EncoderASR"},
            "earlyexit_brain": {
                "interface": "earlyexit_brain.inference.EarlyExitASR",
                "version": __version__,
                "num_layers": report.get("num_layers"),
                "exit_layers": [e["layer"] for e in report["exits"]],
                "default_policy": default,
                "sample_rate": int(exp["hparams"].get("sample_rate", 16000)),
                "corpus": dataset[1],
            },
        }
        if onnx:
            add_onnx_folder(experiment, exp["inference"], os.path.join(tmp, ONNX_FOLDER))
            config["earlyexit_brain"]["onnx"] = {
                "folder": ONNX_FOLDER,
                "precisions": ["fp32", "int8"],
                "interface": "earlyexit_brain.runtime.EarlyExitONNX",
            }
        atomic_write_text(os.path.join(tmp, "config.json"), json.dumps(config, indent=2) + "\n")
        card = build_model_card(
            report,
            repo_id,
            dataset,
            policies,
            license,
            language,
            with_plot=os.path.isfile(plot),
            encoder=encoder_kind(exp["hparams"]),
            with_onnx=onnx,
        )
        atomic_write_text(os.path.join(tmp, "README.md"), str(card))
    return out


def add_onnx_folder(experiment: str, inference: str, dest: str):
    """Copy the experiment's ONNX export (fp32 and int8) to ``dest``, or export one there."""
    source = os.path.join(experiment, ONNX_FOLDER)
    if is_onnx_folder(source):
        with open(os.path.join(source, "manifest.json")) as fin:
            precisions = set(json.load(fin).get("precisions", {}))
        if {"fp32", "int8"} <= precisions:
            shutil.copytree(source, dest, ignore=shutil.ignore_patterns(OWNER_MARKER))
            return
        logger.info("%s has no int8 graphs: exporting the model again", source)
    export_onnx_folder(inference, dest, int8=True)
    os.remove(os.path.join(dest, OWNER_MARKER))  # the Hub folder's marker covers it


def validate_hub_folder(folder: str) -> Dict[str, str]:
    """Load ``folder`` with EarlyExitASR and stock EncoderASR and transcribe the example; with
    an ``onnx/`` folder, also load it with the runtime (fp32 and int8) and transcribe the
    example at every exit.

    Returns ``{"earlyexit_brain": text, "encoder_asr": text}`` (and ``onnx_fp32``,
    ``onnx_int8``); raises :class:`PublishError` naming the step that failed.
    """
    from speechbrain.inference.ASR import EncoderASR

    example = os.path.join(folder, EXAMPLE_FILE)
    for name in MODEL_FILES + (EXAMPLE_FILE, "README.md", "config.json"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise PublishError(f"{folder}: {name} is missing")
    texts = {}
    with tempfile.TemporaryDirectory() as savedir:
        try:
            asr = EarlyExitASR.from_hparams(source=folder, savedir=os.path.join(savedir, "ee"))
            result = asr.transcribe_file(example)
            for k in range(1, asr.num_exits + 1):
                asr.transcribe_file(example, exit=k)
            texts["earlyexit_brain"] = result.text
        except Exception as err:
            raise PublishError(
                f"{folder}: EarlyExitASR could not load the folder and transcribe "
                f"{EXAMPLE_FILE}: {type(err).__name__}: {err}"
            ) from err
        try:
            stock = EncoderASR.from_hparams(source=folder, savedir=os.path.join(savedir, "stock"))
            texts["encoder_asr"] = stock.transcribe_file(example)
        except Exception as err:
            raise PublishError(
                f"{folder}: SpeechBrain's EncoderASR could not load the folder and "
                f"transcribe {EXAMPLE_FILE}: {type(err).__name__}: {err}"
            ) from err
    onnx = os.path.join(folder, ONNX_FOLDER)
    if os.path.isdir(onnx):
        for precision in ("fp32", "int8"):
            try:
                runtime = EarlyExitONNX.from_folder(onnx, precision=precision)
                texts[f"onnx_{precision}"] = runtime.transcribe_file(example).text
                for k in range(1, runtime.num_exits + 1):
                    runtime.transcribe_file(example, exit=k)
            except Exception as err:
                raise PublishError(
                    f"{onnx}: the ONNX runtime could not load its {precision} graphs and "
                    f"transcribe {EXAMPLE_FILE}: {type(err).__name__}: {err}"
                ) from err
    return texts


def hub_token() -> Optional[str]:
    """``HF_TOKEN``, else the token of ``hf auth login``; None when there is neither."""
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token()


def upload_hub_folder(
    folder: str,
    repo_id: str,
    private: bool = False,
    exist_ok: bool = False,
    token: Optional[str] = None,
    api=None,
    message: Optional[str] = None,
) -> str:
    """Create ``repo_id`` and upload ``folder`` with ``HfApi``; returns the commit URL.

    The token is passed to ``HfApi`` only; it is never printed or logged.
    """
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    token = token or hub_token()
    if not token:
        raise PublishError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry-run to build the folder only)"
        )
    api = api if api is not None else HfApi(token=token)
    if api.repo_exists(repo_id, repo_type="model") and not exist_ok:
        raise PublishError(f"{repo_id} already exists on the Hub; pass --exist-ok to upload a new revision to it")
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=exist_ok)
    logger.info("uploading %s to %s", folder, url)
    commit = api.upload_folder(
        folder_path=folder,
        repo_id=repo_id,
        repo_type="model",
        commit_message=message or f"Upload early-exit model ({__version__})",
        ignore_patterns=[OWNER_MARKER],
    )
    return str(getattr(commit, "commit_url", commit))
