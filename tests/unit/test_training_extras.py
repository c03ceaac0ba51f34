"""Checkpoint averaging, waveform/feature augmentation hooks, absolute positions."""

import pytest
import speechbrain as sb
import torch
from speechbrain.augment.augmenter import Augmenter
from speechbrain.augment.freq_domain import SpectrogramDrop
from speechbrain.augment.time_domain import SpeedPerturb
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.lobes.models.transformer.Transformer import PositionalEncoding
from speechbrain.utils.checkpoints import Checkpointer

from earlyexit_brain.checkpoints import load_average_of_best
from earlyexit_brain.models.conformer import EarlyExitConformerEncoder, sinusoidal_positions
from tests.factories import make_brain


def test_average_of_the_best_checkpoints(tmp_path):
    model = torch.nn.Linear(2, 1)
    ckpt = Checkpointer(str(tmp_path), recoverables={"model": model})
    # parameters filled with v, dev WER w: best (lowest WER) first is 2.0, 4.0, 1.0
    for value, wer in ((1.0, 30.0), (2.0, 10.0), (4.0, 20.0)):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(value)
        ckpt.save_checkpoint(meta={"WER": wer})
    for n, expected in ((1, 2.0), (2, 3.0), (3, 7.0 / 3.0), (5, 7.0 / 3.0)):
        used = load_average_of_best(ckpt, model, n, min_key="WER")
        assert [c.meta["WER"] for c in used] == [10.0, 20.0, 30.0][:n]
        for p in model.parameters():
            assert torch.allclose(p, torch.full_like(p, expected)), (n, p)
    with pytest.raises(ValueError, match="avg_checkpoints"):
        load_average_of_best(ckpt, model, 0, min_key="WER")
    assert load_average_of_best(Checkpointer(str(tmp_path / "empty"), {"model": model}), model, 2) == []


def tiny_brain(folder, wav_augment=None, fea_augment=None):
    """The recipe's Brain (tests/factories.py) with these augmenters in place of the YAML's nulls."""
    brain = make_brain(folder)
    assert brain.hparams.wav_augment is None and brain.hparams.fea_augment is None
    brain.hparams.wav_augment, brain.hparams.fea_augment = wav_augment, fea_augment
    return brain


def batch():
    torch.manual_seed(0)
    return PaddedBatch(
        [
            {"id": "a", "sig": torch.randn(8000), "tokens": torch.tensor([1, 2, 3]), "wrd": "A"},
            {"id": "b", "sig": torch.randn(6000), "tokens": torch.tensor([4, 5]), "wrd": "B"},
        ]
    )


def test_augmentation_hooks_apply_in_training_only_and_replicate_targets(tmp_path):
    # concat_original doubles the batch: the targets must follow
    wav_aug = Augmenter(concat_original=True, augmentations=[SpeedPerturb(16000, speeds=[90])])
    fea_aug = Augmenter(augmentations=[SpectrogramDrop(dim=1)])
    brain = tiny_brain(tmp_path, wav_aug, fea_aug)
    brain.on_stage_start(sb.Stage.TRAIN)
    log_probs, lens, hiddens = brain.compute_forward(batch(), sb.Stage.TRAIN)
    assert [lp.shape[0] for lp in log_probs] == [4, 4] and lens.shape[0] == 4
    loss = brain.compute_objectives((log_probs, lens, hiddens), batch(), sb.Stage.TRAIN)
    assert torch.isfinite(loss)
    # the speed-perturbed copy is 10 % longer than the original
    plain = tiny_brain(tmp_path)
    plain.on_stage_start(sb.Stage.TRAIN)
    base = plain.compute_forward(batch(), sb.Stage.TRAIN)[0]
    assert log_probs[0].shape[1] > base[0].shape[1]
    # no augmentation outside training
    brain.modules.eval()
    valid = brain.compute_forward(batch(), sb.Stage.VALID)[0]
    assert valid[0].shape[0] == 2 and valid[0].shape[1] == base[0].shape[1]


def test_absolute_positions_for_regular_attention():
    ref = PositionalEncoding(64)(torch.zeros(1, 37, 64))
    assert torch.allclose(sinusoidal_positions(37, 64), ref, atol=1e-6)
    torch.manual_seed(0)
    with_pos = EarlyExitConformerEncoder(
        20, 2, 64, 4, 32, [2], kernel_size=3, attention_type="regularMHA", abs_pos_encoding=True
    ).eval()
    without = EarlyExitConformerEncoder(20, 2, 64, 4, 32, [2], kernel_size=3, attention_type="regularMHA").eval()
    without.load_state_dict(with_pos.state_dict())  # no parameters added
    feats = torch.randn(1, 40, 20)
    assert not torch.allclose(with_pos(feats)[0], without(feats)[0])
    assert with_pos.config["abs_pos_encoding"] is True and "abs_pos_encoding" not in without.config
    # the exported config rebuilds the same encoder
    again = EarlyExitConformerEncoder(**with_pos.config).eval()
    again.load_state_dict(with_pos.state_dict())
    assert torch.allclose(again(feats)[0], with_pos(feats)[0])


def test_training_clock_counts_every_batch_not_only_whole_epochs(tmp_path):
    import time

    from earlyexit_brain.checkpoints import TrainClock

    brain = tiny_brain(tmp_path)
    clock = brain.hparams.train_clock  # the recipe's, checkpointed with the model
    assert isinstance(clock, TrainClock) and clock.seconds == 0
    brain.nonfinite_count = 0  # set by the epoch start in fit()
    brain.on_stage_start(sb.Stage.TRAIN)
    time.sleep(0.05)
    brain.on_fit_batch_end(batch(), None, None, should_step=False)
    mid_epoch = clock.seconds  # what an intra-epoch checkpoint saves
    assert mid_epoch >= 0.05
    time.sleep(0.05)
    brain.on_stage_end(sb.Stage.TRAIN, 1.0)
    assert clock.seconds >= mid_epoch + 0.05 and clock.seconds < mid_epoch + 1.0
