"""Build a Hub folder, validate it (load it back and transcribe the example) and upload it."""

import json
import logging
import os
import shutil
import tempfile
from typing import Dict, Optional

from .. import __version__
from ..files import OWNER_MARKER, atomic_folder, atomic_write_text
from ..inference import EarlyExitASR
from ..onnx_export import export_onnx_folder
from ..runtime import EarlyExitONNX, is_onnx_folder
from .card import build_model_card, encoder_kind
from .experiment import (
    EXAMPLE_FILE,
    MODEL_FILES,
    ONNX_FOLDER,
    OPTIONAL_FILES,
    PLOT_FILE,
    PublishError,
    check_repo_id,
    corpus_info,
    read_experiment,
    write_example_audio,
)

logger = logging.getLogger(__name__)


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
