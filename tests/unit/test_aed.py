"""Attention-decoder (AED) exits: decoders, the joint CTC/attention loss, beam
searches, dynamic inference that runs only the chosen exit's decoder, export
and loading, and the configuration errors."""

import functools
import types

import pytest
import sentencepiece as spm
import soundfile as sf
import speechbrain as sb
import torch
from signals import SR, tone  # tests/unit/signals.py
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.lobes.features import Fbank
from speechbrain.nnet.losses import ctc_loss, nll_loss
from speechbrain.processing.features import InputNormalization
from tokenizer_helpers import char_tokenizer  # tests/unit/tokenizer_helpers.py

from earlyexit_brain.brain import EarlyExitSeq2SeqBrain
from earlyexit_brain.config import ConfigError, check_hparams
from earlyexit_brain.decoding.attention import decode_exit, make_aed_searcher
from earlyexit_brain.decoding.ctc import make_ctc_beam_searcher
from earlyexit_brain.dynamic import decode_dynamic, run_model
from earlyexit_brain.export import export_inference_folder
from earlyexit_brain.inference import EarlyExitASR
from earlyexit_brain.models.conformer import EarlyExitConformerEncoder
from earlyexit_brain.models.decoders import ExitDecoders, add_bos_eos
from earlyexit_brain.models.exits import CTCExitHeads
from earlyexit_brain.models.pipeline import EarlyExitAEDModel
from earlyexit_brain.policies import FixedExit
from earlyexit_brain.utils import tokens_to_text
from tests.factories import make_brain

BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    return char_tokenizer(tmp_path_factory.mktemp("spm_aed"), vocab_size=30, bos_id=BOS, eos_id=EOS)


@pytest.fixture(scope="module")
def sp(sp_path):
    return spm.SentencePieceProcessor(model_file=sp_path)


def parts(vocab=32, share=True, seed=0):
    torch.manual_seed(seed)
    enc = EarlyExitConformerEncoder(
        20, num_layers=4, d_model=16, nhead=2, d_ffn=32, exit_layers=[2, 4], kernel_size=3, dropout=0.0
    )
    heads = CTCExitHeads(16, vocab, 2)
    decoders = ExitDecoders(16, vocab, 2, num_layers=1, nhead=2, d_ffn=32, dropout=0.0, share_embedding=share)
    return enc, heads, decoders


@pytest.fixture(scope="module")
def aed_model():
    enc, heads, decoders = parts()
    normalize = InputNormalization(norm_type="global")
    fbank = Fbank(n_mels=20)
    normalize(fbank(torch.randn(2, SR)), torch.ones(2))
    return EarlyExitAEDModel(
        fbank,
        normalize,
        enc,
        heads,
        decoders,
        bos_index=BOS,
        eos_index=EOS,
        beam_size=3,
        ctc_weight=0.4,
        max_decode_ratio=0.5,
    ).eval()


# ------------------------------------------------------------------ decoders
def test_bos_eos_targets_ignore_padding():
    tokens = torch.tensor([[5, 6, 7], [8, 9, 0]])
    bos, eos, lens = add_bos_eos(tokens, torch.tensor([1.0, 2 / 3]), BOS, EOS)
    assert bos.tolist() == [[BOS, 5, 6, 7], [BOS, 8, 9, 0]]
    assert eos.tolist() == [[5, 6, 7, EOS], [8, 9, EOS, 0]]
    assert torch.allclose(lens, torch.tensor([1.0, 0.75]))


def test_decoder_shapes_shared_embedding_and_parameter_counts():
    _, _, shared = parts(share=True)
    _, _, own = parts(share=False)
    mem = [torch.randn(2, 9, 16), torch.randn(2, 9, 16)]
    out = shared(mem, torch.tensor([1.0, 0.5]), torch.randint(3, 32, (2, 5)))
    assert [o.shape for o in out] == [torch.Size([2, 5, 32])] * 2
    assert torch.allclose(out[0].exp().sum(-1), torch.ones(2, 5), atol=1e-5)
    assert shared.decoders[0].embedding is shared.decoders[1].embedding
    assert own.decoders[0].embedding is not own.decoders[1].embedding
    emb = 32 * 16
    total_shared = sum(p.numel() for p in shared.parameters())  # a shared tensor counted once
    assert total_shared == sum(p.numel() for p in own.parameters()) - emb
    assert shared.params_of_exit(0) == own.params_of_exit(0)


