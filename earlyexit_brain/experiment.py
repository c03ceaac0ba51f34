"""Steps shared by ``recipes/train.py`` and ``recipes/evaluate.py``."""

import logging
import os
import re
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

import speechbrain as sb
import yaml
from hyperpyyaml import load_hyperpyyaml
from speechbrain.tokenizers.SentencePiece import SentencePiece

from .checkpoints import CheckpointMismatchError
from .config import ConfigError, check_device, check_hparams_file, read_raw_hparams
from .decoding.attention import AED_LM_DEFAULTS
from .decoding.ngram import lm_summary, prepare_recipe_lm
from .evaluation import POLICY_DEFAULTS, run_policy_evaluation
from .files import OWNER_MARKER, NotOurFolderError, atomic_write_text, claim_folder, owned
from .report import build_report, write_report
from .utils import uses_decoders

logger = logging.getLogger(__name__)


def load_recipe_hparams(argv: List[str]):
    """``sb.parse_arguments``, then validation (exits with a message naming the key), then load.

    Returns ``(hparams_file, run_opts, overrides, hparams)``.
    """
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    try:
        if run_opts.get("device"):
            check_device(run_opts["device"])
        check_hparams_file(hparams_file, overrides)
    except ConfigError as err:
        sys.exit(f"Configuration error: {err}")
    with open(hparams_file) as fin:
        hparams = load_hyperpyyaml(fin, overrides)
    return hparams_file, run_opts, overrides, hparams


def changed_hyperparameters(output_folder: str, checkpointer, hparams_file: str, overrides=None) -> List[str]:
    """``"key: old -> new"`` for every top-level key whose value differs between the
    ``hyperparams.yaml`` that an experiment folder saved and this run's file with its
    overrides, when the run will resume (``checkpointer`` lists a checkpoint); else ``[]``.

    Call it before ``create_experiment_directory``, which overwrites the saved file.
    Objects (``!new:`` ...) are compared by their class only; their arguments are
    usually references to top-level keys, which are compared.
    """
    saved = os.path.join(output_folder, "hyperparams.yaml")
    if not (os.path.isfile(saved) and checkpointer.list_checkpoints()):
        return []
    try:
        old = read_raw_hparams(saved)
    except ConfigError:  # a saved file this version cannot read: nothing to compare
        return []
    new = read_raw_hparams(hparams_file, overrides)
    absent = "(absent)"

    def show(value):
        text = value if value is absent else repr(value)
        return text if len(text) <= 60 else text[:57] + "..."

    return [
        f"{key}: {show(old.get(key, absent))} -> {show(new.get(key, absent))}"
        for key in sorted(set(old) | set(new))
        if old.get(key, absent) != new.get(key, absent)
    ]


def warn_changed_hyperparameters(output_folder: str, changes: List[str]) -> None:
    """Log what :func:`changed_hyperparameters` found (main process only)."""
    if changes and sb.utils.distributed.if_main_process():
        logger.warning(
            "Resuming the experiment in %s, whose saved hyperparams.yaml differs from "
            "this run's in %d key(s):\n  %s\nTraining continues from its last "
            "checkpoint with this run's values. To start afresh, choose another "
            "output_folder (or seed) or delete that folder.",
            output_folder,
            len(changes),
            "\n  ".join(changes),
        )


def relocated_hparams_file(folder: str) -> str:
    """The ``hyperparams.yaml`` of an experiment ``folder``, its paths pointing into ``folder``.

    SpeechBrain saves the file with every reference resolved, so once the folder is
    moved or copied, its ``output_folder``, ``save_folder``, ``train_log`` and the
    checkpointer's and logger's arguments still name the old place: evaluating the
    copy would read the original's checkpoints and append to its log. When the saved
    ``output_folder`` is not ``folder``, every path under it is rewritten to lie
    under ``folder``, in place (or, if the folder is read-only, in a temporary copy
    whose path is returned), with a warning.
    """
    saved = os.path.join(folder, "hyperparams.yaml")
    old = read_raw_hparams(saved).get("output_folder")
    if not isinstance(old, str) or os.path.abspath(old) == os.path.abspath(folder):
        return saved
    with open(saved) as fin:
        text = fin.read()
    target = os.path.normpath(folder)
    pattern = re.compile(r"(?<![\w./-])" + re.escape(os.path.normpath(old)) + r"(?=[/\s'\"]|$)", re.M)
    text, count = pattern.subn(lambda _: target, text)
    path = _rewrite(saved, text)
    logger.warning(
        "%s was saved as %s: %d path(s) in its hyperparams.yaml now point into %s (%s)",
        folder,
        old,
        count,
        target,
        path,
    )
    return path


