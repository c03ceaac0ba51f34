"""EarlyExitASR on an exported inference folder (tiny random model, generated audio)."""

import math

import numpy as np
import pytest
import sentencepiece as spm
import soundfile as sf
import torch
from speechbrain.decoders import ctc_greedy_decode
from speechbrain.lobes.features import Fbank
from speechbrain.processing.features import InputNormalization

from earlyexit_brain.evaluation import collect_exit_outputs, confidence_exits
from earlyexit_brain.exits import GreedyPosteriorPolicy, fit_latency_table
from earlyexit_brain.inference import EarlyExitASR, export_inference_folder
from earlyexit_brain.models.conformer import CTCExitHeads, EarlyExitConformerEncoder
from earlyexit_brain.models.pipeline import EarlyExitCTCModel

SR = 16000


def tone(seconds, sr=SR, freq=220.0, amp=0.3, seed=0):
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    return (amp * np.sin(2 * math.pi * freq * t) + 0.01 * rng.standard_normal(len(t))).astype("float32")


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    text = folder / "text.txt"
    text.write_text("\n".join(["HELLO WORLD", "THE CAT SAT ON THE MAT", "A QUICK BROWN FOX",
                               "JUMPS OVER THE LAZY DOG", "IT'S FINE"]) + "\n")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "chars"),
                                   model_type="char", vocab_size=28, character_coverage=1.0,
                                   bos_id=-1, eos_id=-1, unk_id=0, hard_vocab_limit=False,
                                   minloglevel=2)
    return str(folder / "chars.model")


@pytest.fixture(scope="module")
def model(tokenizer_path):
    torch.manual_seed(0)
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    normalize = InputNormalization(norm_type="global")
    fbank = Fbank(n_mels=20)
    normalize(fbank(torch.randn(2, SR)), torch.ones(2))  # statistics in training mode
    encoder = EarlyExitConformerEncoder(20, num_layers=6, d_model=32, nhead=4, d_ffn=64,
                                        exit_layers=[2, 4, 6], kernel_size=3, dropout=0.0)
    heads = CTCExitHeads(32, sp.vocab_size() + 2, 3)
    return EarlyExitCTCModel(fbank, normalize, encoder, heads).eval()


POLICIES = {
    "default": {"policy": "posterior_greedy", "threshold": 0.05},
    "thresholds": {"entropy": 0.99, "posterior": 0.5, "posterior_greedy": 0.05},
    "options": {"entropy": {"normalize": True}, "posterior_greedy": {"form": "mean"},
                "posterior": {"beam_size": 4}},
}


@pytest.fixture(scope="module")
def folder(model, tokenizer_path, tmp_path_factory):
    table = fit_latency_table([{"seconds": 1.0, "ms": [1.0, 2.0, 3.0]},
                               {"seconds": 2.0, "ms": [2.0, 4.0, 6.0]}])
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


def greedy_text(model, tokenizer_path, wav, exit_index):
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    with torch.no_grad():
        lp = model.exit_log_probs(wav[None], torch.ones(1), exit_index)
    tokens = ctc_greedy_decode(lp, torch.ones(1), blank_id=0)[0]
    return "".join(sp.id_to_piece(t) for t in tokens if t < sp.vocab_size()).replace("▁", " ").strip()


def test_folder_contents(folder):
    import os

    assert sorted(os.listdir(folder)) == sorted(
        ["hyperparams.yaml", "model.ckpt", "normalizer.ckpt", "tokenizer.ckpt",
         "exit_policies.ckpt", "latency_table.ckpt"])


def test_fixed_exit_transcription_matches_the_model(asr, model, tokenizer_path, audio):
    wav = torch.tensor(sf.read(audio["a"], dtype="float32")[0])
    for exit in (1, 2, 3):
        result = asr.transcribe_file(audio["a"], exit=exit)
        assert result.exit == exit and result.layers == [2, 4, 6][exit - 1]
        assert result.text == greedy_text(model, tokenizer_path, wav, exit - 1)
        assert result.path == audio["a"] and result.error is None


def test_policies_by_name_and_stored_defaults(asr):
    assert asr.make_policy().describe() == {"policy": "posterior_greedy", "threshold": 0.05,
                                            "form": "mean"}
    assert asr.make_policy("entropy").threshold == 0.99
    assert asr.make_policy("posterior").threshold == 0.5
    assert asr.make_policy("posterior_greedy", 0.7).threshold == 0.7
    assert asr.make_policy("budget", 100.0).budget_ms == 100.0


def test_budget_policy_uses_the_stored_latency_table(asr, audio):
    # table: exit k costs k ms per second of audio: 1.2 s -> 1.2 / 2.4 / 3.6 ms
    assert asr.transcribe_file(audio["a"], policy="budget", threshold=1000.0).exit == 3
    assert asr.transcribe_file(audio["a"], policy="budget", threshold=3.0).exit == 2
    assert asr.transcribe_file(audio["a"], policy="budget", threshold=0.5).exit == 1