def test_decoder_is_causal_and_ignores_padded_memory():
    _, _, dec = parts()
    dec.eval()
    mem = torch.randn(1, 9, 16)
    tokens = torch.randint(3, 32, (1, 6))
    full = dec.forward_exit(0, mem, torch.ones(1), tokens)
    changed = tokens.clone()
    changed[0, 4:] = 7  # later tokens cannot change earlier outputs
    assert torch.allclose(full[0, :4], dec.forward_exit(0, mem, torch.ones(1), changed)[0, :4], atol=1e-6)
    padded = torch.cat([mem, torch.randn(1, 5, 16)], dim=1)  # frames beyond the length are ignored
    assert torch.allclose(full, dec.forward_exit(0, padded, torch.tensor([9 / 14]), tokens), atol=1e-5)


def test_decoder_width_and_heads_errors_name_the_key():
    _, _, dec = parts()
    with pytest.raises(ValueError, match="decoder_d_model"):
        dec.forward_exit(0, torch.randn(1, 5, 24), torch.ones(1), torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="decoder_nhead"):
        ExitDecoders(16, 8, 1, nhead=3)


# ---------------------------------------------------------------------- loss
def seq2seq_brain(folder, ctc_weight=0.3, smoothing=0.1, weights=None, **keys):
    """The attention-decoder recipe's Brain (tests/factories.py: conformer_aed_ee.yaml) with 2 exits
    after layers 2 and 4 and 32 outputs (bos 1, eos 2); no n-gram fused unless ``keys`` say so."""
    keys = {"aed_lm_weight": 0.0, **keys}
    brain = make_brain(
        folder,
        aed=True,
        num_layers=4,
        exit_layers=[2, 4],
        output_neurons=32,
        ctc_weight=ctc_weight,
        label_smoothing=smoothing,
        exit_loss_weights=weights,
        **keys,
    )
    assert isinstance(brain, EarlyExitSeq2SeqBrain)
    assert (brain.hparams.bos_index, brain.hparams.eos_index) == (BOS, EOS)
    brain.modules.normalize(torch.randn(2, 50, 20), torch.ones(2))  # statistics, so eval mode works
    return brain


def batch(second_tokens=(4, 5)):
    torch.manual_seed(0)
    return PaddedBatch(
        [
            {"id": "a", "sig": torch.randn(8000), "tokens": torch.tensor([3, 4, 5, 6]), "wrd": "A"},
            {"id": "b", "sig": torch.randn(6000), "tokens": torch.tensor(list(second_tokens)), "wrd": "B"},
        ]
    )


@pytest.mark.parametrize("weights", [None, [0.5, 2.0]])
def test_joint_loss_is_the_weighted_sum_of_ctc_and_label_smoothed_ce(weights, tmp_path):
    brain = seq2seq_brain(tmp_path, ctc_weight=0.3, smoothing=0.1, weights=weights)
    brain.modules.eval()
    brain.on_stage_start(sb.Stage.TRAIN)
    b = batch()
    pred = brain.compute_forward(b, sb.Stage.TRAIN)
    loss = brain.compute_objectives(pred, b, sb.Stage.TRAIN)
    log_probs, lens, _, dec_lp, _ = pred
    tokens, token_lens = b.tokens
    _, eos, eos_lens = add_bos_eos(tokens, token_lens, BOS, EOS)
    expected = 0
    for k, w in enumerate(weights or [1.0, 1.0]):
        ctc = ctc_loss(log_probs[k], tokens, lens, token_lens, blank_index=0)
        ce = nll_loss(dec_lp[k], eos, length=eos_lens, label_smoothing=0.1)
        expected = expected + w * (0.3 * ctc + 0.7 * ce)
    assert torch.allclose(loss, expected)
    # teacher forcing starts from bos and targets end with eos
    assert dec_lp[0].shape[1] == tokens.shape[1] + 1


