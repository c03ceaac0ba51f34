"""Fault injection in training: non-finite losses, checkpoints killed while written."""

import logging
import os

import pytest
import speechbrain as sb
import torch
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks

from tests.factories import make_brain


def training_brain(folder, patience=3):
    """The recipe's Brain (tests/factories.py) ready for ``fit_batch``, stopping after ``patience``
    non-finite batches in an epoch."""
    brain = make_brain(folder, nonfinite_patience=patience)
    assert brain.nonfinite_patience == patience
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


def test_nonfinite_loss_batch_is_skipped_counted_and_logged(caplog, tmp_path):
    brain = training_brain(tmp_path)
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


def test_training_stops_when_the_patience_is_exhausted(tmp_path):
    brain = training_brain(tmp_path, patience=1)
    brain.fit_batch(batch(nan=True, seed=1))
    with pytest.raises(RuntimeError, match="more than nonfinite_patience=1"):
        brain.fit_batch(batch(nan=True, seed=2))


# ------------------------------------------------------------------ checkpoints
class Boom(RuntimeError):
    pass


@register_checkpoint_hooks
class Fragile:
    """A recoverable whose save can be made to crash half-way through a checkpoint."""

    def __init__(self):
        self.value, self.crash = 0, False

    @mark_as_saver
    def _save(self, path):
        if self.crash:
            raise Boom("killed while writing")
        path.write_text(str(self.value))

    @mark_as_loader
    def _load(self, path, end_of_epoch=False):
        self.value = int(path.read_text())


def test_a_checkpoint_killed_while_written_is_never_recovered(tmp_path):
    from speechbrain.utils.checkpoints import Checkpointer

    from earlyexit_brain.checkpoints import AtomicCheckpointer

    # (the hazard: SpeechBrain's own Checkpointer lists the half-written folder)
    model = torch.nn.Linear(2, 2)
    stock_fragile = Fragile()
    stock = Checkpointer(tmp_path / "stock", {"model": model, "z_fragile": stock_fragile})
    stock_fragile.crash = True
    with pytest.raises(Boom):
        stock.save_checkpoint()
    assert len(stock.list_checkpoints()) == 1

    fragile = Fragile()
    ckpt = AtomicCheckpointer(tmp_path / "atomic", {"model": model, "z_fragile": fragile})
    fragile.value = 1
    first = ckpt.save_checkpoint(meta={"n": 1})
    assert first.path.name.startswith("CKPT+") and (first.path / "z_fragile.ckpt").exists()
    assert first.paramfiles["model"] == first.path / "model.ckpt"
    fragile.value, fragile.crash = 2, True
    with pytest.raises(Boom):
        ckpt.save_checkpoint(meta={"n": 2})
    assert [c.meta["n"] for c in ckpt.list_checkpoints()] == [1]  # only the complete one
    fragile.value, fragile.crash = 0, False
    assert ckpt.recover_if_possible().meta["n"] == 1 and fragile.value == 1
    # the next save removes the leftover and the keep-only logic still works
    fragile.value = 3
    ckpt.save_and_keep_only(meta={"n": 3}, num_to_keep=1)
    names = sorted(os.listdir(tmp_path / "atomic"))
    assert len(names) == 1 and names[0].startswith("CKPT+")
    assert [c.meta["n"] for c in ckpt.list_checkpoints()] == [3]


def test_a_checkpoint_of_another_model_shape_is_refused_by_name(tmp_path):
    from earlyexit_brain.checkpoints import AtomicCheckpointer, CheckpointMismatchError

    AtomicCheckpointer(tmp_path, {"model": torch.nn.Linear(2, 3)}).save_checkpoint()
    other = AtomicCheckpointer(tmp_path, {"model": torch.nn.Linear(2, 4)})
    with pytest.raises(CheckpointMismatchError) as err:
        other.recover_if_possible()
    message = str(err.value)
    assert str(tmp_path) in message and "CKPT+" in message and "output_folder" in message
    assert "size mismatch" in message
    # a matching model still resumes
    same = torch.nn.Linear(2, 3)
    assert AtomicCheckpointer(tmp_path, {"model": same}).recover_if_possible() is not None


def test_the_recipes_end_on_a_mismatched_checkpoint_with_its_message():
    from earlyexit_brain.checkpoints import CheckpointMismatchError
    from earlyexit_brain.experiment import run_recipe

    def main(argv):
        raise CheckpointMismatchError(f"save/CKPT+x does not fit {argv}")

    with pytest.raises(SystemExit) as err:
        run_recipe(main, ["a.yaml"])
    assert err.value.code == "Checkpoint error: save/CKPT+x does not fit ['a.yaml']"


def _save_and_keep_only_in_ddp(rank, folder, port, rename_delay):
    """One of two gloo processes saving 3 checkpoints, keeping 1; the main process's rename of
    each new checkpoint to its final name is delayed to expose a listing that races it."""
    import datetime
    import time

    import earlyexit_brain.checkpoints as checkpoints

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2"
    )
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
    replace = checkpoints.os.replace

    def slow_replace(src, dst):
        time.sleep(rename_delay)
        replace(src, dst)

    checkpoints.os.replace = slow_replace  # this child process's os module only
    ckpt = checkpoints.AtomicCheckpointer(folder, {"model": torch.nn.Linear(2, 2)})
    for _ in range(3):
        ckpt.save_and_keep_only(num_to_keep=1)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_checkpoints_saved_and_pruned_under_ddp_do_not_hang(tmp_path, free_port):
    """Every process sees the renamed checkpoint before SpeechBrain lists the folder to delete
    old ones (one broadcast per deleted checkpoint): a process that listed it before the
    rename deleted nothing and waited at a barrier while the main process broadcast (a hang;
    here a gloo timeout, which fails the spawn)."""
    torch.multiprocessing.spawn(_save_and_keep_only_in_ddp, args=(str(tmp_path), free_port, 0.5), nprocs=2, join=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 1 and names[0].startswith("CKPT+"), names
