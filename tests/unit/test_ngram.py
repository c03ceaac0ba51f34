"""The word n-gram LM estimated from training transcripts (interpolated modified Kneser-Ney)."""

import csv

import pytest
import torch

from earlyexit_brain.decoding.ctc import CTCDecoder, CTCDecodingOptions
from earlyexit_brain.decoding.ngram import (
    FALLBACK_DISCOUNTS,
    adjusted_counts,
    arpa_text,
    build_ngram_lm,
    count_ngrams,
    discounts,
    prepare_recipe_lm,
)
from tests.unit.tokenizer_helpers import char_tokenizer

kenlm = pytest.importorskip("kenlm")  # installed from requirements.txt (camel-kenlm)

TOY = ["A B", "A C", "B C"]


def model_of(tmp_path, sentences, order, name="lm.arpa"):
    path = tmp_path / name
    path.write_text(arpa_text(sentences, order))
    return kenlm.Model(str(path))


def prob(model, context, word):
    """p(word | <s> context) from KenLM."""
    state = kenlm.State()
    model.BeginSentenceWrite(state)
    for w in context:
        out = kenlm.State()
        model.BaseScore(state, w, out)
        state = out
    return 10 ** model.BaseScore(state, word, kenlm.State())


def test_adjusted_counts_are_left_continuations_except_at_the_top_and_after_bos():
    adjusted = adjusted_counts(count_ngrams(TOY, 2))
    # unigrams: the number of distinct words before each word
    assert adjusted[0] == {("A",): 1, ("B",): 2, ("C",): 2, ("</s>",): 2}
    # the highest order keeps raw counts
    assert adjusted[1][("<s>", "A")] == 2 and adjusted[1][("C", "</s>")] == 2
    assert adjusted[1][("A", "B")] == 1


def test_discounts_follow_the_counts_of_counts_or_fall_back():
    counts = {}
    for k, n in ((1, 10), (2, 5), (3, 3), (4, 2)):
        counts.update({(f"w{k}_{i}",): k for i in range(n)})
    y = 10 / (10 + 2 * 5)
    assert discounts(counts) == pytest.approx((1 - 2 * y * 5 / 10, 2 - 3 * y * 3 / 5, 3 - 4 * y * 2 / 3))
    assert discounts({("a",): 1, ("b",): 2}) == FALLBACK_DISCOUNTS  # no 3s or 4s


def test_probabilities_match_a_hand_computation(tmp_path):
    # fallback discounts D1 = 0.5, D2 = 1.0 at both orders (too few counts of counts)
    model = model_of(tmp_path, TOY, 2)
    # unigrams: adjusted counts A 1, B 2, C 2, </s> 2 (total 7); gamma = (0.5 + 3 x 1.0) / 7;
    # uniform over A, B, C, </s>, <unk>
    gamma0 = 3.5 / 7
    p_a, p_c = 0.5 / 7 + gamma0 / 5, 1.0 / 7 + gamma0 / 5
    assert prob(model, [], "A") == pytest.approx((2 - 1.0) / 3 + (1.0 + 0.5) / 3 * p_a, rel=1e-5)
    assert prob(model, ["B"], "C") == pytest.approx(0.5 / 2 + (0.5 + 0.5) / 2 * p_c, rel=1e-5)
    assert prob(model, ["C"], "A") == pytest.approx(1.0 / 2 * p_a, rel=1e-5)  # unseen: backoff
    assert prob(model, ["C"], "ZZZ") == pytest.approx(1.0 / 2 * gamma0 / 5, rel=1e-5)  # <unk>


@pytest.mark.parametrize("order", [2, 3, 4])
def test_every_context_is_a_distribution(tmp_path, order):
    sentences = [
        "THE CAT SAT ON THE MAT",
        "THE DOG SAT",
        "A CAT AND A DOG",
        "THE MAT",
        "ON THE MAT THE CAT SAT",
        "A DOG",
    ]
    model = model_of(tmp_path, sentences, order)
    vocab = sorted({w for s in sentences for w in s.split()}) + ["</s>", "<unk>"]
    for context in ([], ["THE"], ["THE", "CAT"], ["A", "DOG", "SAT"], ["MAT"], ["NEVER", "SEEN"]):
        total = sum(prob(model, context, w) for w in vocab)
        assert total == pytest.approx(1.0, abs=1e-4), context


