"""LibriSpeech and TED-LIUM 3 preparation on generated trees: manifests, segments,
idempotence and bad input (every problem listed with its file and line)."""

import csv
import logging
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from earlyexit_brain.audio_check import read_utterance, row_segment
from earlyexit_brain.data import librispeech, tedlium
from earlyexit_brain.data.common import CorpusError
from earlyexit_brain.data.librispeech import prepare_librispeech
from earlyexit_brain.data.tedlium import normalize_words, prepare_tedlium
from earlyexit_brain.dataio import dataio_prepare
from earlyexit_brain.files import OWNER_MARKER
from tests.real_corpora import LIBRI_UTTS, SR, TED_SEGMENTS, make_librispeech, make_tedlium

TRAIN = ["train-clean-100", "train-other-500"]


def rows(path):
    with open(path, newline="") as fin:
        reader = csv.DictReader(fin)
        return reader.fieldnames, list(reader)


def resolve(wav, data_folder):
    assert wav.startswith("$data_root/")
    return os.path.join(data_folder, wav[len("$data_root/") :])


@pytest.fixture
def libri(tmp_path):
    root = tmp_path / "LibriSpeech"
    info = make_librispeech(str(root))
    return str(root), info, str(tmp_path / "manifests")


@pytest.fixture
def ted(tmp_path):
    root = tmp_path / "TEDLIUM_release-3"
    truth = make_tedlium(str(root))
    return str(root), truth, str(tmp_path / "manifests")


# ------------------------------------------------------------------ LibriSpeech
def test_librispeech_manifests(libri):
    root, info, out = libri
    manifests = prepare_librispeech(root, out, train_splits=TRAIN, num_workers=2)
    assert sorted(manifests) == ["dev-clean", "test-clean", "test-other", "train"]
    header, train = rows(manifests["train"])
    assert header == ["ID", "duration", "wav", "spk_id", "wrd"]
    # training splits merged, in split order
    assert len(train) == 3 * LIBRI_UTTS
    assert {info[r["ID"]][0] for r in train} == set(TRAIN)
    for name in ("train", "dev-clean", "test-clean", "test-other"):
        for r in rows(manifests[name])[1]:
            split, words, samples = info[r["ID"]]
            assert r["wrd"] == words and r["spk_id"] == r["ID"].split("-")[0]
            assert abs(float(r["duration"]) - samples / SR) < 1e-4
            path = resolve(r["wav"], root)
            assert path == os.path.join(root, split, *r["ID"].split("-")[:2], r["ID"] + ".flac")
            assert sf.info(path).frames == samples


def test_librispeech_subset_and_limit(libri):
    root, _, out = libri
    manifests = prepare_librispeech(
        root,
        out,
        train_splits=["train-clean-100"],
        dev_splits=[],
        test_splits=["test-other"],
        max_utterances=3,
        num_workers=1,
    )
    assert sorted(manifests) == ["test-other", "train"]
    assert [r["ID"] for r in rows(manifests["train"])[1]] == ["19-119-0000", "19-119-0001", "19-119-0002"]
    assert len(rows(manifests["test-other"])[1]) == 3


def test_librispeech_is_idempotent(libri, monkeypatch):
    root, _, out = libri
    first = prepare_librispeech(root, out, train_splits=TRAIN)
    stamp = os.path.join(out, librispeech.STAMP)
    before = {p: os.stat(p).st_mtime_ns for p in list(first.values()) + [stamp]}

    def no_headers(*args, **kwargs):
        raise AssertionError("headers read again although nothing changed")

    monkeypatch.setattr(librispeech, "read_headers", no_headers)
    assert prepare_librispeech(root, out, train_splits=TRAIN) == first
    assert {p: os.stat(p).st_mtime_ns for p in before} == before
    monkeypatch.undo()
    # a changed option redoes the work
    again = prepare_librispeech(root, out, train_splits=TRAIN, max_utterances=2)
    assert len(rows(again["train"])[1]) == 2
    # so does a changed transcript file
    trans = os.path.join(root, "dev-clean", "40", "140", "40-140.trans.txt")
    with open(trans) as fin:
        lines = fin.read().splitlines()
    with open(trans, "w") as fout:
        fout.write("\n".join(lines[:2]) + "\n")
    again = prepare_librispeech(root, out, train_splits=TRAIN, max_utterances=2)
    assert len(rows(again["dev-clean"])[1]) == 2


