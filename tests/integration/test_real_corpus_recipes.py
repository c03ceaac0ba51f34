"""recipes/train.py with the real-corpus configurations on generated LibriSpeech and
TED-LIUM trees (SpeechBrain debug mode, sizes overridden small), the paper
configuration's size, and the smoke recipe under torchrun (2 processes, gloo)."""

import json
import os
import subprocess
import sys

import pytest
from hyperpyyaml import load_hyperpyyaml

from benchmarks.ddp import run_smoke_recipe
from earlyexit_brain.files import OWNER_MARKER
from tests.real_corpora import LIBRI_UTTS, TED_SEGMENTS, make_librispeech, make_tedlium

SMALL = [
    "--num_layers=2",
    "--d_model=32",
    "--nhead=4",
    "--d_ffn=64",
    "--kernel_size=7",
    "--output_neurons=40",
    "--n_mels=40",
    "--frontend_channels=[8,8]",
    "--max_batch_length_train=6",
    "--num_buckets=2",
    "--num_workers=0",
    "--eval_batch_size=4",
    "--checkpoints_to_keep=2",
    "--avg_checkpoints=2",
    "--warmup_steps=10",
    "--debug",
    "--debug_batches=2",
    "--debug_epochs=1",
]
LS_TRAIN = "--train_splits=[train-clean-100,train-other-500]"


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("real_trees")
    make_librispeech(str(base / "LibriSpeech"))
    make_tedlium(str(base / "TEDLIUM_release-3"), partitions=("legacy",))
    return base


def train(repo_root, hparams, data, out, *extra, expect_ok=True):
    cmd = [
        sys.executable,
        "recipes/train.py",
        hparams,
        f"--data_folder={data}",
        f"--output_folder={out}",
        *SMALL,
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=600)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def check_report(out, exit_layers, sets, n):
    report = json.loads((out / "report.json").read_text())
    assert report["exit_layers"] == exit_layers
    assert report["token_type"] == "bpe" and report["vocab_size"] == 40
    assert report["train"]["epochs"] == 1
    for e in report["exits"]:
        assert set(e["sets"]) == set(sets)
        assert all(s["n"] == n for s in e["sets"].values())
    return report


def test_librispeech_early_exit_debug_run(repo_root, trees, tmp_path):
    out = tmp_path / "out"
    train(
        repo_root,
        "hparams/librispeech/conformer_ctc_ee.yaml",
        trees / "LibriSpeech",
        out,
        "--exit_layers=[1,2]",
        LS_TRAIN,
        "--policy_evaluation=False",
    )
    report = check_report(out, [1, 2], ["test-clean", "test-other"], LIBRI_UTTS)
    assert report["train_utterances"] == 3 * LIBRI_UTTS  # the two training splits, merged
    assert report["averaged_checkpoints"] == 1  # avg_checkpoints=2, one epoch: one checkpoint
    assert report["params_total"] < 100_000  # the sizes were overridden small
    assert sorted(os.listdir(out / "manifests")) == [
        OWNER_MARKER,
        "dev-clean.csv",
        "librispeech_prepare.json",
        "test-clean.csv",
        "test-other.csv",
        "train.csv",
    ]
    log = (out / "log.txt").read_text()
    assert "Evaluating the average of 1 checkpoint(s) (avg_checkpoints=2)" in log


def test_librispeech_aed_debug_run(repo_root, trees, tmp_path):
    out = tmp_path / "out"
    train(
        repo_root,
        "hparams/librispeech/conformer_aed_ee.yaml",
        trees / "LibriSpeech",
        out,
        "--exit_layers=[1,2]",
        LS_TRAIN,
        "--policy_evaluation=False",
        "--decoder_layers=1",
        "--decoder_nhead=4",
        "--decoder_d_ffn=64",
        "--beam_size=2",
        "--valid_beam_size=1",
        "--ctc_beam_size=2",
        "--max_decode_ratio=0.3",
    )
    report = check_report(out, [1, 2], ["test-clean", "test-other"], LIBRI_UTTS)
    for e in report["exits"]:
        assert set(e["sets"]["test-clean"]["decoders"]) == {"aed_beam", "ctc_greedy", "ctc_beam"}


def test_librispeech_single_exit_debug_run(repo_root, trees, tmp_path):
    out = tmp_path / "out"
    train(
        repo_root,
        "hparams/librispeech/conformer_ctc_single.yaml",
        trees / "LibriSpeech",
        out,
        "--exit_layers=[2]",
        LS_TRAIN,
    )
    report = check_report(out, [2], ["test-clean", "test-other"], LIBRI_UTTS)
    assert "policies" not in report  # policy_evaluation: False for one exit