def test_padding_does_not_change_the_decoder_loss(tmp_path):
    brain = seq2seq_brain(tmp_path, ctc_weight=0.0, smoothing=0.0)
    brain.modules.eval()
    brain.on_stage_start(sb.Stage.TRAIN)
    b1 = batch()
    b2 = batch()
    b2.tokens.data[1, 2:] = 9  # padding positions of the shorter target
    l1 = brain.compute_objectives(brain.compute_forward(b1, sb.Stage.TRAIN), b1, sb.Stage.TRAIN)
    l2 = brain.compute_objectives(brain.compute_forward(b2, sb.Stage.TRAIN), b2, sb.Stage.TRAIN)
    assert torch.allclose(l1, l2)


def test_training_lowers_the_joint_loss(tmp_path):
    brain = seq2seq_brain(tmp_path)
    opt = torch.optim.Adam(brain.modules.parameters(), lr=3e-3)
    b = batch()
    losses = []
    brain.modules.train()
    for _ in range(30):
        brain.on_stage_start(sb.Stage.TRAIN)
        loss = brain.compute_objectives(brain.compute_forward(b, sb.Stage.TRAIN), b, sb.Stage.TRAIN)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


# ------------------------------------------------------------------- search
def test_search_option_errors_name_the_key():
    enc, heads, decoders = parts()
    with pytest.raises(ValueError, match="beam_size"):
        make_aed_searcher(decoders, heads, 0, BOS, EOS, beam_size=0)
    with pytest.raises(ValueError, match="ctc_weight"):
        make_aed_searcher(decoders, heads, 0, BOS, EOS, ctc_weight=1.5)
    with pytest.raises(ValueError, match="aed_length_reward"):
        make_aed_searcher(decoders, heads, 0, BOS, EOS, length_reward=1.0, length_normalization=True)
    with pytest.raises(ValueError, match="beam_size"):
        make_ctc_beam_searcher(None, 8, 0, beam_size=0)
    with pytest.raises(ValueError, match="ctc_lm_path"):
        make_ctc_beam_searcher(None, 8, 0, kenlm_model_path="/no/such/lm.arpa")


def test_the_cached_search_steps_like_the_stock_searcher():
    """The incremental decoder step gives the stock searcher's log-probabilities at every
    step (2 decoder layers, padded encoder states, beams reordered between steps), and
    the same hypotheses and scores."""
    from speechbrain.decoders import S2STransformerBeamSearcher

    from earlyexit_brain.decoding.attention import CachedTransformerBeamSearcher

    torch.manual_seed(5)
    decoders = ExitDecoders(16, 32, 2, num_layers=2, nhead=2, d_ffn=32, dropout=0.0).eval()
    heads = CTCExitHeads(16, 32, 2)
    hidden, lens = torch.randn(3, 30, 16), torch.tensor([1.0, 0.7, 0.4])
    searchers = {
        cached: make_aed_searcher(
            decoders, heads, 1, BOS, EOS, beam_size=4, ctc_weight=0.4, max_decode_ratio=0.5, topk=4, cached=cached
        )
        for cached in (False, True)
    }
    assert type(searchers[False]) is S2STransformerBeamSearcher
    assert isinstance(searchers[True], CachedTransformerBeamSearcher)

    # step by step, with the beams permuted between steps as the search does
    abs_lens = torch.round(lens * 30).int().repeat_interleave(4)
    states, tokens = hidden.repeat_interleave(4, dim=0), torch.full((12,), BOS)
    memories = {False: searchers[False].reset_mem(12, "cpu"), True: searchers[True].reset_mem(12, "cpu")}
    for step in range(6):
        out = {}
        with torch.no_grad():
            for cached, searcher in searchers.items():
                out[cached], memories[cached], attn = searcher.forward_step(tokens, memories[cached], states, abs_lens)
        assert torch.allclose(out[True], out[False], atol=1e-5), step
        assert attn.shape == (12, 1, 30) and torch.allclose(attn.sum(-1), torch.ones(12, 1))
        assert attn[8:, 0, 12:].abs().max() == 0  # the third utterance's 12 frames only
        order = torch.randperm(4).repeat(3) + torch.arange(3).repeat_interleave(4) * 4
        tokens = torch.randint(3, 32, (12,))
        memories = {c: searchers[c].permute_mem(m, order) for c, m in memories.items()}

    with torch.no_grad():
        results = {c: searcher(hidden, lens) for c, searcher in searchers.items()}
    hyps, lengths, scores = (results[True][i] for i in range(3))
    assert torch.equal(hyps, results[False][0]) and torch.equal(lengths, results[False][1])
    assert torch.allclose(scores, results[False][2], atol=1e-4)
    assert hyps.shape[:2] == (3, 4) and float(lengths.min()) > 0  # 4 hypotheses each


