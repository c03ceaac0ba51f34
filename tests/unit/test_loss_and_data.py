"""Multi-exit objective and CTC-fit filtering of manifests."""

import csv
import logging

import pytest
import torch
from speechbrain.nnet.losses import ctc_loss

from earlyexit_brain.dataio import DataOptions, ctc_required_frames, dataio_prepare, encoder_frames
from earlyexit_brain.losses import MultiExitLoss
from earlyexit_brain.models.conformer import EarlyExitConformerEncoder
from earlyexit_brain.models.exits import CTCExitHeads
from earlyexit_brain.options import ConfigError


def per_exit_ctc(seed=0):
    torch.manual_seed(seed)
    enc = EarlyExitConformerEncoder(20, 3, 16, 2, 32, [1, 2, 3], kernel_size=3)
    heads = CTCExitHeads(16, 6, 3)
    feats = torch.randn(2, 60, 20)
    lens = torch.tensor([1.0, 0.8])
    tokens = torch.tensor([[1, 2, 3, 4], [2, 2, 5, 0]])
    token_lens = torch.tensor([1.0, 0.75])
    log_probs = heads(enc(feats, lens))
    reference = [ctc_loss(lp, tokens, lens, token_lens, blank_index=0) for lp in log_probs]
    return log_probs, (lens, tokens, token_lens), reference, heads


def test_plain_sum_is_the_default_objective():
    log_probs, inputs, reference, _ = per_exit_ctc()
    out = MultiExitLoss(blank_index=0)(log_probs, *inputs)
    assert torch.allclose(torch.stack(out.per_exit), torch.stack(reference), rtol=1e-6)
    assert torch.allclose(out.total, reference[0] + reference[1] + reference[2], rtol=1e-6)
    assert out.distillation == 0.0


def test_weights_scale_each_exit_and_zero_weight_cuts_its_gradient():
    log_probs, inputs, reference, heads = per_exit_ctc()
    out = MultiExitLoss(blank_index=0, exit_weights=[0.0, 2.0, 0.5])(log_probs, *inputs)
    assert torch.allclose(out.total, 2.0 * reference[1] + 0.5 * reference[2], rtol=1e-6)
    out.total.backward()
    assert heads.heads[0].weight.grad is None or heads.heads[0].weight.grad.abs().sum() == 0
    assert heads.heads[1].weight.grad.abs().sum() > 0


def test_one_call_and_per_exit_ctc_agree():
    log_probs, inputs, reference, _ = per_exit_ctc()
    one_call = MultiExitLoss(blank_index=0, ctc="one_call")(log_probs, *inputs)
    per_exit = MultiExitLoss(blank_index=0, ctc="per_exit")(log_probs, *inputs)
    assert [float(x.detach()) for x in per_exit.per_exit] == [float(x.detach()) for x in reference]
    assert torch.allclose(one_call.total, per_exit.total, rtol=1e-6)


def test_one_call_refuses_exits_of_different_frame_counts():
    log_probs, inputs, _, _ = per_exit_ctc()
    with pytest.raises(ValueError, match="per_exit"):
        MultiExitLoss(blank_index=0)([log_probs[0], log_probs[1][:, :-2]], *inputs)


def test_weight_count_must_match_exits():
    log_probs, inputs, _, _ = per_exit_ctc()
    with pytest.raises(ValueError, match="exit_loss_weights: 2 weights for 3 exits"):
        MultiExitLoss(blank_index=0, exit_weights=[1.0, 1.0])(log_probs, *inputs)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"exit_weights": [1, -1]}, "exit_loss_weights"),
        ({"exit_weights": [0, 0]}, "exit_loss_weights"),
        ({"ctc": "fast"}, "key .ctc. must be"),
        ({"ctc_weight": 1.5}, "ctc_weight"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"distillation_weight": -1}, "exit_distillation_weight"),
        ({"distillation_from_epoch": 0}, "exit_distillation_from_epoch"),
        ({"blank_index": -1}, "blank_index"),
    ],
)
def test_bad_loss_options_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        MultiExitLoss(**{"blank_index": 0, **kwargs})


def test_ctc_required_frames_counts_repeats():
    assert ctc_required_frames([1, 2, 3]) == 3
    assert ctc_required_frames([1, 1, 2, 2, 2]) == 5 + 3
    assert ctc_required_frames([]) == 0


class CharTokenizer:
    """Stands in for SentencePiece: one id per character."""

    class _SP:
        def encode_as_ids(self, text):
            return [ord(c) % 30 + 1 for c in text]

    sp = _SP()


