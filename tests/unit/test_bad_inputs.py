"""Bad input that used to crash or mislead (docs/reliability.md, rows 22-28): audio shorter
than the front end takes, NaN rows in a batch, truncated WAV files, manifests without a
column, a ``--device`` the machine lacks, relative experiment paths when publishing from
another directory, and ``threshold=`` without ``policy=``."""

import csv
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from recipe_modules import recipe
from signals import SR, tone
from speechbrain.lobes.features import Fbank
from speechbrain.processing.features import InputNormalization

from earlyexit_brain.audio_check import BadAudioError, check_rows, make_reader, wav_truncation
from earlyexit_brain.dataio import dataio_prepare
from earlyexit_brain.dynamic import run_model
from earlyexit_brain.models.conformer import EarlyExitConformerEncoder
from earlyexit_brain.models.exits import CTCExitHeads
from earlyexit_brain.models.pipeline import EarlyExitCTCModel
from earlyexit_brain.models.ssl import EarlyExitSSLEncoder, WaveformFeatures, WaveformNormalization
from earlyexit_brain.policies import GreedyPosteriorPolicy
from earlyexit_brain.report import build_report, write_report
from earlyexit_brain.transcribe import main as transcribe_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIN_SAMPLES = 320  # the fixture model: 10 ms hop, two stride-2 convolutions with reflect padding


# ------------------------------------------------------------ audio shorter than the front end
@pytest.fixture(scope="module")
def short(tmp_path_factory):
    """Non-silent files around the fixture model's minimum length (and one at 8 kHz)."""
    d = tmp_path_factory.mktemp("short")
    files = {}
    for samples in (1, 100, MIN_SAMPLES - 1, MIN_SAMPLES):
        files[samples] = str(d / f"s{samples}.wav")
        sf.write(files[samples], tone(1.0, seed=samples)[:samples], SR)
    files["8k"] = str(d / "s8k.wav")  # 150 samples at 8 kHz: 300 at the model's rate
    sf.write(files["8k"], tone(1.0, sr=8000)[:150], 8000)
    return files


def runs(model: EarlyExitCTCModel, samples: int) -> bool:
    try:
        with torch.no_grad():
            model(0.1 * torch.randn(1, samples), torch.ones(1))
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("strides, hop_ms", [([2, 2], 10), ([1, 2], 10), ([2, 2, 2], 10), ([3, 2], 10), ([2, 2], 20)])
def test_min_samples_is_the_shortest_input_the_front_end_takes(strides, hop_ms):
    fbank = Fbank(n_mels=20, hop_length=hop_ms)
    normalize = InputNormalization(norm_type="global")
    normalize(fbank(torch.randn(1, SR)), torch.ones(1))
    encoder = EarlyExitConformerEncoder(
        20,
        num_layers=1,
        d_model=16,
        nhead=2,
        d_ffn=32,
        exit_layers=[1],
        kernel_size=3,
        dropout=0.0,
        frontend_channels=[8] * len(strides),
        frontend_strides=strides,
    )
    model = EarlyExitCTCModel(fbank, normalize, encoder, CTCExitHeads(16, 5, 1)).eval()
    assert not runs(model, model.min_samples - 1) and runs(model, model.min_samples)