def test_joint_beam_search_returns_one_hypothesis_per_utterance(aed_model):
    hidden = torch.randn(3, 12, 16)
    ids = decode_exit(aed_model, 1, hidden, torch.tensor([1.0, 0.75, 0.5]))
    assert len(ids) == 3
    assert all(len(h) <= 6 for h in ids)  # max_decode_ratio 0.5 of 12 frames
    assert all(EOS not in h for h in ids)


def test_ctc_prefix_beam_search_agrees_with_greedy_on_a_peaked_posterior(sp):
    vocab = sp.vocab_size() + 2
    words = "THE CAT"
    ids = sp.encode_as_ids(words)
    frames = []
    for i in ids:  # each token for two frames, separated by blanks
        frames += [i, i, 0]
    logits = torch.full((1, len(frames), vocab), -8.0)
    logits[0, torch.arange(len(frames)), torch.tensor(frames)] = 8.0
    log_probs = torch.log_softmax(logits, -1)
    searcher = make_ctc_beam_searcher(sp, vocab, 0, beam_size=4, prefix=True, topk=1)
    text = searcher(log_probs, torch.ones(1))[0][0].text
    assert " ".join(text.split()) == words == tokens_to_text(sp, ids)


# --------------------------------------------------------- dynamic inference
class CallCounter:
    def __init__(self, modules):
        self.counts = [0] * len(modules)
        for k, m in enumerate(modules):
            m.register_forward_hook(functools.partial(self.hit, k))

    def hit(self, k, *args):
        self.counts[k] += 1


def test_only_the_chosen_exits_decoder_and_layers_run(aed_model):
    wavs = torch.stack([torch.from_numpy(tone(1.0, seed=s)).float() for s in (1, 2)])
    layer_calls = CallCounter(aed_model.encoder.layers)
    # every decoder step ends with the decoder's final norm (stepped or run whole)
    decoder_calls = CallCounter([d.decoder.norm for d in aed_model.decoders.decoders])
    with torch.no_grad():
        out = run_model(aed_model, wavs, torch.ones(2), FixedExit(0), keep_hidden=True)
        dynamic = decode_dynamic(aed_model, out)
    assert layer_calls.counts == [1, 1, 0, 0]  # layers 3-4 never computed
    assert decoder_calls.counts[1] == 0 and decoder_calls.counts[0] > 0
    # the same hypotheses as decoding exit 1 of a full pass
    with torch.no_grad():
        feats = aed_model.features(wavs, torch.ones(2))
        hidden = aed_model.encoder(feats, torch.ones(2))[0]
        assert dynamic == decode_exit(aed_model, 0, hidden, torch.ones(2))


