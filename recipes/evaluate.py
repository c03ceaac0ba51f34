#!/usr/bin/env python3
"""Evaluate a trained early-exit experiment: every exit, then every exit policy.

Usage::

    python recipes/evaluate.py results/synthetic/conformer_ctc_ee/1234 [--key=value ...]
    python recipes/evaluate.py hparams/synthetic/conformer_ctc_ee.yaml [--key=value ...]

Given an experiment folder, its saved ``hyperparams.yaml`` is used (a folder
moved or copied since training has its paths rewritten to point into it, and
exit-policy keys added since it was saved are added with their defaults, so that
they can be overridden). The best
checkpoint (on ``checkpoint_key``) is evaluated at every exit on every test
set; then, on the dev set, each confidence policy's threshold is calibrated
(``calibration_target`` / ``calibration_value``), every policy's thresholds
are swept on the test sets, and the results go into ``report.json``
(``policies``), ``report.md`` and ``wer_vs_compute.png``. The model, its
calibrated thresholds and its latency table are exported to
``<output_folder>/inference`` for :class:`earlyexit_brain.inference.EarlyExitASR`.
"""

import os
import sys

from earlyexit_brain.brain import brain_class_for
from earlyexit_brain.config import ConfigError
from earlyexit_brain.dataio import dataio_prepare
from earlyexit_brain.experiment import (
    check_experiment_folder,
    claim_experiment_folder,
    evaluate_and_report,
    load_recipe_hparams,
    relocated_hparams_file,
    run_recipe,
    tokenizer_or_exit,
    with_evaluation_defaults,
)


def main(argv):
    folder = None
    if argv and os.path.isdir(argv[0]):
        folder = argv[0]
        check_experiment_folder(folder)
        try:
            argv = [with_evaluation_defaults(relocated_hparams_file(argv[0]))] + argv[1:]
        except ConfigError as err:
            sys.exit(f"Configuration error: {err}")
    hparams_file, run_opts, overrides, hparams = load_recipe_hparams(argv)
    if folder is None and os.path.isdir(hparams["output_folder"]):
        claim_experiment_folder(hparams["output_folder"])  # its report and inference/ are rewritten
    if folder is not None and os.path.abspath(hparams["output_folder"]) != os.path.abspath(folder):
        # its checkpoints, log and save folder stay where they are: copy the folder instead
        sys.exit(
            f"Error: key 'output_folder': an experiment folder is evaluated in place; to keep "
            f"{folder}'s report, copy the folder and evaluate the copy (cp -r {folder} "
            f"{hparams['output_folder']} && python recipes/evaluate.py {hparams['output_folder']})"
        )
    for key in ("train_csv", "valid_csv"):
        if not os.path.isfile(hparams[key]):
            sys.exit(
                f"Error: key '{key}': manifest not found: {hparams[key]} (prepare the corpus "
                f"by running recipes/train.py with the same hyperparameters)"
            )

    tokenizer, hparams["ctc_lm_path"] = tokenizer_or_exit(hparams)
    data = dataio_prepare(hparams, tokenizer, hparams["encoder"])
    brain = brain_class_for(hparams)(
        modules=hparams["modules"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    brain.tokenizer = tokenizer
    checkpoint = hparams["checkpointer"].recover_if_possible(min_key=hparams["checkpoint_key"])
    if checkpoint is None:
        sys.exit(f"Error: no checkpoint in {hparams['save_folder']}: train the model first")
    evaluate_and_report(hparams, hparams_file, brain, tokenizer, data)


if __name__ == "__main__":
    run_recipe(main, sys.argv[1:])
