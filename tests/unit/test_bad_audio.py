"""Bad audio in manifests: header checks (skip or fail), resampling, down-mixing, run-time faults."""

import csv
import logging
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from earlyexit_brain.audio_check import BadAudioError, check_rows, make_reader, read_utterance
from earlyexit_brain.dataio import dataio_prepare
from earlyexit_brain.models.conformer import EarlyExitConformerEncoder

SR = 16000


def sine(seconds, sr=SR, freq=440.0, amp=0.5):
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * math.pi * freq * t)).astype("float32")


@pytest.fixture
def files(tmp_path):
    f = {}
    f["good"] = tmp_path / "good.wav"
    sf.write(f["good"], sine(1.0), SR)
    f["stereo8k"] = tmp_path / "stereo8k.flac"
    sf.write(f["stereo8k"], np.stack([sine(1.0, 8000), 0.5 * sine(1.0, 8000)], axis=1), 8000)
    f["missing"] = tmp_path / "missing.wav"
    f["zero_bytes"] = tmp_path / "zero_bytes.wav"
    f["zero_bytes"].write_bytes(b"")
    f["corrupt"] = tmp_path / "corrupt.wav"
    f["corrupt"].write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk" * 4)
    f["empty"] = tmp_path / "empty.wav"
    sf.write(f["empty"], np.zeros(0, dtype="float32"), SR)
    f["long"] = tmp_path / "long.wav"
    sf.write(f["long"], np.zeros(SR * 130, dtype="int16"), SR, subtype="PCM_16")
    f["nan"] = tmp_path / "nan.wav"
    bad = sine(1.0)
    bad[100:200] = np.nan
    sf.write(f["nan"], bad, SR, subtype="FLOAT")
    full = tmp_path / "full.flac"
    sf.write(full, sine(1.0, freq=300.0) + 0.05 * np.random.default_rng(0).standard_normal(SR).astype("float32"), SR)
    f["truncated"] = tmp_path / "truncated.flac"
    f["truncated"].write_bytes(full.read_bytes()[:3000])  # a header that promises 1 s
    return {k: str(v) for k, v in f.items()}


def test_header_checks_name_each_problem(files):
    rows = {k: {"wav": v} for k, v in files.items()}
    rows["segment_out"] = {"wav": files["good"], "start": "8000", "stop": "20000"}
    rows["segment_ok"] = {"wav": files["good"], "start": "8000", "stop": "12000"}
    result = check_rows(rows, SR, max_audio_seconds=120.0, num_workers=2)
    problems = result["problems"]
    assert problems["missing"].endswith("missing.wav: missing file")
    assert problems["zero_bytes"].endswith("zero-byte file")
    assert "unreadable or corrupt header" in problems["corrupt"]
    assert "zero-length audio" in problems["empty"]
    assert "longer than max_audio_seconds=120.0" in problems["long"]
    assert "ends after the file's 16000 samples" in problems["segment_out"]
    assert not {"good", "stereo8k", "nan", "segment_ok"} & set(problems)
    assert result["resampled"] == 1 and result["downmixed"] == 1


def test_resampling_and_down_mixing_are_applied(files):
    sig = read_utterance(files["stereo8k"], sample_rate=SR)
    assert sig.dim() == 1 and abs(sig.shape[0] - SR) <= 2
    # mean of the channels (0.5 and 0.25 peak): 0.375 peak, at 440 Hz after resampling
    assert float(sig[2000:14000].abs().max()) == pytest.approx(0.375, abs=0.01)
    spectrum = torch.fft.rfft(sig[:SR]).abs()
    assert abs(int(spectrum.argmax()) - 440) <= 2
    assert read_utterance(files["good"], 4000, 8000).shape[0] == 4000


def test_run_time_faults_skip_or_fail(files, caplog):
    with pytest.raises(BadAudioError, match="nan.wav: NaN or infinite samples"):
        make_reader(SR, "fail", training=True)(files["nan"])
    with pytest.raises(BadAudioError, match="truncated.flac: cannot be decoded"):
        make_reader(SR, "fail", training=False)(files["truncated"])
    with caplog.at_level(logging.WARNING):
        train_sig = make_reader(SR, "skip", training=True)(files["nan"])
        eval_sig = make_reader(SR, "skip", training=False)(files["truncated"])
    assert torch.isnan(train_sig).all()  # the Brain then skips the batch
    assert eval_sig.abs().sum() == 0  # read as silence: the utterance counts as errors
    assert "its batch is skipped" in caplog.text and "read as silence" in caplog.text


def write_manifest(path, rows):
    with open(path, "w", newline="") as fout:
        writer = csv.DictWriter(fout, fieldnames=["ID", "duration", "wav", "spk_id", "wrd"])
        writer.writeheader()
        writer.writerows(rows)


class CharTokenizer:
    class _SP:
        def encode_as_ids(self, text):
            return [1 + (ord(c) % 20) for c in text]

    sp = _SP()


def prepare(tmp_path, files, bad_audio):
    rows = [
        {"ID": k, "duration": "1.0", "wav": v, "spk_id": "s", "wrd": "HI"}
        for k, v in files.items()
        if k not in ("long",)
    ]
    write_manifest(tmp_path / "train.csv", rows)
    write_manifest(tmp_path / "dev.csv", rows[:3])
    hparams = dict(
        data_folder=str(tmp_path),
        train_csv=str(tmp_path / "train.csv"),
        valid_csv=str(tmp_path / "dev.csv"),
        test_sets=["test"],
        test_csv={"test": str(tmp_path / "dev.csv")},
        sample_rate=SR,
        hop_length=10,
        max_duration=100.0,
        eval_batch_size=2,
        batch_size=2,
        sorting="ascending",
        seed=1,
        bad_audio=bad_audio,
        save_folder=str(tmp_path / "save"),
    )
    enc = EarlyExitConformerEncoder(40, 1, 16, 2, 32, [1], kernel_size=3)
    return hparams, dataio_prepare(hparams, CharTokenizer(), enc)


def test_manifest_with_bad_audio_skip_leaves_out_and_counts(tmp_path, files, caplog):
    with caplog.at_level(logging.INFO):
        hparams, data = prepare(tmp_path, files, "skip")
    train, audio_check = data.train, data.audio_check
    ids = {item["id"] for item in train}
    assert ids == {"good", "stereo8k", "nan", "truncated"}  # header-valid files stay
    assert audio_check["train"] == {"skipped": 4, "resampled": 1, "downmixed": 1}
    assert "audio_check" not in hparams  # returned, not written into the hparams
    assert data.controller is None  # no controller_csv, no controller set
    assert "4 utterance(s) with bad audio left out" in caplog.text
    assert "zero_bytes.wav: zero-byte file" in caplog.text
    stereo = next(item for item in train if item["id"] == "stereo8k")
    assert abs(stereo["sig"].shape[0] - SR) <= 2  # resampled to 16 kHz and mono
    # the header checks are cached per manifest
    assert (tmp_path / "save" / "audio_check" / "train.json").exists()


def test_manifest_with_bad_audio_fail_lists_every_file(tmp_path, files):
    with pytest.raises(BadAudioError) as err:
        prepare(tmp_path, files, "fail")
    text = str(err.value)
    assert "train.csv: 4 utterance(s) with bad audio" in text
    for name in ("missing.wav", "zero_bytes.wav", "corrupt.wav", "empty.wav"):
        assert name in text
