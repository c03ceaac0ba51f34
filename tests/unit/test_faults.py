"""Fault injection in training: a non-finite loss is skipped, counted, logged; patience stops."""

import functools
import logging

import pytest
import speechbrain as sb
import torch
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.lobes.features import Fbank
from speechbrain.nnet.losses import ctc_loss
from speechbrain.nnet.schedulers import LinearWarmupScheduler
from speechbrain.processing.features import InputNormalization

from earlyexit_brain.brain import EarlyExitCTCBrain
from earlyexit_brain.models.conformer import CTCExitHeads, EarlyExitConformerEncoder


def make_brain(patience=3):
    torch.manual_seed(0)
    modules = {"encoder": EarlyExitConformerEncoder(20, 2, 16, 2, 32, [1, 2], kernel_size=3),
               "ctc_heads": CTCExitHeads(16, 6, 2),
               "normalize": InputNormalization(norm_type="global")}
    hparams = {"compute_features": Fbank(n_mels=20), "blank_index": 0, "exit_loss_weights": None,
               "ctc_cost": functools.partial(ctc_loss, blank_index=0),
               "lr_annealing": LinearWarmupScheduler(0.01, 10, 100)}
    brain = EarlyExitCTCBrain(modules=modules, hparams=hparams,
                              opt_class=lambda p: torch.optim.AdamW(p, lr=0.01),
                              run_opts={"device": "cpu", "nonfinite_patience": patience})
    brain.init_optimizers()
    brain.on_stage_start(sb.Stage.TRAIN, 1)
    brain.modules.train()
    brain.nonfinite_count = 0
    return brain


def batch(nan=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(2):
        sig = 0.1 * torch.randn(8000, generator=g)
        if nan and i == 1:
            sig[100:200] = float("nan")
        items.append({"id": f"utt{seed}_{i}", "sig": sig, "tokens": torch.tensor([1, 2, 3])})
    return PaddedBatch(items)


def weights(brain):
    return {k: v.detach().clone() for k, v in brain.modules.state_dict().items()}


def test_nonfinite_loss_batch_is_skipped_counted_and_logged(caplog):
    brain = make_brain()
    brain.fit_batch(batch())
    before, lr = weights(brain), brain.optimizer.param_groups[0]["lr"]
    norm = brain.modules.normalize
    stats = (norm.count, norm.glob_mean.clone(), norm.glob_std.clone())
    steps = brain.optimizer.state[next(iter(brain.modules.parameters()))]["step"].item()
    caplog.set_level(logging.WARNING)
    loss = brain.fit_batch(batch(nan=True, seed=1))
    assert not torch.isfinite(loss)
    after = weights(brain)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing applied
    assert brain.optimizer.param_groups[0]["lr"] == lr  # the schedule did not advance
    # the NaN audio did not reach the normaliser's running statistics
    assert norm.count == stats[0] and torch.equal(norm.glob_mean, stats[1])
    assert torch.equal(norm.glob_std, stats[2])
    assert brain.optimizer.state[next(iter(brain.modules.parameters()))]["step"].item() == steps
    assert all(p.grad is None or not p.grad.abs().sum() for p in brain.modules.parameters())
    assert brain.nonfinite_count == 1
    assert "Skipped a training batch" in caplog.text and "utt1_0, utt1_1" in caplog.text
    # the per-exit loss averages ignore the skipped batch; the epoch stats count it
    assert all(torch.isfinite(torch.tensor(s)) for s in brain._exit_loss_sum)
    brain.on_stage_end(sb.Stage.TRAIN, 1.0, 1)
    assert brain.train_stats["skipped"] == 1
    # training goes on with finite batches
    brain.fit_batch(batch(seed=2))
    assert any(not torch.equal(after[k], v) for k, v in weights(brain).items())


def test_training_stops_when_the_patience_is_exhausted():
    brain = make_brain(patience=1)
    brain.fit_batch(batch(nan=True, seed=1))
    with pytest.raises(RuntimeError, match="more than nonfinite_patience=1"):
        brain.fit_batch(batch(nan=True, seed=2))