def test_posterior_nbest_policy_runs(asr, audio):
    result = asr.transcribe_file(audio["a"], policy="posterior", threshold=0.0)
    assert result.exit == 1 and result.layers == 2
    result = asr.transcribe_file(audio["a"], policy="posterior", threshold=1.0)
    assert result.exit in (1, 2, 3)


def test_resampling_and_down_mixing(asr, audio):
    signal = asr.load_checked(audio["stereo8k"])
    assert signal.dim() == 1
    assert abs(signal.shape[0] - 2 * SR) <= 2
    # channels 0.4 and 0.2 amplitude -> mean 0.3
    assert float(signal[SR // 2: SR].abs().max()) == pytest.approx(0.3, abs=0.03)
    assert asr.transcribe_file(audio["stereo8k"], exit=1).exit == 1


@pytest.mark.parametrize("name, words", [
    ("missing", "no such audio file"), ("zero_bytes", "cannot be decoded"),
    ("garbage", "cannot be decoded"), ("empty", "empty"), ("silent", "silent"),
])
def test_bad_files_name_the_file(asr, audio, name, words):
    with pytest.raises(ValueError, match=words) as err:
        asr.transcribe_file(audio[name])
    assert audio[name] in str(err.value)


@pytest.mark.parametrize("kwargs, words", [
    ({"policy": "fastest"}, "policy: unknown policy 'fastest'"),
    ({"policy": "oracle"}, "analysis"),
    ({"policy": "posterior_greedy", "threshold": 2.0}, "threshold"),
    ({"policy": "entropy", "threshold": -1.0}, "threshold"),
    ({"exit": 4}, "exit: the model has exits 1..3, got 4"),
    ({"exit": 1, "policy": "entropy"}, "exit: give either"),
])
def test_bad_arguments(asr, audio, kwargs, words):
    with pytest.raises(ValueError, match=words.replace(".", r"\.")):
        asr.transcribe_file(audio["a"], **kwargs)


def test_a_bad_file_in_a_batch_is_reported_and_the_rest_transcribed(asr, audio):
    results = asr.transcribe_files([audio["a"], audio["garbage"], audio["b"]], exit=2)
    assert [r.path for r in results] == [audio["a"], audio["garbage"], audio["b"]]
    assert results[1].text is None and audio["garbage"] in results[1].error
    assert results[0].exit == 2 and results[2].exit == 2 and results[0].error is None
    assert results[0].text == asr.transcribe_file(audio["a"], exit=2).text


def test_no_stored_threshold_is_an_error(folder, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    (bare / "exit_policies.ckpt").write_text("{}\n")
    asr = EarlyExitASR.from_hparams(source=str(bare))
    assert asr.make_policy().describe() == {"policy": "fixed", "exit": 3}
    with pytest.raises(ValueError, match="threshold: no calibrated threshold"):
        asr.make_policy("entropy")


def test_stock_speechbrain_encoder_asr_loads_the_folder(folder, asr, audio):
    from speechbrain.inference.ASR import EncoderASR

    stock = EncoderASR.from_hparams(source=folder)
    assert stock.transcribe_file(audio["a"]) == asr.transcribe_file(audio["a"], exit=3).text


def test_simulated_policy_decisions_equal_a_real_dynamic_run(asr, model, tokenizer_path):
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    items = [{"id": f"u{i}", "sig": torch.tensor(tone(0.5 + 0.3 * i, freq=150 + 40 * i, seed=i)),
              "wrd": "THE CAT"} for i in range(6)]
    scorer = GreedyPosteriorPolicy(0.5)
    outputs = collect_exit_outputs(model, items, sp, {"posterior_greedy": scorer})
    assert outputs.errors.shape == (6, 3) and (outputs.exit_ms[:, 1:] >= outputs.exit_ms[:, :-1]).all()
    threshold = float(outputs.scores["posterior_greedy"][:, 0].median())
    simulated = confidence_exits(outputs, scorer, "posterior_greedy", threshold)
    assert 0 < int((simulated == 0).sum()) < 6  # some stop at exit 1, some go on
    for i, item in enumerate(items):
        real = asr.transcribe_batch(item["sig"][None], policy=GreedyPosteriorPolicy(threshold))[0]
        assert real.exit - 1 == int(simulated[i])
        assert real.text == outputs.hyps[i][int(simulated[i])]


def test_moving_the_model_moves_the_normalisation_statistics(tokenizer_path):
    normalize = InputNormalization(norm_type="global")
    fbank = Fbank(n_mels=20)
    normalize(fbank(torch.randn(1, SR)), torch.ones(1))
    encoder = EarlyExitConformerEncoder(20, num_layers=2, d_model=16, nhead=2, d_ffn=32,
                                        exit_layers=[1, 2], kernel_size=3)
    model = EarlyExitCTCModel(fbank, normalize, encoder, CTCExitHeads(16, 5, 2)).eval()
    model.to(torch.float64)  # stands in for a device move: the same _apply path
    assert normalize.glob_mean.dtype == torch.float64 and normalize.glob_std.dtype == torch.float64
    model.to(torch.float32)
    assert normalize.glob_mean.dtype == torch.float32
    with torch.no_grad():
        assert model(torch.randn(1, SR), torch.ones(1)).shape[-1] == 5