def test_exported_aed_model_loads_and_transcribes(aed_model, sp_path, tmp_path):
    features = {"sample_rate": SR, "n_fft": 400, "n_mels": 20, "hop_length": 10, "win_length": 25}
    folder = export_inference_folder(
        str(tmp_path / "inference"), aed_model, features, sp_path, 0, {"default": {"policy": "fixed", "exit": 2}}
    )
    text = open(f"{folder}/hyperparams.yaml").read()
    assert "EarlyExitAEDModel" in text and "ExitDecoders" in text
    asr = EarlyExitASR.from_hparams(source=folder, savedir=str(tmp_path / "saved"))
    assert isinstance(asr.model, EarlyExitAEDModel)
    for name, p in aed_model.state_dict().items():
        assert torch.equal(p, asr.model.state_dict()[name]), name
    path = str(tmp_path / "a.wav")
    sf.write(path, tone(1.0, seed=3), SR)
    wav = torch.from_numpy(tone(1.0, seed=3)).float()[None]
    for exit_ in (1, 2):
        res = asr.transcribe_file(path, exit=exit_)
        assert res.exit == exit_ and res.layers == [2, 4][exit_ - 1]
        with torch.no_grad():
            feats = aed_model.features(wav, torch.ones(1))
            hidden = aed_model.encoder(feats, torch.ones(1))[exit_ - 1]
            expected = tokens_to_text(asr.tokenizer, decode_exit(aed_model, exit_ - 1, hidden)[0])
        assert res.text == expected
    # stock SpeechBrain EncoderASR still loads it (CTC, default exit)
    from speechbrain.inference.ASR import EncoderASR

    stock = EncoderASR.from_hparams(source=folder, savedir=str(tmp_path / "stock"))
    assert isinstance(stock.transcribe_file(path), str)


# ------------------------------------------------------- evaluation decoders
def test_test_stage_reports_every_decoder_per_exit(sp, tmp_path):
    brain = seq2seq_brain(tmp_path, ctc_beam_size=2)  # the recipe's test decoders: aed_beam, ctc_greedy, ctc_beam
    brain.tokenizer = types.SimpleNamespace(sp=sp)
    brain.modules.eval()
    brain.on_stage_start(sb.Stage.TEST)
    b = batch()
    with torch.no_grad():
        brain.compute_objectives(brain.compute_forward(b, sb.Stage.TEST), b, sb.Stage.TEST)
    brain.test_set_name = "t"
    brain.on_stage_end(sb.Stage.TEST, 1.0)
    rows = brain.test_results["t"]
    assert len(rows) == 2
    for row in rows:
        assert set(row["decoders"]) == {"aed_beam", "ctc_greedy", "ctc_beam"}
        assert row["wer"] == row["decoders"]["aed_beam"]["wer"]
        assert row["n"] == 2 and all(v["ms_per_utterance"] > 0 for v in row["decoders"].values())  # each timed
    assert "test WER_ctc_beam_exit1" in (tmp_path / "out" / "train_log.txt").read_text()


def test_a_ctc_model_refuses_the_attention_decoder(tmp_path):
    brain = make_brain(tmp_path)  # the CTC recipe
    with pytest.raises(ValueError, match="aed_beam"):
        brain.decode_exit("aed_beam", 0, torch.zeros(1, 3, 8), torch.ones(1), None, sb.Stage.TEST)


# -------------------------------------------------------------------- config
BASE = {
    "num_layers": 6,
    "d_model": 144,
    "nhead": 4,
    "exit_layers": [2, 4, 6],
    "output_neurons": 40,
    "blank_index": 0,
    "bos_index": 1,
    "eos_index": 2,
    "decoders": "x",
    "decoder_d_model": 144,
    "decoder_nhead": 4,
    "beam_size": 10,
    "ctc_weight": 0.3,
    "decode_ctc_weight": 0.4,
    "test_decoders": ["aed_beam", "ctc_greedy"],
    "valid_decoder": "aed_beam",
}


@pytest.mark.parametrize(
    "key, value",
    [
        ("beam_size", 0),
        ("valid_beam_size", 0),
        ("ctc_weight", 1.5),
        ("ctc_weight", -0.1),
        ("decode_ctc_weight", 2.0),
        ("decoder_d_model", 256),
        ("decoder_nhead", 5),
        ("eos_index", 0),
        ("bos_index", 40),
        ("test_decoders", ["beam"]),
        ("valid_decoder", "nope"),
        ("ctc_beam_size", 0),
        ("label_smoothing", 1.0),
        ("ctc_lm_path", "/no/such.arpa"),
        ("ngram_order", 1),
        ("ngram_order", -1),
    ],
)
def test_bad_decoding_keys_are_named(key, value):
    raw = dict(BASE, **{key: value})
    with pytest.raises(ConfigError, match=key):
        check_hparams(raw)


