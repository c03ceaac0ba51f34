"""Fixtures shared by the unit tests of inference and publishing: a tiny random
early-exit model, its tokenizer, an exported inference folder and generated audio."""

import numpy as np
import pytest
import sentencepiece as spm
import soundfile as sf
import torch
from signals import SR, tone  # tests/unit/signals.py
from speechbrain.lobes.features import Fbank
from speechbrain.processing.features import InputNormalization
from tokenizer_helpers import char_tokenizer  # tests/unit/tokenizer_helpers.py

from earlyexit_brain.export import export_inference_folder
from earlyexit_brain.inference import EarlyExitASR
from earlyexit_brain.latency import fit_latency_table
from earlyexit_brain.models.conformer import EarlyExitConformerEncoder
from earlyexit_brain.models.exits import CTCExitHeads
from earlyexit_brain.models.pipeline import EarlyExitCTCModel


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return char_tokenizer(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def model(tokenizer_path):
    torch.manual_seed(0)
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    normalize = InputNormalization(norm_type="global")
    fbank = Fbank(n_mels=20)
    normalize(fbank(torch.randn(2, SR)), torch.ones(2))  # statistics in training mode
    encoder = EarlyExitConformerEncoder(
        20, num_layers=6, d_model=32, nhead=4, d_ffn=64, exit_layers=[2, 4, 6], kernel_size=3, dropout=0.0
    )
    heads = CTCExitHeads(32, sp.vocab_size() + 2, 3)
    return EarlyExitCTCModel(fbank, normalize, encoder, heads).eval()


POLICIES = {
    "default": {"policy": "posterior_greedy", "threshold": 0.05},
    "thresholds": {"entropy": 0.99, "posterior": 0.5, "posterior_greedy": 0.05},
    "options": {
        "entropy": {"normalize": True},
        "posterior_greedy": {"form": "mean"},
        "posterior": {"beam_size": 4, "token_prune_min_logp": -3.0},
    },
}


@pytest.fixture(scope="module")
def folder(model, tokenizer_path, tmp_path_factory):
    table = fit_latency_table([{"seconds": 1.0, "ms": [1.0, 2.0, 3.0]}, {"seconds": 2.0, "ms": [2.0, 4.0, 6.0]}])
    out = tmp_path_factory.mktemp("exp") / "inference"
    features = {"sample_rate": SR, "n_fft": 400, "n_mels": 20, "hop_length": 10, "win_length": 25}
    export_inference_folder(str(out), model, features, tokenizer_path, 0, POLICIES, table)
    # a second export replaces the first in place
    return export_inference_folder(str(out), model, features, tokenizer_path, 0, POLICIES, table)


@pytest.fixture(scope="module")
def asr(folder):
    return EarlyExitASR.from_hparams(source=folder)


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio")
    files = {}
    for name, seconds in (("a", 1.2), ("b", 0.8)):
        files[name] = str(d / f"{name}.wav")
        sf.write(files[name], tone(seconds, seed=len(name)), SR)
    stereo = np.stack([tone(2.0, sr=8000, amp=0.4), 0.5 * tone(2.0, sr=8000, amp=0.4)], axis=1)
    files["stereo8k"] = str(d / "stereo8k.flac")
    sf.write(files["stereo8k"], stereo, 8000)
    files["silent"] = str(d / "silent.wav")
    sf.write(files["silent"], np.zeros(SR, dtype="float32"), SR)
    files["empty"] = str(d / "empty.wav")
    sf.write(files["empty"], np.zeros(0, dtype="float32"), SR)
    files["zero_bytes"] = str(d / "zero_bytes.wav")
    open(files["zero_bytes"], "wb").close()
    files["garbage"] = str(d / "garbage.wav")
    with open(files["garbage"], "wb") as fout:
        fout.write(b"RIFF\x00\x00not really a wave file" * 10)
    files["missing"] = str(d / "missing.wav")
    return files