def test_librispeech_preparation_killed_before_its_stamp_is_redone(libri):
    root, _, out = libri
    first = prepare_librispeech(root, out, train_splits=TRAIN)
    expected = rows(first["train"])
    # a crash after one manifest was (partly) written and before the stamp
    os.remove(os.path.join(out, librispeech.STAMP))
    with open(first["train"]) as fin:
        head = fin.read()[:120]
    with open(first["train"], "w") as fout:
        fout.write(head)
    again = prepare_librispeech(root, out, train_splits=TRAIN)
    assert rows(again["train"]) == expected
    assert os.path.exists(os.path.join(out, librispeech.STAMP))


def break_librispeech(root):
    """Four problems: a missing split, a missing audio, an unreadable header, a bad ID."""
    shutil.rmtree(os.path.join(root, "test-other"))
    os.remove(os.path.join(root, "train-clean-100", "19", "119", "19-119-0002.flac"))
    with open(os.path.join(root, "dev-clean", "40", "140", "40-140-0001.flac"), "wb") as fout:
        fout.write(b"not a flac file at all")
    trans = os.path.join(root, "train-other-500", "32", "132", "32-132.trans.txt")
    with open(trans, "a") as fout:
        fout.write("99-999-0000 WRONG CHAPTER\n")
    return trans


def test_librispeech_bad_input_lists_every_problem(libri):
    root, _, out = libri
    prepare_librispeech(root, out, train_splits=TRAIN)  # a finished run, then the tree breaks
    bad_id_file = break_librispeech(root)
    with pytest.raises(CorpusError) as err:
        prepare_librispeech(root, out, train_splits=TRAIN)
    msg = str(err.value)
    assert "4 problem(s)" in msg
    assert os.path.join(root, "test-other") + ": split folder 'test-other' not found" in msg
    assert (
        os.path.join(root, "train-clean-100", "19", "119", "19-119.trans.txt") + ":3: audio file "
        "not found: " + os.path.join(root, "train-clean-100", "19", "119", "19-119-0002.flac")
    ) in msg
    assert os.path.join(root, "dev-clean", "40", "140", "40-140-0001.flac") + ": cannot read the audio header" in msg
    assert f"{bad_id_file}:{LIBRI_UTTS + 1}: utterance ID '99-999-0000'" in msg
    assert "on_error: skip" in msg
    # nothing left that could pass for a finished manifest
    assert os.listdir(out) == [OWNER_MARKER]  # no manifest, only the folder's marker


def test_librispeech_skip_mode_warns_and_leaves_out(libri, caplog):
    root, _, out = libri
    break_librispeech(root)
    with caplog.at_level(logging.WARNING):
        manifests = prepare_librispeech(root, out, train_splits=TRAIN, on_error="skip")
    assert "4 problem(s)" in caplog.text and "19-119-0002.flac" in caplog.text
    assert sorted(manifests) == ["dev-clean", "test-clean", "train"]
    ids = [r["ID"] for r in rows(manifests["train"])[1]]
    assert len(ids) == 3 * LIBRI_UTTS - 1 and "19-119-0002" not in ids
    assert "40-140-0001" not in [r["ID"] for r in rows(manifests["dev-clean"])[1]]
    # a run that skipped problems checks the corpus again: they are reported again,
    # and a fixed file comes back
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert prepare_librispeech(root, out, train_splits=TRAIN, on_error="skip") == manifests
    assert "4 problem(s)" in caplog.text
    sf.write(
        os.path.join(root, "train-clean-100", "19", "119", "19-119-0002.flac"),
        np.zeros(8000, dtype=np.float32),
        SR,
        format="FLAC",
    )
    again = prepare_librispeech(root, out, train_splits=TRAIN, on_error="skip")
    assert "19-119-0002" in [r["ID"] for r in rows(again["train"])[1]]


def test_librispeech_option_errors_name_the_option(libri):
    root, _, out = libri
    with pytest.raises(CorpusError, match="'train_splits': unknown split"):
        prepare_librispeech(root, out, train_splits=["train-clean-999"])
    with pytest.raises(CorpusError, match="'on_error'"):
        prepare_librispeech(root, out, on_error="ignore")
    with pytest.raises(CorpusError, match="'max_utterances'"):
        prepare_librispeech(root, out, max_utterances=0)
    with pytest.raises(CorpusError, match="not a folder"):
        prepare_librispeech(os.path.join(root, "nowhere"), out)


