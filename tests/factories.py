"""Builders for the tests: hparams, Brains and models built from a recipe YAML, as recipes/train.py builds them.

A test that builds a Brain from a hand-written dict of hparams gets only the keys it thought of,
and the Brain's defaults fill in the rest; one built here gets every key of the recipe, with the
recipe's objects (features, normaliser, encoder, heads, the ``loss`` object, scheduler,
checkpointer, metrics). The YAML is validated by ``earlyexit_brain.config`` and loaded by
HyperPyYAML with overrides, as the recipe does, into a folder of the test's own.

``TINY`` shrinks the model of the default YAMLs (hparams/synthetic/conformer_ctc_ee.yaml and, for
attention-decoder exits, conformer_aed_ee.yaml) to about 22 thousand parameters (30 thousand with
the decoders): 20 mel bins, 2 Conformer layers of width 16 with an exit after each, 8 CTC outputs.
Any key can be overridden on top, e.g. ``make_brain(tmp_path, num_layers=3, exit_layers=[1, 2, 3])``.
"""

import os
from typing import Optional

from hyperpyyaml import load_hyperpyyaml

from earlyexit_brain.brain import brain_class_for
from earlyexit_brain.config import check_hparams_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CTC_YAML = os.path.join(ROOT, "hparams", "synthetic", "conformer_ctc_ee.yaml")
AED_YAML = os.path.join(ROOT, "hparams", "synthetic", "conformer_aed_ee.yaml")

#: Model sizes for fast tests (the encoder's frame rate and front end are the recipe's).
TINY = dict(n_mels=20, num_layers=2, d_model=16, nhead=2, d_ffn=32, kernel_size=3, exit_layers=[1, 2], output_neurons=8)
#: The attention decoders' sizes to go with ``TINY`` (conformer_aed_ee.yaml's keys).
TINY_AED = dict(TINY, output_neurons=10, decoder_nhead=2, decoder_d_ffn=32, beam_size=2, valid_beam_size=1)


def recipe_hparams(folder, yaml_path: str = CTC_YAML, **overrides) -> dict:
    """The loaded hparams of ``yaml_path`` with ``overrides``, its outputs and data in ``folder``.

    Validated first (``check_hparams_file``: a wrong override is a ``ConfigError`` naming the key),
    as ``recipes/train.py`` does; ``data_folder`` and ``output_folder`` default to ``folder/data``
    and ``folder/out``.
    """
    overrides = {
        "data_folder": os.path.join(str(folder), "data"),
        "output_folder": os.path.join(str(folder), "out"),
        **overrides,
    }
    check_hparams_file(yaml_path, overrides)
    with open(yaml_path) as fin:
        return load_hyperpyyaml(fin, overrides)


def make_brain(
    folder, yaml_path: Optional[str] = None, tokenizer=None, training_steps: int = 100, device: str = "cpu", **overrides
):
    """The recipe's Brain (``brain_class_for``) on ``recipe_hparams(folder, yaml_path, **TINY, **overrides)``.

    ``yaml_path`` defaults to the CTC recipe, or the attention-decoder one when ``overrides`` hold
    ``aed=True`` (then ``TINY_AED`` sizes). The learning-rate schedule gets ``training_steps`` updates
    when the YAML leaves them to the recipe (``num_training_steps: null``). ``tokenizer`` is set as
    the recipe sets it (a SpeechBrain ``SentencePiece`` wrapper with ``.sp``; None when the test
    decodes nothing).
    """
    aed = overrides.pop("aed", False)
    if yaml_path is None:
        yaml_path = AED_YAML if aed else CTC_YAML
    hparams = recipe_hparams(folder, yaml_path, **{**(TINY_AED if aed else TINY), **overrides})
    os.makedirs(hparams["output_folder"], exist_ok=True)  # as sb.create_experiment_directory (train_log.txt)
    scheduler = hparams.get("lr_annealing")
    if scheduler is not None and getattr(scheduler, "num_training_steps", 0) is None:
        scheduler.num_training_steps = training_steps
    brain = brain_class_for(hparams)(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts={"device": device},
        checkpointer=hparams["checkpointer"],
    )
    brain.tokenizer = tokenizer
    return brain
