#!/usr/bin/env python3
"""Train and evaluate an early-exit CTC speech recogniser.

Usage::

    python recipes/train.py hparams/synthetic/conformer_ctc_ee.yaml [--key=value ...]

The YAML chooses the corpus (its ``prepare_corpus`` function and
``corpus_options``), the encoder, the tokenizer and every training option;
any key can be overridden on the command line. Outputs in ``output_folder``:
``train_log.txt``, ``report.json``, ``report.md``, ``wer_vs_compute.png``,
per-exit alignment files ``wer_<set>_exit<k>.txt``, checkpoints in ``save/``
and, after the exit-policy evaluation (``policy_evaluation: True``), an
``inference/`` folder that ``EarlyExitASR.from_hparams`` loads. Rerunning the
same command resumes from the last checkpoint.
"""

import logging
import os
import sys

import speechbrain as sb
import torch
from speechbrain.utils.distributed import run_on_main

from earlyexit_brain.brain import brain_class_for
from earlyexit_brain.data.common import CorpusError
from earlyexit_brain.dataio import dataio_prepare
from earlyexit_brain.experiment import (
    changed_hyperparameters,
    claim_experiment_folder,
    evaluate_and_report,
    load_recipe_hparams,
    run_recipe,
    tokenizer_or_exit,
    warn_changed_hyperparameters,
)

logger = logging.getLogger(__name__)


def main(argv):
    hparams_file, run_opts, overrides, hparams = load_recipe_hparams(argv)

    sb.utils.distributed.ddp_init_group(run_opts)
    claim_experiment_folder(hparams["output_folder"])  # never another folder of the user's
    # read before create_experiment_directory overwrites the saved hyperparams.yaml
    changes = changed_hyperparameters(hparams["output_folder"], hparams["checkpointer"], hparams_file, overrides)
    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
        overrides=overrides,
    )
    warn_changed_hyperparameters(hparams["output_folder"], changes)

    # Corpus preparation (on the main process only), chosen by the YAML. A corpus
    # with problems stops here, before training, with every problem listed.
    try:
        run_on_main(
            hparams["prepare_corpus"],
            kwargs={"data_folder": hparams["data_folder"], **hparams.get("corpus_options", {})},
        )
    except CorpusError as err:
        sys.exit(f"Corpus error: {err}")

    tokenizer, hparams["ctc_lm_path"] = tokenizer_or_exit(hparams)
    data = dataio_prepare(hparams, tokenizer, hparams["encoder"])
    train_data, valid_data, loaders = data.train, data.valid, data.loaders

    for key in ("lr_annealing", "ssl_lr_annealing"):
        scheduler = hparams.get(key)
        if scheduler is not None and getattr(scheduler, "num_training_steps", 0) is None:
            # "auto": the number of updates this run will make
            train_loader = loaders["train"]
            batches = (
                len(train_loader["batch_sampler"])
                if "batch_sampler" in train_loader
                else -(-len(train_data) // train_loader["batch_size"])
            )
            world = int(os.environ.get("WORLD_SIZE", "1"))  # DDP splits the batches
            scheduler.num_training_steps = -(-batches // world) * hparams["number_of_epochs"]
            logger.info("%s: %d updates in %d epochs", key, scheduler.num_training_steps, hparams["number_of_epochs"])

    # CTC exits, or joint CTC/attention when the YAML's modules have "decoders"
    brain = brain_class_for(hparams)(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    brain.tokenizer = tokenizer

    brain.fit(
        hparams["epoch_counter"],
        train_data,
        valid_data,
        train_loader_kwargs=loaders["train"],
        valid_loader_kwargs=loaders["valid"],
    )

    evaluate_and_report(hparams, hparams_file, brain, tokenizer, data)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # tear the process group down before the interpreter does: gloo's threads left
        # running at exit can abort a rank ("terminate called without an active exception")
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_recipe(main, sys.argv[1:])