# ------------------------------------------------------------------ TED-LIUM
def test_tedlium_normalisation():
    assert normalize_words("so it 's <unk> what we 've {NOISE} done (2)") == "so it's what we've done"
    assert normalize_words("i 'm here and you 're not , they 'll see") == "i'm here and you're not , they'll see"
    assert normalize_words("<unk> <unk>") == ""


def test_tedlium_manifests_and_segments(ted):
    root, truth, out = ted
    manifests = prepare_tedlium(root, out, num_workers=2)
    assert sorted(manifests) == ["dev", "test", "train"]
    for split, path in manifests.items():
        header, got = rows(path)
        assert header == ["ID", "duration", "wav", "start", "stop", "spk_id", "wrd"]
        expected = truth[("legacy", split)]
        assert len(got) == len(expected) == TED_SEGMENTS * len({t for t, *_ in expected})
        for r, (talk, start, stop, words) in zip(got, expected):
            assert r["wrd"] == words and "<unk>" not in r["wrd"] and " 's" not in r["wrd"]
            assert r["ID"] == f"{talk}-{int(round(start * 100)):07d}-{int(round(stop * 100)):07d}"
            assert int(r["start"]) == int(round(start * SR)) and int(r["stop"]) == int(round(stop * SR))
            assert abs(float(r["duration"]) - (stop - start)) < 1e-3
            assert r["wav"] == f"$data_root/legacy/{split}/sph/{talk}.sph"
    # the segment is read in place from the NIST sphere file
    r = rows(manifests["train"])[1][2]
    path = resolve(r["wav"], root)
    assert sf.info(path).format == "NIST"
    sig = read_utterance(path, *row_segment(r["start"], r["stop"]))
    ref, _ = sf.read(path, start=int(r["start"]), stop=int(r["stop"]), dtype="float32")
    assert sig.shape[0] == int(r["stop"]) - int(r["start"])
    assert torch.allclose(sig, torch.from_numpy(ref), atol=1e-4)
    # the ignore and <unk>-only segments were dropped and counted; no audio was written
    assert not [f for f in os.listdir(out) if not f.endswith((".csv", ".json"))]
    other = prepare_tedlium(root, str(out) + "-sa", partition="speaker-adaptation", splits=["dev"])
    assert rows(other["dev"])[1][0]["wav"].startswith("$data_root/speaker-adaptation/dev/sph/")


def test_tedlium_is_idempotent(ted, monkeypatch):
    root, _, out = ted
    first = prepare_tedlium(root, out)
    monkeypatch.setattr(tedlium, "read_headers", lambda *a, **k: pytest.fail("prepared again"))
    assert prepare_tedlium(root, out) == first
    monkeypatch.undo()
    assert len(rows(prepare_tedlium(root, out, max_utterances=2)["train"])[1]) == 2


def test_tedlium_bad_input_lists_every_problem(ted):
    root, _, out = ted
    stm = os.path.join(root, "legacy", "train", "stm", "AliceTalk_2010.stm")
    with open(stm, "a") as fout:
        fout.write("AliceTalk_2010 1 AliceTalk_2010 abc 2.0 <o,f0,female> bad start\n")  # line 8
        fout.write("AliceTalk_2010 1 AliceTalk_2010 3.00 2.50 <o,f0,female> stop first\n")  # line 9
        fout.write("AliceTalk_2010 1 AliceTalk_2010 900.0 901.0 <o,f0,female> too late\n")  # line 10
        fout.write("AliceTalk_2010 1\n")  # line 11
    dev_stm = os.path.join(root, "legacy", "dev", "stm", "CarolTalk_2011.stm")
    os.remove(os.path.join(root, "legacy", "dev", "sph", "CarolTalk_2011.sph"))
    with open(os.path.join(root, "legacy", "train", "sph", "BobTalk_2012X.sph"), "wb") as fout:
        fout.write(b"NIST_1A\n   1024\nbroken header")
    shutil.rmtree(os.path.join(root, "legacy", "test"))
    with pytest.raises(CorpusError) as err:
        prepare_tedlium(root, out)
    msg = str(err.value)
    assert "7 problem(s)" in msg
    assert f"{stm}:8: bad times: start 'abc', stop '2.0' are not numbers" in msg
    assert f"{stm}:9: bad times: stop 2.50 is not after start 3.00" in msg
    assert f"{stm}:10: bad times: segment 900.00-901.00 s goes beyond the end" in msg
    assert f"{stm}:11: malformed stm line" in msg
    assert f"{dev_stm}:2: audio file not found: " in msg
    assert "BobTalk_2012X.sph: cannot read the audio header" in msg
    assert "split folder 'legacy/test' (with stm/ and sph/) not found" in msg
    assert not os.path.exists(out) or os.listdir(out) == [OWNER_MARKER]
    # skip mode keeps the good segments of the good talks
    manifests = prepare_tedlium(root, out, on_error="skip")
    assert sorted(manifests) == ["train"]
    assert len(rows(manifests["train"])[1]) == TED_SEGMENTS  # AliceTalk only