def test_tedlium_early_exit_debug_run(repo_root, trees, tmp_path):
    out = tmp_path / "out"
    train(
        repo_root,
        "hparams/tedlium/conformer_ctc_ee.yaml",
        trees / "TEDLIUM_release-3",
        out,
        "--exit_layers=[1,2]",
        "--policy_evaluation=False",
    )
    check_report(out, [1, 2], ["test"], TED_SEGMENTS)
    header = (out / "manifests" / "train.csv").read_text().splitlines()[0]
    assert header == "ID,duration,wav,start,stop,spk_id,wrd"
    text = (out / "wer_test_exit2.txt").read_text()
    assert "DaveTalk_2013-" in text  # the test talk's segments were decoded


def test_bad_corpus_stops_before_training(repo_root, trees, tmp_path):
    import shutil

    data = tmp_path / "LibriSpeech"
    shutil.copytree(trees / "LibriSpeech", data)
    os.remove(data / "dev-clean" / "40" / "140" / "40-140-0002.flac")
    shutil.rmtree(data / "test-other")
    out = tmp_path / "out"
    proc = train(
        repo_root,
        "hparams/librispeech/conformer_ctc_ee.yaml",
        data,
        out,
        "--exit_layers=[1,2]",
        LS_TRAIN,
        expect_ok=False,
    )
    assert proc.returncode != 0
    assert "Corpus error: LibriSpeech preparation found 2 problem(s)" in proc.stderr
    assert f"{data / 'dev-clean' / '40' / '140' / '40-140.trans.txt'}:3: audio file not found" in proc.stderr
    assert f"{data / 'test-other'}: split folder 'test-other' not found" in proc.stderr
    assert not (out / "train_log.txt").exists()
    assert not [f for f in os.listdir(out / "save") if f.startswith("CKPT")]
    assert not [f for f in os.listdir(out / "manifests") if f.endswith((".csv", ".json")) and f != OWNER_MARKER]


@pytest.mark.parametrize(
    "path, exits",
    [
        ("hparams/librispeech/conformer_ctc_ee.yaml", [2, 4, 6, 8, 10, 12]),
        ("hparams/librispeech/conformer_ctc_single.yaml", [12]),
        ("hparams/tedlium/conformer_ctc_ee.yaml", [2, 4, 6, 8, 10, 12]),
    ],
)
def test_paper_configuration_size(repo_root, tmp_path, path, exits):
    with open(os.path.join(repo_root, path)) as fin:
        hp = load_hyperpyyaml(fin, {"data_folder": str(tmp_path), "output_folder": str(tmp_path / "o")})
    enc, heads = hp["encoder"], hp["ctc_heads"]
    assert enc.exit_layers == exits and len(enc.layers) == 12 and enc.d_model == 256
    assert enc.output_frames(1000) == 250  # 4x subsampling
    assert all(h.out_features == 256 for h in heads.heads)
    total = sum(p.numel() for m in (enc, heads) for p in m.parameters())
    assert abs(total - 31.5e6) / 31.5e6 < 0.02, total  # the paper's 31.5 M
    assert type(hp["lr_annealing"]).__name__ == "NoamScheduler"
    assert hp["wav_augment"] is not None and hp["fea_augment"] is not None


def test_paper_aed_configuration(repo_root, tmp_path):
    with open(os.path.join(repo_root, "hparams/librispeech/conformer_aed_ee.yaml")) as fin:
        hp = load_hyperpyyaml(fin, {"data_folder": str(tmp_path), "output_folder": str(tmp_path / "o")})
    enc, decoders = hp["encoder"], hp["decoders"]
    assert enc.exit_layers == [2, 4, 6, 8, 10, 12] and enc.d_model == 256
    assert decoders.num_exits == 6
    assert all(len(d.decoder.layers) == 4 for d in decoders.decoders)  # the paper: 4 layers
    assert all(o.w.out_features == 256 for o in decoders.out)
    assert hp["ctc_weight"] == 0.3 and (hp["bos_index"], hp["eos_index"], hp["blank_index"]) == (1, 2, 0)
    assert "decoders" in hp["modules"] and hp["avg_checkpoints"] == 10


def test_smoke_recipe_under_torchrun_two_processes(tmp_path, free_port):
    """The benchmark's DDP launcher (benchmarks.ddp): torchrun --nproc_per_node=2, gloo, on the CPU."""
    report = run_smoke_recipe(2, str(tmp_path / "out"), str(tmp_path / "data"), 1, timeout=600, master_port=free_port)
    assert report["processes"] == 2
    assert report["train"]["epochs"] == 1 and report["train_utterances"] > 0
    assert [e["layer"] for e in report["exits"]] == [1, 2]
    assert all(e["sets"]["test"]["n"] == 16 for e in report["exits"])