def test_min_samples_of_a_waveform_encoder():
    cfg = dict(
        model_type="wav2vec2",
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=[16, 16],
        conv_stride=[5, 2],
        conv_kernel=[10, 3],
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    encoder = EarlyExitSSLEncoder(hf_config=cfg, exit_layers=[1]).eval()
    model = EarlyExitCTCModel(WaveformFeatures(), WaveformNormalization(), encoder, CTCExitHeads(32, 5, 1)).eval()
    assert model.min_samples == 20 and runs(model, 20) and not runs(model, 19)


def test_too_short_audio_is_a_clear_error_naming_the_file(asr, short):
    assert asr.model.min_samples == MIN_SAMPLES
    for key, samples in ((1, 1), (100, 100), (MIN_SAMPLES - 1, MIN_SAMPLES - 1), ("8k", 300)):
        with pytest.raises(
            ValueError,
            match=rf"too short: {samples} samples, the model needs at least "
            rf"{MIN_SAMPLES} \(20 ms\)",
        ) as err:
            asr.transcribe_file(short[key], exit=1)
        assert short[key] in str(err.value)
    assert asr.transcribe_file(short[MIN_SAMPLES], exit=1).error is None


def test_transcribe_files_keeps_every_good_result_around_too_short_files(asr, audio, short):
    paths = [short[100], short[1], audio["a"], short["8k"], audio["b"]]
    results = asr.transcribe_files(paths, exit=2, batch_size=2)  # the first batch: only short files
    assert [r.path for r in results] == paths
    for i in (0, 1, 3):
        assert results[i].text is None and paths[i] in results[i].error and "too short" in results[i].error
    alone = asr.transcribe_files([audio["a"], audio["b"]], exit=2, batch_size=2)  # the same padded batch
    assert [(r.text, r.exit, r.error) for r in (results[2], results[4])] == [(r.text, r.exit, None) for r in alone]


def test_transcribe_command_reports_a_too_short_file_and_goes_on(folder, audio, short, capsys):
    rc = transcribe_main([folder, short[100], audio["a"], short[1], audio["b"], "--exit", "1"])
    captured = capsys.readouterr()
    assert rc == 1
    assert [line.split("\t")[0] for line in captured.out.strip().splitlines()] == [audio["a"], audio["b"]]
    assert f"{short[100]}: the audio is too short" in captured.err and "2 of 4 files failed" in captured.err


# ------------------------------------------------------------ rows of a batch that cannot be used
def pad(signals):
    wavs = torch.nn.utils.rnn.pad_sequence(signals, batch_first=True)
    return wavs, torch.tensor([len(s) / wavs.shape[1] for s in signals])


@pytest.mark.parametrize(
    "kwargs", [{}, {"exit": 1}, {"policy": "entropy"}, {"policy": "posterior"}, {"policy": "budget", "threshold": 2.0}]
)
def test_transcribe_batch_reports_bad_rows_and_transcribes_the_others(asr, kwargs):
    good = [torch.tensor(tone(1.0, seed=1)), torch.tensor(tone(0.7, freq=300, seed=2))]
    nan, inf = torch.tensor(tone(1.2, seed=3)), torch.tensor(tone(0.5, seed=4))
    nan[100:200], inf[5] = float("nan"), float("inf")
    rows = [good[0], nan, torch.tensor(tone(1.0))[:200], good[1], inf, torch.zeros(0)]
    wavs, lens = pad(rows)
    results = asr.transcribe_batch(wavs, lens, **kwargs)
    assert [r.error is None for r in results] == [True, False, False, True, False, False]
    assert "row 1: the audio contains NaN or infinite samples" == results[1].error
    assert "row 2: the audio is too short: 200 samples" in results[2].error
    assert "NaN or infinite" in results[4].error and "row 5: the audio is empty" in results[5].error
    assert all(results[b].text is None and results[b].exit is None for b in (1, 2, 4, 5))
    alone = asr.transcribe_batch(*pad(good), **kwargs)  # the good rows alone give the same results
    assert [(r.text, r.exit, r.layers) for r in alone] == [
        (results[b].text, results[b].exit, results[b].layers) for b in (0, 3)
    ]
    only_bad = asr.transcribe_batch(wavs[[1, 2, 4]], lens[[1, 2, 4]], **kwargs)  # no good row: no raise
    assert [r.text for r in only_bad] == [None] * 3 and all(r.error for r in only_bad)


def test_a_batch_without_bad_rows_is_unchanged(asr, model):
    wavs, lens = pad([torch.tensor(tone(1.0, seed=1)), torch.tensor(tone(0.6, freq=300, seed=2))])
    policy = GreedyPosteriorPolicy(0.05)
    with torch.no_grad():
        direct = run_model(model, wavs, lens, policy, lens * wavs.shape[1] / SR)
    results = asr.transcribe_batch(wavs, lens, policy=policy)
    assert [r.exit for r in results] == [int(e) + 1 for e in direct.exits]
    decode = asr.ctc_decoder()
    assert [r.text for r in results] == [decode(lp[None], torch.ones(1))[0] for lp in direct.log_probs]


# ------------------------------------------------------------ WAV files cut short of their header
@pytest.fixture
def wavs(tmp_path):
    """Complete WAV files of several kinds and copies cut short (``cut_*``)."""
    signal = tone(1.0, seed=5)
    kinds = {
        "pcm16": ("WAV", "PCM_16", 1, "FILE"),
        "float_stereo": ("WAV", "FLOAT", 2, "FILE"),
        "rf64": ("RF64", "PCM_24", 1, "FILE"),
        "extensible": ("WAVEX", "PCM_16", 2, "FILE"),
        "u8_odd": ("WAV", "PCM_U8", 1, "FILE"),
        "rifx": ("WAV", "PCM_16", 1, "BIG"),
    }
    files = {}
    for name, (fmt, subtype, channels, endian) in kinds.items():
        data = signal[: SR - 1] if name == "u8_odd" else signal  # an odd-sized data chunk (padded)
        files[name] = tmp_path / f"{name}.wav"
        sf.write(files[name], np.stack([data] * channels, axis=1), SR, format=fmt, subtype=subtype, endian=endian)
        whole = files[name].read_bytes()
        files[f"cut_{name}"] = tmp_path / f"cut_{name}.wav"
        files[f"cut_{name}"].write_bytes(whole[: len(whole) * 2 // 3])
    return {k: str(v) for k, v in files.items()}


def test_a_truncated_wav_is_bad_audio(wavs):
    problems = check_rows({k: {"wav": v} for k, v in wavs.items()}, SR, max_audio_seconds=60.0)["problems"]
    assert sorted(problems) == sorted(k for k in wavs if k.startswith("cut_"))
    for name, problem in problems.items():
        frames = sf.info(wavs[name]).frames  # what libsndfile reads, without a word
        promised = SR - 1 if name == "cut_u8_odd" else SR
        assert problem == (f"{wavs[name]}: truncated: the header promises {promised} samples, the file holds {frames}")
    with pytest.raises(BadAudioError, match="cut_pcm16.wav: truncated: the header promises 16000 samples"):
        make_reader(SR, "fail", training=True)(wavs["cut_pcm16"])
    assert torch.isnan(make_reader(SR, "skip", training=True)(wavs["cut_pcm16"])).all()  # batch skipped
    assert make_reader(SR, "skip", training=False)(wavs["pcm16"]).shape[0] == SR


def test_a_truncated_wav_in_a_training_manifest_is_left_out_or_fails(tmp_path, wavs):
    rows = [{"ID": k, "duration": "1.0", "wav": v, "spk_id": "s", "wrd": "HI"} for k, v in wavs.items()]
    write_csv(tmp_path / "train.csv", rows)
    write_csv(tmp_path / "dev.csv", rows[:2])
    hparams = manifest_hparams(tmp_path, "train.csv", "dev.csv", bad_audio="skip")
    train = dataio_prepare(hparams, CharTokenizer(), small_encoder())[0]
    assert {item["id"] for item in train} == {k for k in wavs if not k.startswith("cut_")}
    with pytest.raises(BadAudioError, match="6 utterance"):
        dataio_prepare(dict(hparams, bad_audio="fail"), CharTokenizer(), small_encoder())


def test_transcribing_a_truncated_wav_names_the_file(asr, wavs):
    for name in ("cut_pcm16", "cut_float_stereo", "cut_rf64"):
        with pytest.raises(ValueError, match="truncated: the header promises") as err:
            asr.transcribe_file(wavs[name], exit=1)
        assert wavs[name] in str(err.value)
    results = asr.transcribe_files([wavs["cut_pcm16"], wavs["pcm16"]], exit=1)
    assert "truncated" in results[0].error and results[1].error is None
    assert wav_truncation(wavs["pcm16"]) is None


# ------------------------------------------------------------ manifests without a column
class CharTokenizer:
    class _SP:
        def encode_as_ids(self, text):
            return [1 + (ord(c) % 20) for c in text]

    sp = _SP()


def small_encoder():
    return EarlyExitConformerEncoder(40, 1, 16, 2, 32, [1], kernel_size=3)


def write_csv(path, rows, columns=("ID", "duration", "wav", "spk_id", "wrd")):
    with open(path, "w", newline="") as fout:
        writer = csv.DictWriter(fout, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def manifest_hparams(folder, train, dev, **extra):
    return dict(
        data_folder=str(folder),
        train_csv=str(folder / train),
        valid_csv=str(folder / dev),
        test_sets=["test"],
        test_csv={"test": str(folder / dev)},
        sample_rate=SR,
        hop_length=10,
        max_duration=100.0,
        eval_batch_size=2,
        batch_size=2,
        sorting="ascending",
        seed=1,
        save_folder=str(folder / "save"),
        **extra,
    )


@pytest.mark.parametrize("missing", ["duration", "wav", "wrd", "ID"])
def test_a_manifest_without_a_column_names_the_file_and_the_column(tmp_path, missing):
    sf.write(str(tmp_path / "u.wav"), tone(1.0), SR)
    rows = [{"ID": "u", "duration": "1.0", "wav": str(tmp_path / "u.wav"), "spk_id": "s", "wrd": "HI"}]
    write_csv(tmp_path / "train.csv", rows)
    write_csv(tmp_path / "dev.csv", rows, [c for c in ("ID", "duration", "wav", "spk_id", "wrd") if c != missing])
    with pytest.raises(
        ValueError,
        match=rf"dev\.csv: no '{missing}' column; a manifest needs the columns "
        r"ID,duration,wav,wrd",
    ):
        dataio_prepare(manifest_hparams(tmp_path, "train.csv", "dev.csv"), CharTokenizer(), small_encoder())
    rows[0]["duration"] = "one second"
    write_csv(tmp_path / "dev.csv", rows)
    with pytest.raises(ValueError, match=r"dev\.csv: .*one second"):
        dataio_prepare(manifest_hparams(tmp_path, "train.csv", "dev.csv"), CharTokenizer(), small_encoder())


# ------------------------------------------------------------ a device this machine cannot use
@pytest.mark.parametrize(
    "device, words", [("cuda", "no CUDA GPU is available"), ("cuda:3", "no CUDA GPU"), ("gpu", "is not a torch device")]
)
def test_a_device_the_machine_lacks_is_exit_2_with_a_message(folder, audio, capsys, monkeypatch, device, words):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert transcribe_main([folder, audio["a"], "--device", device]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("Error: --device") and words in captured.err and captured.out == ""
    with pytest.raises(SystemExit, match=f"Configuration error: --device.*{words}"):  # the recipes
        recipe("train").main([os.path.join(ROOT, "hparams", "synthetic", "smoke.yaml"), "--device", device])


# ------------------------------------------------------------ publishing from another directory
def make_relative_experiment(base, folder, model):
    """An experiment trained in ``base`` with relative paths, as ``recipes/train.py`` saves them."""
    data, exp = base / "data" / "corpus", base / "results" / "tiny" / "1234"
    data.mkdir(parents=True)
    exp.mkdir(parents=True)
    sf.write(str(data / "u1.wav"), tone(1.5, freq=300, seed=4), SR)
    (data / "test.csv").write_text("ID,duration,wav,spk_id,wrd\nu1,1.5,$data_root/u1.wav,s1,THE MAT\n")
    (exp / "hyperparams.yaml").write_text(
        "sample_rate: 16000\noutput_folder: results/tiny/1234\ndata_folder: data/corpus\n"
        "test_sets: [test]\ntest_csv:\n    test: !ref <data_folder>/test.csv\n"
    )
    shutil.copytree(folder, exp / "inference")
    results = {"test": [{"exit": k + 1, "wer": 90.0 - 10 * k, "cer": 50.0, "n": 1} for k in range(3)]}
    write_report(
        build_report(
            model.encoder, model.heads, results, train={"epochs": 1, "seconds": 1.0}, extra={"exit_layers": [2, 4, 6]}
        ),
        str(exp),
    )
    return exp


def test_publish_from_another_directory_resolves_the_experiment_paths(tmp_path, folder, model, monkeypatch, capsys):
    exp = make_relative_experiment(tmp_path / "where_training_ran", folder, model)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    publish = recipe("publish").main
    assert publish([str(exp), "--repo-id", "alice/tiny", "--dry-run", "--out", str(tmp_path / "hub")]) == 0
    example, _ = sf.read(str(tmp_path / "hub" / "example.wav"))
    assert len(example) == int(1.5 * SR)
    # moved: where training ran cannot be told, and the error says so
    moved = tmp_path / "moved"
    shutil.move(str(exp), str(moved))
    capsys.readouterr()
    assert publish([str(moved), "--repo-id", "alice/tiny", "--dry-run", "--out", str(tmp_path / "h2")]) == 1
    err = capsys.readouterr().err
    assert ("test manifest not found: data/corpus/test.csv (a path relative to the directory training ran in") in err
    assert "moved or deleted" not in err and "--example AUDIO" in err


def test_an_example_manifest_without_a_wav_column_is_named(tmp_path):
    from earlyexit_brain.hub import PublishError, write_example_audio

    (tmp_path / "test.csv").write_text("ID,duration,path,wrd\nu1,1.5,u1.wav,THE MAT\n")
    hparams = {"test_sets": ["test"], "test_csv": {"test": str(tmp_path / "test.csv")}}
    with pytest.raises(PublishError, match=r"test\.csv: no 'wav' column; pass --example AUDIO"):
        write_example_audio(hparams, str(tmp_path / "example.wav"))


# ------------------------------------------------------------ threshold= without policy=
@pytest.mark.parametrize(
    "kwargs",
    [{"threshold": 0.5}, {"threshold": 0.5, "exit": 1}, {"threshold": 0.5, "policy": GreedyPosteriorPolicy(0.1)}],
)
def test_threshold_without_a_policy_is_refused_as_on_the_command_line(asr, audio, kwargs):
    with pytest.raises(ValueError, match="threshold: "):
        asr.make_policy(**kwargs)
    for call in (
        lambda: asr.transcribe_file(audio["a"], **kwargs),
        lambda: asr.transcribe_files([audio["a"]], **kwargs),
        lambda: asr.transcribe_batch(torch.tensor(tone(1.0))[None], **kwargs),
    ):
        with pytest.raises(ValueError, match="threshold: "):
            call()
    if "policy" not in kwargs:
        with pytest.raises(ValueError, match="threshold: give policy= with threshold="):
            asr.make_policy(**kwargs)
    assert asr.make_policy("entropy", 0.5).threshold == 0.5  # with its policy it applies
    assert asr.make_policy().describe() == {"policy": "posterior_greedy", "threshold": 0.05, "form": "mean"}