def test_aed_decoding_needs_decoders():
    raw = dict(BASE)
    del raw["decoders"]
    with pytest.raises(ConfigError, match="aed_beam"):
        check_hparams(raw)
    check_hparams(BASE)  # the good configuration passes


def test_policy_evaluation_records_each_exits_beam_search_hypothesis(aed_model, sp):
    from earlyexit_brain.evaluation import collect_exit_outputs

    # equal lengths: SpeechBrain caps a batch's hypotheses at max_decode_ratio x its longest
    # utterance, which an untrained decoder reaches
    items = [{"id": f"u{i}", "sig": torch.from_numpy(tone(0.8, seed=i)).float(), "wrd": "THE CAT"} for i in range(3)]
    out = collect_exit_outputs(aed_model, items, sp, {}, decode_batch=2)  # batches of 2, then 1
    for item, hyps in zip(items, out.hyps):
        with torch.no_grad():
            wav = item["sig"][None]
            hiddens = aed_model.encoder(aed_model.features(wav, torch.ones(1)), torch.ones(1))
        for k in range(2):
            assert hyps[k] == tokens_to_text(sp, decode_exit(aed_model, k, hiddens[k])[0])


ARPA = """\\data\\
ngram 1=5
ngram 2=3

\\1-grams:
-3.0\t<unk>\t0
-1.0\t<s>\t-0.3
-1.0\t</s>\t0
-0.5\tTHE\t-0.3
-0.5\tCAT\t-0.3

\\2-grams:
-0.1\t<s> THE
-0.1\tTHE CAT
-0.1\tCAT </s>

\\end\\
"""


def test_ctc_beam_search_with_an_ngram_lm_prefers_the_lm_word(sp, tmp_path):
    pytest.importorskip("kenlm")  # installed from requirements.txt (camel-kenlm)
    lm = tmp_path / "words.arpa"
    lm.write_text(ARPA)
    vocab = sp.vocab_size() + 2
    ids = sp.encode_as_ids("THE CA")
    frames = []
    for i in ids:
        frames += [i, 0]
    logits = torch.full((1, len(frames) + 2, vocab), -8.0)
    logits[0, torch.arange(len(frames)), torch.tensor(frames)] = 8.0
    # the last letter: P slightly more likely than T
    p, t = sp.piece_to_id("P"), sp.piece_to_id("T")
    logits[0, len(frames), p], logits[0, len(frames), t] = 1.2, 1.0
    logits[0, len(frames) + 1, 0] = 8.0
    log_probs = torch.log_softmax(logits, -1)
    greedy = tokens_to_text(sp, [i for i in log_probs[0].argmax(-1).tolist() if i != 0])
    plain = make_ctc_beam_searcher(sp, vocab, 0, beam_size=8, prefix=True, topk=1)
    with_lm = make_ctc_beam_searcher(
        sp, vocab, 0, beam_size=8, prefix=True, topk=1, kenlm_model_path=str(lm), alpha=1.0, beta=0.0
    )
    text = lambda s: " ".join(s(log_probs, torch.ones(1))[0][0].text.split())  # noqa: E731
    assert greedy.startswith("THE CAP") and text(plain) == "THE CAP"
    assert text(with_lm) == "THE CAT"


# ------------------------------------------------- word n-gram in the search
LM_TEXT = ["THE CAT SAT ON THE MAT", "THE DOG SAT", "A CAT SAT ON A MAT", "THE FOX SAT ON THE DOG"]


@pytest.fixture(scope="module")
def arpa(tmp_path_factory):
    from earlyexit_brain.decoding.ngram import arpa_text

    path = tmp_path_factory.mktemp("lm") / "lm3.arpa"
    path.write_text(arpa_text(LM_TEXT, 3))
    return str(path)


