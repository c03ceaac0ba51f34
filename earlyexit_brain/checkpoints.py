"""Checkpoints that are never taken as complete while half-written.

SpeechBrain 1.1.2's ``Checkpointer.save_checkpoint`` writes a checkpoint's
``CKPT.yaml`` (the file that marks a folder as a checkpoint) *before* the
parameter files, so a process killed while saving leaves a folder that the
next run recovers from and then fails on, or worse, loads partly.
:class:`AtomicCheckpointer` writes each checkpoint under a temporary name
(``partial+CKPT+...``, which SpeechBrain does not list) and renames it to its
final ``CKPT+...`` name only when every file is written; leftovers of a killed
save are removed at the next save.

Also what a checkpoint holds besides the model and optimiser: :class:`TrainClock` (training
seconds) and :class:`RandomState` (the random generators), and :func:`load_average_of_best`.
"""

import logging
import os
import pathlib
import random
import shutil
from typing import List, Optional

import numpy as np
import torch
from speechbrain.utils.checkpoints import (
    Checkpoint,
    Checkpointer,
    average_checkpoints,
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)
from speechbrain.utils.distributed import ddp_barrier, if_main_process

logger = logging.getLogger(__name__)

PARTIAL_PREFIX = "partial+"


class CheckpointMismatchError(RuntimeError):
    """A checkpoint whose parameters do not fit the model the configuration builds."""


class AtomicCheckpointer(Checkpointer):
    """SpeechBrain's ``Checkpointer`` with atomic checkpoint folders (same arguments)."""

    @staticmethod
    def _partial(final: pathlib.Path) -> pathlib.Path:
        return final.parent / (PARTIAL_PREFIX + final.name)

    def _new_checkpoint_dirpath(self):
        return self._partial(super()._new_checkpoint_dirpath())

    def _custom_checkpoint_dirpath(self, name):
        return self._partial(super()._custom_checkpoint_dirpath(name))

    def remove_partial_checkpoints(self):
        """Delete the folders of saves that did not finish (main process only)."""
        if not if_main_process() or not os.path.isdir(self.checkpoints_dir):
            return
        for entry in pathlib.Path(self.checkpoints_dir).iterdir():
            if entry.is_dir() and entry.name.startswith(PARTIAL_PREFIX):
                logger.warning("Removing %s: a checkpoint whose writing did not finish", entry)
                shutil.rmtree(entry, ignore_errors=True)

    def load_checkpoint(self, checkpoint):
        try:
            super().load_checkpoint(checkpoint)
        except RuntimeError as err:
            if "Error(s) in loading state_dict" not in str(err):
                raise
            detail = str(err).strip().splitlines()
            raise CheckpointMismatchError(
                f"{checkpoint.path} was written by a model of another shape than this configuration "
                f"builds (were model keys such as d_model, exit_layers or frontend_channels changed "
                f"since?), so it cannot be resumed or tested. Train into a new output_folder, or "
                f"delete {self.checkpoints_dir} to start this one over. PyTorch: "
                f"{' '.join(line.strip() for line in detail[:3])}"
            ) from err

    def save_checkpoint(self, meta=None, end_of_epoch=True, name=None, verbosity=logging.INFO):
        self.remove_partial_checkpoints()
        saved = super().save_checkpoint(
            meta={} if meta is None else meta, end_of_epoch=end_of_epoch, name=name, verbosity=verbosity
        )
        ddp_barrier()  # every process has written its files
        result = None
        if saved is not None:  # the main process
            final = saved.path.parent / saved.path.name[len(PARTIAL_PREFIX) :]
            if final.exists():  # a custom name saved again: replace the old one
                shutil.rmtree(final)
            os.replace(saved.path, final)
            result = Checkpoint(final, saved.meta, {key: final / path.name for key, path in saved.paramfiles.items()})
        # Every process must see the final name before it lists the checkpoints again:
        # save_and_keep_only's deletion calls one broadcast per checkpoint it deletes, and a
        # process that listed the folder before the rename chose other deletions and waited
        # at a barrier while the main process broadcast: a DDP run hung at its last epoch.
        ddp_barrier()
        return result


@register_checkpoint_hooks
class TrainClock:
    """Training wall-clock seconds, saved in checkpoints so resumed runs add up."""

    def __init__(self):
        self.seconds = 0.0

    @mark_as_saver
    def _save(self, path):
        with open(path, "w") as fout:
            fout.write(repr(float(self.seconds)))

    @mark_as_loader
    def _load(self, path, end_of_epoch=False):
        with open(path) as fin:
            self.seconds = float(fin.read())


@register_checkpoint_hooks
class RandomState:
    """The Python, NumPy and torch (CPU and CUDA) random states, saved in checkpoints.

    With it a run resumed from a checkpoint draws the same dropout masks and
    augmentations as the uninterrupted run would have from that point (the
    training loader draws from its own generator, see ``dataio_prepare``).
    """

    @mark_as_saver
    def _save(self, path):
        version, words, gauss = random.getstate()
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "python": [version, list(words), gauss],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        torch.save(state, path)

    @mark_as_loader
    def _load(self, path, end_of_epoch=False):
        state = torch.load(path, weights_only=True)
        version, words, gauss = state["python"]
        random.setstate((version, tuple(words), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


def load_average_of_best(
    checkpointer,
    model: torch.nn.Module,
    n: int,
    min_key: Optional[str] = None,
    max_key: Optional[str] = None,
    recoverable: str = "model",
) -> List:
    """Load into ``model`` the average of the best ``n`` checkpoints' parameters.

    The checkpoints are ranked by ``min_key``/``max_key`` (their meta, e.g. the
    dev WER) with SpeechBrain's ``Checkpointer.find_checkpoints``, and averaged
    with ``speechbrain.utils.checkpoints.average_checkpoints`` (parameters and
    buffers of the ``recoverable`` named ``model``). With ``n == 1``, or when
    only one checkpoint exists, that checkpoint is loaded as it is. Returns the
    checkpoints used (best first); an empty list when there is none.
    """
    if n < 1:
        raise ValueError(f"avg_checkpoints: must be >= 1, got {n}")
    ckpts = checkpointer.find_checkpoints(min_key=min_key, max_key=max_key, max_num_checkpoints=n)
    if not ckpts:
        return []
    state = average_checkpoints(ckpts, recoverable_name=recoverable)
    model.load_state_dict(state, strict=True)
    return ckpts