# ------------------------------------------------------------------ pipeline and tokenizer
class _Tokens:
    class sp:  # noqa: N801  (the SentencePiece processor's interface)
        @staticmethod
        def encode_as_ids(text):
            return [1 + (ord(c) % 20) for c in text.replace(" ", "")][:8]


class _Encoder:
    @staticmethod
    def output_frames(n):
        return (n + 3) // 4


def test_pipeline_reads_segments_and_whole_files(ted, libri):
    ted_root, _, ted_out = ted
    ls_root, info, ls_out = libri
    ted_m = prepare_tedlium(ted_root, ted_out, splits=["train", "dev"])
    ls_m = prepare_librispeech(ls_root, ls_out, train_splits=[], dev_splits=[], test_splits=["test-clean"])
    # a LibriSpeech manifest of absolute paths, as older manifests are
    _, test_rows = rows(ls_m["test-clean"])
    for r in test_rows:
        r["wav"] = resolve(r["wav"], ls_root)
    plain = os.path.join(ls_out, "plain.csv")
    with open(plain, "w", newline="") as fout:
        writer = csv.DictWriter(fout, fieldnames=list(test_rows[0]))
        writer.writeheader()
        writer.writerows(test_rows)
    hparams = dict(
        data_folder=ted_root,
        train_csv=ted_m["train"],
        valid_csv=ted_m["dev"],
        test_csv={"test": plain},
        test_sets=["test"],
        sample_rate=SR,
        hop_length=10,
        max_duration=30.0,
        eval_batch_size=2,
        dynamic_batching=False,
        batch_size=2,
        sorting="ascending",
        seed=1,
    )
    train, valid, tests = dataio_prepare(hparams, _Tokens, _Encoder)[:3]
    for ds, manifest in ((train, ted_m["train"]), (valid, ted_m["dev"])):
        by_id = {r["ID"]: r for r in rows(manifest)[1]}
        for item in ds:
            r = by_id[item["id"]]
            assert item["sig"].shape[0] == int(r["stop"]) - int(r["start"])
    for item in tests["test"]:
        assert item["sig"].shape[0] == info[item["id"]][2]


def test_bpe_tokenizer_with_256_units(tmp_path):
    from earlyexit_brain.experiment import build_tokenizer

    rng = np.random.default_rng(0)
    letters = list("ETAOINSHRDLUCMWFGYPB")
    words = ["".join(rng.choice(letters, size=int(rng.integers(3, 8)))) for _ in range(400)]
    manifest = tmp_path / "train.csv"
    with open(manifest, "w") as fout:
        fout.write("ID,duration,wav,spk_id,wrd\n")
        for i in range(300):
            fout.write(f"u{i},1.0,x.flac,s,{' '.join(rng.choice(words, size=8))}\n")
    tok = build_tokenizer(
        dict(
            save_folder=str(tmp_path / "save"),
            output_neurons=256,
            train_csv=str(manifest),
            token_type="bpe",
            blank_index=0,
        )
    )
    assert tok.sp.vocab_size() == 256
    assert os.path.basename(tok.prefix_model_file) == "256_bpe"
    assert tok.sp.decode_ids(tok.sp.encode_as_ids(" ".join(words[:5]))) == " ".join(words[:5])