def with_evaluation_defaults(hparams_file: str) -> str:
    """``hparams_file`` with every evaluation key this version reads: the exit policies'
    (:data:`~earlyexit_brain.evaluation.POLICY_DEFAULTS`; for attention-decoder models
    also the fused n-gram's, :data:`~earlyexit_brain.models.decoders.AED_LM_DEFAULTS`)
    that it lacks appended with the value the code assumes when it is absent.

    An experiment folder saved before a key existed behaves the same either way, but
    hyperpyyaml refuses an override of a key the file does not have: with the key
    added, ``recipes/evaluate.py <old folder> --calibration_confidence=0.9`` works.
    Written in place (or, if that fails, to a temporary copy whose path is returned);
    a file that has every key is returned untouched.
    """
    raw = read_raw_hparams(hparams_file)
    defaults = dict(POLICY_DEFAULTS, **(AED_LM_DEFAULTS if uses_decoders(raw) else {}))
    absent = {key: value for key, value in defaults.items() if key not in raw}
    if not absent:
        return hparams_file
    with open(hparams_file) as fin:
        text = fin.read()
    text = (
        text.rstrip("\n") + "\n\n# Keys added since this experiment was saved, with the "
        "values the code assumes when they are absent (recipes/evaluate.py)\n"
        + yaml.safe_dump(absent, default_flow_style=False, sort_keys=False)
    )
    path = _rewrite(hparams_file, text)
    logger.warning(
        "%s lacked the key(s) %s: added with the values assumed when absent (%s)", hparams_file, ", ".join(absent), path
    )
    return path


def _rewrite(path: str, text: str) -> str:
    """Replace ``path`` with ``text`` atomically (a crash leaves the old file or the new
    one, never a truncated one; the permissions are kept), or write a temporary copy if
    its folder cannot be written; returns the path written."""
    try:
        atomic_write_text(path, text)
        return path
    except OSError:
        with tempfile.NamedTemporaryFile("w", suffix="_hyperparams.yaml", delete=False) as fout:
            fout.write(text)
        return fout.name


#: Files that only an experiment folder of an earlier version (without the marker) holds
#: (``save/`` with checkpoints in it: building the YAML's checkpointer creates it empty).
EXPERIMENT_LEGACY = ("train_log.txt", "report.json", "save/")


def claim_experiment_folder(folder: str) -> None:
    """Create or accept ``output_folder`` as an experiment folder (main process only): one
    that is not empty and that this package did not make is refused
    (:class:`~earlyexit_brain.files.NotOurFolderError`), before SpeechBrain writes its
    ``hyperparams.yaml`` and logs into it."""
    sb.utils.distributed.run_on_main(claim_folder, args=[folder, "experiment", "output_folder", EXPERIMENT_LEGACY])


def check_experiment_folder(folder: str) -> None:
    """Exit with an error unless ``folder`` is an experiment folder this package made."""
    if not os.path.isfile(os.path.join(folder, "hyperparams.yaml")):
        sys.exit(f"Error: {folder} is not an experiment folder (no hyperparams.yaml in it)")
    if not owned(folder, "experiment", EXPERIMENT_LEGACY):
        sys.exit(
            f"Error: {folder} is not an experiment folder made by recipes/train.py (no "
            f"{OWNER_MARKER}, train_log.txt, report.json or save/ in it); refusing to "
            f"rewrite its hyperparams.yaml"
        )


def run_recipe(main, argv: List[str]) -> None:
    """Run a recipe's ``main(argv)``; a checkpoint that does not fit the configuration
    (:class:`~earlyexit_brain.checkpoints.CheckpointMismatchError`) or a folder the recipe
    may not write into (:class:`~earlyexit_brain.files.NotOurFolderError`) ends it with
    its message instead of a traceback."""
    try:
        main(argv)
    except CheckpointMismatchError as err:
        sys.exit(f"Checkpoint error: {err}")
    except NotOurFolderError as err:
        sys.exit(f"Error: {err}")