def scored_sentence(scorer, ids):
    """Feed ``ids`` then </s> through the scorer one step at a time (two copies of the
    hypothesis, the beam's rows swapped after each step); each step's scores of the next token."""
    memory, inp, steps = None, torch.tensor([BOS, BOS]), []
    for token in list(ids) + [EOS]:
        scores, memory = scorer.score(inp, memory, None, None)
        assert torch.equal(scores[0], scores[1])
        steps.append(float(scores[0, token]))
        memory = scorer.permute_mem(memory, torch.tensor([1, 0]))
        inp = torch.tensor([token, token])
    return steps


def test_a_missing_ngram_file_is_named_by_both_searches(sp, tmp_path):
    """The CTC beam search and the fused attention search refuse a missing n-gram file
    with the same error, naming the key."""
    from earlyexit_brain.decoding.ngram import WordNgramScorer
    from earlyexit_brain.utils import tokenizer_pieces

    missing = str(tmp_path / "no.arpa")
    with pytest.raises(ValueError, match=r"ctc_lm_path: no such n-gram file: .*no\.arpa"):
        make_ctc_beam_searcher(sp, 32, kenlm_model_path=missing)
    with pytest.raises(ValueError, match=r"ctc_lm_path: no such n-gram file: .*no\.arpa"):
        WordNgramScorer(missing, tokenizer_pieces(sp), 32, EOS)


def test_word_ngram_scores_add_up_to_the_weighted_sentence_log_probability(sp, arpa, tmp_path):
    import kenlm

    from earlyexit_brain.decoding.ngram import WordNgramScorer, arpa_vocabulary
    from earlyexit_brain.utils import tokenizer_pieces

    assert sorted(arpa_vocabulary(arpa)) == sorted({w for s in LM_TEXT for w in s.split()})
    binary = tmp_path / "lm.bin"  # KenLM's binary header: the bindings list no vocabulary
    binary.write_bytes(b"mmap lm http://kheafield.com" + bytes(64))
    assert arpa_vocabulary(str(binary)) is None
    lm = kenlm.Model(arpa)
    scorer = WordNgramScorer(arpa, tokenizer_pieces(sp), 32, EOS, weight=0.7, word_bonus=0.5, oov_penalty=10.0)
    scorer.reset_mem(torch.zeros(2, 3, 16), torch.ones(2))
    ln10 = 2.302585092994046
    steps = scored_sentence(scorer, sp.encode_as_ids("THE CAT SAT"))
    expected = 0.7 * ln10 * lm.score("THE CAT SAT") + 0.5 * 3
    assert sum(steps) == pytest.approx(expected, abs=1e-4)
    # a piece inside a word costs nothing while the word can still become one of the LM's ...
    ids = sp.encode_as_ids("THE CQT")
    steps = scored_sentence(scorer, ids)
    assert steps[5] == 0.0  # "C": CAT still possible
    # ... and the penalty as soon as it cannot, taken back when the word ends as <unk>
    assert steps[6] == pytest.approx(-0.7 * 10.0)
    unk = lm.score("THE CQT")  # KenLM scores the unknown word as <unk>
    assert sum(steps) == pytest.approx(0.7 * ln10 * unk + 0.5 * 2, abs=1e-4)


def test_fused_search_hypotheses_are_words_of_the_ngram(sp, arpa):
    from earlyexit_brain.utils import tokenizer_pieces

    enc, heads, decoders = parts(seed=3)
    torch.manual_seed(3)
    hidden = torch.randn(2, 40, 16)
    words = {w for s in LM_TEXT for w in s.split()}

    def decode(**lm):
        searcher = make_aed_searcher(
            decoders, heads, 1, BOS, EOS, beam_size=4, ctc_weight=0.4, max_decode_ratio=0.5, **lm
        )
        with torch.no_grad():
            hyps = searcher(hidden, torch.ones(2))[0]
        return [tokens_to_text(sp, h).split() for h in hyps]

    def starts_a_word(w):  # the search may stop at its length limit inside a word
        return any(v.startswith(w) for v in words)

    plain = decode()
    assert not all(starts_a_word(w) for h in plain for w in h)  # the untrained decoder's text
    fused = decode(lm_path=arpa, lm_weight=5.0, pieces=tokenizer_pieces(sp))
    assert all(len(h) > 1 and all(w in words for w in h[:-1]) and starts_a_word(h[-1]) for h in fused), fused
    with pytest.raises(ValueError, match="aed_lm_weight"):
        make_aed_searcher(decoders, heads, 1, BOS, EOS, lm_weight=0.5)  # no n-gram given


