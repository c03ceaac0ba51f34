"""Synthetic corpus: manifests, splits, determinism, caching, validation."""

import csv
import hashlib
import os
import time

import pytest
import soundfile as sf

from earlyexit_brain.data import synthetic_plan
from earlyexit_brain.data.synthetic import MANIFEST_COLUMNS, SPLITS, prepare_synthetic
from earlyexit_brain.data.text import (
    extract_sentences,
    find_fortune_file,
    normalize_text,
    restrict_vocabulary,
)
from tests.conftest import TINY_CORPUS


def read_manifest(path):
    with open(path, newline="") as fin:
        reader = csv.DictReader(fin)
        assert reader.fieldnames == MANIFEST_COLUMNS
        return list(reader)


def test_normalisation_is_librispeech_style():
    assert normalize_text("Don't panic -- it's a well-known 'test'!") == "DON'T PANIC IT'S A WELL KNOWN TEST"
    assert normalize_text("  Hello,\tworld.  ") == "HELLO WORLD"


def test_sentence_source_is_installed_and_clean():
    sentences = extract_sentences(find_fortune_file())
    assert len(sentences) > 5000
    for s in sentences[:2000]:
        assert s == normalize_text(s) and 4 <= len(s.split()) <= 16
    small = restrict_vocabulary(sentences, 500)
    assert 0 < len(small) < len(sentences)
    assert len({w for s in small for w in s.split()}) <= 500


def test_manifests_and_splits(tiny_corpus):
    folder, manifests = tiny_corpus
    assert sorted(manifests) == sorted(SPLITS)
    rows = {split: read_manifest(path) for split, path in manifests.items()}
    assert len(rows["train"]) == TINY_CORPUS["n_train"]
    assert len(rows["dev"]) == TINY_CORPUS["n_dev_sentences"]
    assert len(rows["test"]) == len(rows["test_unseen_voice"]) == TINY_CORPUS["n_test_sentences"]
    texts = {split: {r["wrd"] for r in r_} for split, r_ in rows.items()}
    # held-out sentences are unseen in training; both test sets share their sentences
    assert not texts["test"] & texts["train"] and not texts["dev"] & texts["train"]
    assert not texts["test"] & texts["dev"]
    assert texts["test"] == texts["test_unseen_voice"]
    for split in ("train", "dev", "test", "test_unseen_voice"):
        for r in rows[split]:
            assert r["wrd"] == normalize_text(r["wrd"])
            info = sf.info(r["wav"])
            assert info.samplerate == 16000 and info.channels == 1
            assert abs(info.frames / 16000 - float(r["duration"])) < 1e-3
            assert 0.5 < float(r["duration"]) < 15
    seen_speakers = {r["spk_id"] for s in ("train", "dev", "test") for r in rows[s]}
    unseen_speakers = {r["spk_id"] for r in rows["test_unseen_voice"]}
    assert not seen_speakers & unseen_speakers


def test_unseen_voices_use_variants_never_used_in_training():
    opts = dict(synthetic_plan.DEFAULTS, **dict(TINY_CORPUS, n_train=2000, closed_vocabulary=True))
    sentences = restrict_vocabulary(
        extract_sentences(find_fortune_file(), opts["min_words"], opts["max_words"]), opts["max_vocab"]
    )
    plan = synthetic_plan.plan_corpus(opts, sentences)
    variant = lambda u: u["voice"].split("+")[1]  # noqa: E731
    train_variants = {variant(u) for u in plan["train"] + plan["dev"] + plan["test"]}
    unseen_variants = {variant(u) for u in plan["test_unseen_voice"]}
    assert unseen_variants and not train_variants & unseen_variants
    # closed vocabulary: every held-out word occurs in a training sentence
    train_words = {w for u in plan["train"] for w in u["text"].split()}
    held = plan["dev"] + plan["test"]
    assert all(w in train_words for u in held for w in u["text"].split())


def digest_corpus(manifests):
    h = hashlib.sha1()
    for split in SPLITS:
        for r in read_manifest(manifests[split]):
            h.update(f"{r['ID']}|{r['duration']}|{r['spk_id']}|{r['wrd']}".encode())
            with open(r["wav"], "rb") as fin:
                h.update(fin.read())
    return h.hexdigest()


