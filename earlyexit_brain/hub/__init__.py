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

from .card import build_model_card, encoder_kind, eval_results  # noqa: F401
from .experiment import (  # noqa: F401
    CORPORA,
    DATA_PATH_KEYS,
    EXAMPLE_FILE,
    MAX_EXAMPLE_SECONDS,
    MODEL_FILES,
    ONNX_FOLDER,
    OPTIONAL_FILES,
    PLOT_FILE,
    PublishError,
    check_repo_id,
    corpus_info,
    read_experiment,
    resolve_training_paths,
    training_directory,
    write_example_audio,
)
from .folder import add_onnx_folder, build_hub_folder, hub_token, upload_hub_folder, validate_hub_folder  # noqa: F401