def test_exported_model_with_a_fused_ngram_loads_and_uses_it(sp, sp_path, arpa, tmp_path):
    from earlyexit_brain.utils import tokenizer_pieces

    enc, heads, decoders = parts()
    normalize = InputNormalization(norm_type="global")
    fbank = Fbank(n_mels=20)
    normalize(fbank(torch.randn(2, SR)), torch.ones(2))
    model = EarlyExitAEDModel(
        fbank,
        normalize,
        enc,
        heads,
        decoders,
        bos_index=BOS,
        eos_index=EOS,
        beam_size=3,
        max_decode_ratio=0.5,
        lm_weight=2.0,
        lm_word_bonus=0.5,
    ).eval()
    model.use_lm(arpa, tokenizer_pieces(sp))
    features = {"sample_rate": SR, "n_fft": 400, "n_mels": 20, "hop_length": 10, "win_length": 25}
    policies = {"default": {"policy": "fixed", "exit": 2}}
    folder = export_inference_folder(str(tmp_path / "inference"), model, features, sp_path, 0, policies, lm_path=arpa)
    asr = EarlyExitASR.from_hparams(source=folder, savedir=str(tmp_path / "saved"))
    assert asr.model.search_options["lm_weight"] == 2.0 and asr.model.lm["lm_path"]
    wav = torch.from_numpy(tone(1.0, seed=3)).float()[None]
    res = asr.transcribe_batch(wav, exit=2)[0]
    with torch.no_grad():
        hidden = model.encoder(model.features(wav, torch.ones(1)), torch.ones(1))[1]
    assert res.text == tokens_to_text(sp, decode_exit(model, 1, hidden)[0])
    # a folder whose model fuses an n-gram it does not ship cannot load
    bare = export_inference_folder(str(tmp_path / "bare"), model, features, sp_path, 0, policies)
    with pytest.raises(ValueError, match="ngram_lm"):
        EarlyExitASR.from_hparams(source=bare, savedir=str(tmp_path / "saved_bare"))


def test_the_brain_fuses_the_recipe_ngram_into_its_test_search(sp, arpa, tmp_path):
    brain = seq2seq_brain(tmp_path)
    brain.tokenizer = types.SimpleNamespace(sp=sp)
    brain.hparams.beam_size = 2
    brain.hparams.ctc_lm_path = arpa
    assert "wordngram" not in brain.aed_searcher(0, sb.Stage.TEST).scorer.full_scorers
    brain.hparams.aed_lm_weight = 0.5
    del brain._aed_searchers
    scorer = brain.aed_searcher(0, sb.Stage.TEST).scorer.full_scorers["wordngram"]
    assert scorer.weight == 0.5


@pytest.mark.parametrize(
    "key, value", [("aed_lm_weight", -0.5), ("aed_lm_oov_penalty", -1.0), ("aed_lm_word_bonus", "x")]
)
def test_bad_fusion_keys_are_named(key, value):
    with pytest.raises(ConfigError, match=key):
        check_hparams(dict(BASE, **{key: value}))


def test_fusion_needs_an_ngram_and_decoders():
    with pytest.raises(ConfigError, match="aed_lm_weight.*ngram_order"):
        check_hparams(dict(BASE, aed_lm_weight=0.5, ngram_order=0))
    raw = dict(BASE, aed_lm_weight=0.5, ngram_order=3, test_decoders=["ctc_greedy"], valid_decoder="ctc_greedy")
    check_hparams(raw)
    del raw["decoders"]
    with pytest.raises(ConfigError, match="aed_lm_weight.*decoders"):
        check_hparams(raw)