def tokenizer_or_exit(hparams: Dict) -> Tuple[SentencePiece, Optional[str]]:
    """:func:`build_tokenizer`, then the recipe's n-gram LM (``ngram_order``, see
    :func:`earlyexit_brain.decoding.ngram.prepare_recipe_lm`), exiting with the
    configuration error if there is one. Returns ``(tokenizer, lm_path)``: the recipe sets its
    ``ctc_lm_path`` to ``lm_path``."""
    try:
        tokenizer = build_tokenizer(hparams)
        lm_path = prepare_recipe_lm(hparams)
    except (ConfigError, ValueError) as err:
        sys.exit(f"Configuration error: {err}")
    return tokenizer, lm_path


def build_tokenizer(hparams: Dict) -> SentencePiece:
    """Train (or reuse) the SentencePiece tokenizer on the training manifest."""
    tokenizer = SentencePiece(
        model_dir=hparams["save_folder"],
        vocab_size=hparams["output_neurons"],
        annotation_train=hparams["train_csv"],
        annotation_read="wrd",
        model_type=hparams["token_type"],
        character_coverage=1.0,
        bos_id=hparams.get("bos_index", -1),  # attention decoders: bos/eos tokens
        eos_id=hparams.get("eos_index", -1),
        unk_id=hparams["blank_index"],
    )
    size = tokenizer.sp.vocab_size()
    if size > hparams["output_neurons"]:
        raise ConfigError(
            f"key 'output_neurons' ({hparams['output_neurons']}) is smaller than the "
            f"tokenizer's vocabulary ({size}); set output_neurons to at least {size}"
        )
    return tokenizer


def evaluate_and_report(hparams: Dict, hparams_file: str, brain, tokenizer, data) -> Dict[str, str]:
    """Evaluate every exit on every test set (best checkpoint), then the exit policies; write the report.

    ``data`` is :func:`earlyexit_brain.dataio.dataio_prepare`'s result. The report's ``train``
    facts are the epoch counter and training clock as they stand when this is called (the best
    checkpoint loaded for evaluation may be older). Returns the paths written (``json``, ``md``,
    ``plot``), or {} on non-main DDP processes.
    """
    trained = {"epochs": hparams["epoch_counter"].current, "seconds": hparams["train_clock"].seconds}
    for name, dataset in data.tests.items():
        brain.evaluate_set(name, dataset, data.loaders["test"], min_key=hparams["checkpoint_key"])
    if not sb.utils.distributed.if_main_process():
        return {}
    report = build_report(
        hparams["encoder"],
        hparams["ctc_heads"],
        brain.test_results,
        train=trained,
        decoders=hparams.get("decoders"),
        extra={
            "hparams_file": os.path.basename(hparams_file),
            "exit_layers": list(hparams["encoder"].exit_layers),
            "evaluated_epoch": hparams["epoch_counter"].current,
            "checkpoint_key": hparams["checkpoint_key"],
            "averaged_checkpoints": int(getattr(brain, "averaged_checkpoints", 1)),
            "processes": int(os.environ.get("WORLD_SIZE", "1")),  # DDP processes (torchrun)
            "token_type": hparams["token_type"],
            "test_decoders": brain.stage_decoders(sb.Stage.TEST),
            "ctc_lm": lm_summary(hparams),
            "vocab_size": tokenizer.sp.vocab_size(),
            "train_utterances": len(data.train),
            # per set: utterances left out for bad audio, files resampled / down-mixed
            "audio_check": data.audio_check,
        },
    )
    if hparams.get("policy_evaluation", True):
        report.update(
            run_policy_evaluation(
                hparams,
                tokenizer.sp,
                data.valid,
                data.tests,
                tokenizer.prefix_model_file + ".model",
                controller_data=data.controller,
            )
        )
    paths = write_report(report, hparams["output_folder"])
    print()
    print(open(paths["md"]).read())
    print(f"Outputs in {os.path.abspath(hparams['output_folder'])}:")
    for kind, path in paths.items():
        print(f"  {kind:9s} {os.path.abspath(path)}")
    print(f"  log       {os.path.abspath(hparams['train_log'])}")
    if "inference_folder" in report:
        print(f"  inference {report['inference_folder']}")
    return paths