def test_unfit_training_utterances_are_dropped_and_counted(tiny_corpus, tmp_path, caplog):
    folder, manifests = tiny_corpus
    enc = EarlyExitConformerEncoder(40, 1, 16, 2, 32, [1], kernel_size=3)
    with open(manifests["train"], newline="") as fin:
        rows = list(csv.DictReader(fin))
    # make two utterances impossible: a long transcript on short audio
    rows[0]["wrd"] = " ".join(["ABRACADABRA"] * 40)
    rows[1]["wrd"] = " ".join(["HOCUS POCUS"] * 40)
    train_csv = tmp_path / "train.csv"
    with open(train_csv, "w", newline="") as fout:
        writer = csv.DictWriter(fout, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    hparams = dict(
        data_folder=folder,
        train_csv=str(train_csv),
        valid_csv=manifests["dev"],
        test_sets=["test"],
        test_csv={"test": manifests["test"]},
        sample_rate=16000,
        hop_length=10,
        max_duration=100.0,
        eval_batch_size=4,
        batch_size=4,
        sorting="ascending",
        seed=1,
    )
    with caplog.at_level(logging.INFO):
        train, valid, tests, loaders = dataio_prepare(hparams, CharTokenizer(), enc)[:4]
    assert len(train) == len(rows) - 2
    assert "2 dropped because their tokens cannot fit" in caplog.text
    assert len(valid) == len(open(manifests["dev"]).readlines()) - 1  # dev is never filtered
    item = train[0]
    assert item["sig"].dim() == 1 and item["tokens"].dtype == torch.long


def test_encoder_frames_agrees_with_the_encoder():
    enc = EarlyExitConformerEncoder(40, 1, 16, 2, 32, [1], kernel_size=3)
    assert encoder_frames(1.0, 16000, 10, enc) == enc.output_frames(101) == 26


def test_missing_manifest_is_named(tmp_path):
    enc = EarlyExitConformerEncoder(40, 1, 16, 2, 32, [1], kernel_size=3)
    hparams = dict(
        data_folder=str(tmp_path),
        train_csv=str(tmp_path / "nope.csv"),
        valid_csv="x",
        test_sets=["test"],
        test_csv={"test": "y"},
        sample_rate=16000,
        seed=1,
        max_duration=10.0,
        eval_batch_size=2,
        batch_size=2,
    )
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        dataio_prepare(hparams, CharTokenizer(), enc)


def minimal_data_hparams(tmp_path):
    """The keys DataOptions needs, with manifests a.csv (train), b.csv (dev), c.csv (test)."""
    return dict(
        data_folder=str(tmp_path),
        train_csv="a.csv",
        valid_csv="b.csv",
        test_sets=["test"],
        test_csv={"test": "c.csv"},
        sample_rate=16000,
        seed=1,
        max_duration=10.0,
        eval_batch_size=2,
        batch_size=2,
    )


@pytest.mark.parametrize(
    "drop, message",
    [
        ("seed", "DataOptions: key 'seed' missing"),
        ("batch_size", "'batch_size' is needed without dynamic_batching"),
    ],
)
def test_data_options_name_a_missing_key(tmp_path, drop, message):
    hparams = minimal_data_hparams(tmp_path)
    del hparams[drop]
    with pytest.raises(ConfigError, match=message):
        DataOptions.from_hparams(hparams)
    with pytest.raises(ConfigError, match="key 'test_sets'"):
        DataOptions.from_hparams(dict(hparams, **{drop: 2}, test_sets=["other"]))


@pytest.mark.parametrize("taken", ["b.csv", "c.csv", "a.csv"])
def test_controller_csv_may_not_be_a_training_dev_or_test_manifest(tmp_path, taken):
    hparams = minimal_data_hparams(tmp_path)
    hparams.update(
        train_csv=str(tmp_path / "a.csv"), valid_csv=str(tmp_path / "b.csv"), test_csv={"test": str(tmp_path / "c.csv")}
    )
    assert DataOptions.from_hparams(dict(hparams, controller_csv=str(tmp_path / "d.csv"))).controller_csv
    key = {"a.csv": "train_csv", "b.csv": "valid_csv", "c.csv": "test_csv.test"}[taken]
    with pytest.raises(ConfigError, match=rf"key 'controller_csv': .*{taken} is also {key}"):
        DataOptions.from_hparams(dict(hparams, controller_csv=str(tmp_path / taken)))
