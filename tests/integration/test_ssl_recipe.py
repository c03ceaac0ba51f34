"""End-to-end: recipes/train.py with a tiny random wav2vec2 (hparams/synthetic/wav2vec2_ctc_ee.yaml)."""

import json
import re
import subprocess
import sys

import pytest

from tests.oracles import check_policy_transcription

transformers = pytest.importorskip("transformers")

YAML = "hparams/synthetic/wav2vec2_ctc_ee.yaml"


def tiny_wav2vec2(folder):
    import torch

    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=[32, 32, 32],
        conv_stride=[5, 4, 4],
        conv_kernel=[10, 4, 4],
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    transformers.Wav2Vec2Model(config).save_pretrained(str(folder))


def test_ssl_recipe_trains_exports_and_transcribes(repo_root, tmp_path):
    from earlyexit_brain.inference import EarlyExitASR

    src, out, data = tmp_path / "tiny_w2v2", tmp_path / "out", tmp_path / "data"
    tiny_wav2vec2(src)
    cmd = [
        sys.executable,
        "recipes/train.py",
        YAML,
        f"--output_folder={out}",
        f"--data_folder={data}",
        f"--ssl_source={src}",
        "--num_layers=2",
        "--exit_layers=[1, 2]",
        "--d_model=32",
        "--number_of_epochs=3",
        "--lr=0.01",
        "--ssl_lr=0.001",
        "--warmup_steps=2",
        "--corpus_options={seed: 7, n_train: 48, n_dev_sentences: 6, n_test_sentences: 6, "
        "max_vocab: 3000, closed_vocabulary: False, min_words: 3, max_words: 5, "
        "n_train_speakers: 6, n_unseen_speakers: 2, n_unseen_variants: 4, rate_range: [150, 220], "
        "pitch_range: [25, 75], noise_snr_db: [20.0, 40.0], gain_db: [-8.0, 0.0]}",
        "--policy_sweep=[posterior, budget]",
        "--sweep_points=2",
        "--latency_durations=[0.5, 1.0]",
    ]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    log = (out / "train_log.txt").read_text()
    losses = [float(m) for m in re.findall(r"^epoch: \d+, .*? - train loss: ([0-9.e+-]+)", log, flags=re.M)]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    # two optimisers (exit heads; SSL model), both checkpointed
    ckpt = sorted((out / "save").glob("CKPT*"))[-1]
    assert (ckpt / "optimizer.ckpt").is_file() and (ckpt / "ssl_optimizer.ckpt").is_file()
    # recipes/evaluate.py serves the SSL experiment as it serves the Conformer's
    proc = subprocess.run(
        [sys.executable, "recipes/evaluate.py", str(out), "--calibration_target=avg_layers", "--calibration_value=1.5"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((out / "report.json").read_text())
    assert [e["exit"] for e in report["exits"]] == [1, 2]
    assert report["calibration"]["target"] == "avg_layers"
    # the exported folder rebuilds the encoder from its stored config: remove the source
    for f in src.iterdir():
        f.unlink()
    src.rmdir()
    hparams = (out / "inference" / "hyperparams.yaml").read_text()
    assert "EarlyExitSSLEncoder" in hparams and "WaveformFeatures" in hparams
    asr = EarlyExitASR.from_hparams(source=str(out / "inference"))
    wavs = sorted((data / "wavs" / "test").glob("*.wav"))[:4]
    for wav in wavs:  # the calibrated default policy stops where tests/oracles.py derives it
        check_policy_transcription(asr, str(wav))
    assert asr.transcribe_file(str(wav), exit=1).layers == 1