def test_deterministic_for_a_seed_whatever_the_worker_count(tiny_corpus, tmp_path):
    _, manifests = tiny_corpus
    again = prepare_synthetic(str(tmp_path / "again"), num_workers=1, **TINY_CORPUS)
    assert digest_corpus(again) == digest_corpus(manifests)
    other = prepare_synthetic(str(tmp_path / "other"), num_workers=2, **dict(TINY_CORPUS, seed=8))
    assert digest_corpus(other) != digest_corpus(manifests)


def test_second_run_reuses_the_corpus(tiny_corpus):
    folder, manifests = tiny_corpus
    before = {p: os.path.getmtime(p) for p in manifests.values()}
    start = time.time()
    assert prepare_synthetic(folder, num_workers=2, **TINY_CORPUS) == manifests
    assert time.time() - start < 2.0
    assert before == {p: os.path.getmtime(p) for p in manifests.values()}


def test_interrupted_generation_is_completed_not_trusted(tmp_path):
    folder = str(tmp_path / "c")
    manifests = prepare_synthetic(folder, num_workers=1, **TINY_CORPUS)
    reference = digest_corpus(manifests)
    # simulate a crash: completion marker and one manifest gone, a stray temp file
    os.remove(os.path.join(folder, "synthetic_corpus.json"))
    os.remove(manifests["dev"])
    open(os.path.join(folder, "wavs", "train", "junk.wav.tmp"), "w").close()
    assert digest_corpus(prepare_synthetic(folder, num_workers=1, **TINY_CORPUS)) == reference


@pytest.mark.parametrize(
    "options, key",
    [
        (dict(n_train=0), "n_train"),
        (dict(n_train="many"), "n_train"),
        (dict(rate_range=[200, 100]), "rate_range"),
        (dict(max_words=2), "max_words"),
        (dict(rate_range=[150, 600]), "rate_range"),
        (dict(rate_range=[50, 200]), "rate_range"),
        (dict(pitch_range=[20, 150]), "pitch_range"),
        (dict(pitch_range=[-5, 50]), "pitch_range"),
        (dict(colour="blue"), "colour"),
        (dict(n_test_sentences=100000), "n_test_sentences"),
    ],
)
def test_bad_options_name_the_key(tmp_path, options, key):
    with pytest.raises(ValueError, match=key):
        prepare_synthetic(str(tmp_path / "x"), **dict(TINY_CORPUS, **options))


def test_data_folder_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(NotADirectoryError, match="data_folder"):
        prepare_synthetic(str(path), **TINY_CORPUS)


def test_controller_split_adds_held_out_sentences_and_changes_nothing_else():
    opts = dict(synthetic_plan.DEFAULTS, **dict(TINY_CORPUS, n_train=2000))
    every = extract_sentences(find_fortune_file(), opts["min_words"], opts["max_words"])
    sentences = restrict_vocabulary(every, opts["max_vocab"])
    plain = synthetic_plan.plan_corpus(opts, sentences)
    with_controller = synthetic_plan.plan_corpus(
        dict(opts, n_controller_sentences=50),
        sentences,
        synthetic_plan.controller_candidates(every, opts["max_vocab"]),
    )
    assert "controller" not in plain
    assert {k: v for k, v in with_controller.items() if k != "controller"} == plain
    controller = with_controller["controller"]
    assert len(controller) == 50 and len({u["text"] for u in controller}) == 50
    others = {u["text"] for split in plain.values() for u in split}
    assert not others & {u["text"] for u in controller}
    # exactly one word outside the max_vocab most frequent words (counted here from scratch)
    counts = {}
    for s in every:
        for w in s.split():
            counts[w] = counts.get(w, 0) + 1
    top = {w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: opts["max_vocab"]]}
    assert all(sum(w not in top for w in u["text"].split()) == 1 for u in controller)
    seen = {u["spk_id"] for u in plain["train"]}
    assert {u["spk_id"] for u in controller} <= seen
    with pytest.raises(ValueError, match="n_controller_sentences"):
        synthetic_plan.plan_corpus(dict(opts, n_controller_sentences=10**6), sentences, ["ONE SENTENCE"])
    with pytest.raises(ValueError, match="n_controller_sentences"):
        prepare_synthetic("unused", **dict(TINY_CORPUS, n_controller_sentences=-1))