def test_build_ngram_lm_reads_the_manifest_once_per_sentence(tmp_path):
    manifest = tmp_path / "train.csv"
    with open(manifest, "w", newline="") as fout:
        writer = csv.writer(fout)
        writer.writerow(["ID", "duration", "wav", "spk_id", "wrd"])
        for i, text in enumerate(["A B", "A B", "A C", "B C"]):  # "A B" spoken twice
            writer.writerow([f"u{i}", "1.0", f"u{i}.wav", "s", text])
    path = build_ngram_lm(str(manifest), 2, str(tmp_path / "lm" / "ngram_2.arpa"))
    assert open(path).read() == arpa_text(TOY, 2)
    doubled = build_ngram_lm(str(manifest), 2, str(tmp_path / "raw.arpa"), unique=False)
    assert open(doubled).read() != arpa_text(TOY, 2)


def test_bad_input_names_the_problem(tmp_path):
    for order in (0, 1):
        with pytest.raises(ValueError, match="ngram_order: must be an integer >= 2"):
            arpa_text(TOY, order)
    with pytest.raises(ValueError, match="no words"):
        arpa_text([], 2)
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,duration,wav\nu0,1.0,u0.wav\n")
    with pytest.raises(ValueError, match="bad.csv: no 'wrd' column"):
        build_ngram_lm(str(bad), 2, str(tmp_path / "lm.arpa"))


def test_prepare_recipe_lm(tmp_path):
    manifest = tmp_path / "train.csv"
    manifest.write_text("ID,duration,wav,spk_id,wrd\nu0,1.0,u0.wav,s,A B\nu1,1.0,u1.wav,s,B C\n")
    base = {"train_csv": str(manifest), "save_folder": str(tmp_path / "save")}
    assert prepare_recipe_lm({**base, "ngram_order": 0, "ctc_lm_path": None}) is None
    given = {**base, "ngram_order": 3, "ctc_lm_path": "my.arpa"}
    assert prepare_recipe_lm(given) == "my.arpa"  # a named LM wins
    hparams = {**base, "ngram_order": 2, "ctc_lm_path": None}
    path = prepare_recipe_lm(hparams)
    assert path == str(tmp_path / "save" / "ngram_2.arpa") and hparams["ctc_lm_path"] is None  # not written
    assert kenlm.Model(path).order == 2


def test_a_decoder_with_the_estimated_lm_prefers_known_words(tmp_path):
    """Greedy CTC reads THE CAP; an LM estimated from text with THE CAT, stored under a
    name KenLM cannot tell from its extension (as in an exported model), makes it THE CAT."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=char_tokenizer(tmp_path))
    lm = tmp_path / "ngram_lm.ckpt"
    lm.write_text(arpa_text(["THE CAT SAT", "THE CAT", "A CAT SAT ON THE MAT"], 3))
    vocab = sp.vocab_size() + 2
    frames = []
    for i in sp.encode_as_ids("THE CA"):
        frames += [i, 0]
    logits = torch.full((1, len(frames) + 2, vocab), -8.0)
    logits[0, torch.arange(len(frames)), torch.tensor(frames)] = 8.0
    logits[0, len(frames), sp.piece_to_id("P")], logits[0, len(frames), sp.piece_to_id("T")] = 1.2, 1.0
    logits[0, len(frames) + 1, 0] = 8.0
    log_probs = torch.log_softmax(logits, -1)
    lens = torch.ones(1)
    assert CTCDecoder("ctc_greedy", sp, vocab)(log_probs, lens) == ["THE CAP"]
    assert CTCDecoder("ctc_beam", sp, vocab, options=CTCDecodingOptions(beam_size=8))(log_probs, lens) == ["THE CAP"]
    with_lm = CTCDecoder(
        "ctc_beam", sp, vocab, options=CTCDecodingOptions(beam_size=8, lm_path=str(lm), alpha=1.0, beta=0.0)
    )
    assert with_lm.searcher.unigrams and "CAT" in with_lm.searcher.unigrams
    assert with_lm(log_probs, lens) == ["THE CAT"]
    with pytest.raises(ValueError, match="not a CTC decoder"):
        CTCDecoder("aed_beam", sp, vocab)
