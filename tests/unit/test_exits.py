"""Exit policies, dynamic inference and the policy sweep/calibration."""

import math

import pytest
import torch

from earlyexit_brain.dynamic import run_dynamic
from earlyexit_brain.evaluation import (
    ExitOutputs,
    WerIncreaseBootstrap,
    calibrate,
    confidence_exits,
    evaluate_policies,
    summarize,
)
from earlyexit_brain.latency import fit_latency_table
from earlyexit_brain.models.conformer import EarlyExitConformerEncoder
from earlyexit_brain.models.exits import CTCExitHeads
from earlyexit_brain.policies import (
    BudgetPolicy,
    EntropyPolicy,
    ExitPolicy,
    FixedExit,
    GreedyPosteriorPolicy,
    NBestPosteriorPolicy,
    make_policy,
    oracle_exits,
)


def log_probs_of(probs):
    return torch.log(torch.tensor(probs, dtype=torch.float32))


# ------------------------------------------------------------------ scores
def test_entropy_score_matches_formula_and_ignores_padding():
    # utterance 0: frame 1 uniform over 4, frame 2 certain; utterance 1: one certain frame + padding
    lp = log_probs_of([[[0.25] * 4, [0.997, 0.001, 0.001, 0.001]], [[0.997, 0.001, 0.001, 0.001], [0.25] * 4]])
    lengths = torch.tensor([1.0, 0.5])
    h_certain = -(0.997 * math.log(0.997) + 3 * 0.001 * math.log(0.001))
    raw = EntropyPolicy(1.0, normalize=False, vocab_size=4).score(lp, lengths)
    assert raw[0].item() == pytest.approx((math.log(4) + h_certain) / 2, rel=1e-5)
    assert raw[1].item() == pytest.approx(h_certain, rel=1e-5)  # the uniform padded frame is ignored
    norm = EntropyPolicy(0.5).score(lp, lengths)
    assert torch.allclose(norm, raw / math.log(4))
    assert EntropyPolicy(0.6)(0, lp, lengths).tolist() == [True, True]
    assert EntropyPolicy(0.1)(0, lp, lengths).tolist() == [False, True]


def test_greedy_posterior_mean_and_geometric():
    lp = log_probs_of([[[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]]])
    mean = GreedyPosteriorPolicy(0.5, form="mean").score(lp, None)
    geo = GreedyPosteriorPolicy(0.5, form="geometric").score(lp, None)
    assert mean.item() == pytest.approx(0.7, rel=1e-5)
    assert geo.item() == pytest.approx(math.sqrt(0.5 * 0.9), rel=1e-5)
    assert GreedyPosteriorPolicy(0.69)(0, lp, None).tolist() == [True]
    assert GreedyPosteriorPolicy(0.71)(0, lp, None).tolist() == [False]


class FakeSearcher:
    """Stands in for a CTC beam searcher: fixed N-best scores per utterance."""

    def __init__(self, scores):
        self.scores = scores

    def __call__(self, log_probs, lengths):
        class Hyp:
            def __init__(self, score):
                self.score = score

        return [[Hyp(s) for s in row] for row in self.scores[: log_probs.shape[0]]]


def test_nbest_posterior_is_softmax_of_nbest_scores():
    searcher = FakeSearcher([[-1.0, -2.0, -3.0], [-5.0]])
    policy = NBestPosteriorPolicy(0.7, searcher)
    lp = torch.zeros(2, 3, 4)
    conf = policy.score(lp, torch.ones(2))
    expected = math.exp(-1) / (math.exp(-1) + math.exp(-2) + math.exp(-3))
    assert conf[0].item() == pytest.approx(expected, rel=1e-5)
    assert conf[1].item() == pytest.approx(1.0)
    assert policy(0, lp, torch.ones(2)).tolist() == [False, True]


def test_nbest_posterior_with_speechbrain_beam_search():
    from earlyexit_brain.decoding.ctc import make_ctc_beam_searcher

    class Pieces:  # the two methods of a SentencePieceProcessor the searcher needs
        pieces = ["<unk>", "▁", "A", "B"]

        def vocab_size(self):
            return len(self.pieces)

        def id_to_piece(self, i):
            return self.pieces[i]

    searcher = make_ctc_beam_searcher(Pieces(), vocab_size=4, beam_size=4)
    sharp = log_probs_of([[[0.01, 0.01, 0.97, 0.01], [0.97, 0.01, 0.01, 0.01], [0.01, 0.01, 0.01, 0.97]]])
    flat = log_probs_of([[[0.25] * 4] * 3])
    policy = NBestPosteriorPolicy(0.5, searcher)
    assert policy.score(sharp, None).item() > 0.9
    assert policy.score(flat, None).item() < policy.score(sharp, None).item()

    # token pruning: in the middle frame SpeechBrain's -5 searches every token ("A" at
    # log 0.1 = -2.3, "▁" and "B" at -3.0 besides the blank), -2 only the best (the blank)
    lp = log_probs_of([[[0.01, 0.01, 0.97, 0.01], [0.8, 0.05, 0.1, 0.05], [0.01, 0.01, 0.01, 0.97]]])
    full = NBestPosteriorPolicy(0.5, make_ctc_beam_searcher(Pieces(), vocab_size=4, beam_size=4))
    pruned = NBestPosteriorPolicy(
        0.5, make_ctc_beam_searcher(Pieces(), vocab_size=4, beam_size=4, token_prune_min_logp=-2.0)
    )
    assert full.searcher.token_prune_min_logp == -5.0  # SpeechBrain's default
    assert pruned.searcher.token_prune_min_logp == -2.0
    assert len(pruned.searcher(lp, torch.ones(1))[0]) < len(full.searcher(lp, torch.ones(1))[0])
    assert pruned.score(lp, None).item() > full.score(lp, None).item()
    for bad in (0, 1.5, float("nan"), "low", True):
        with pytest.raises(ValueError, match="token_prune_min_logp"):
            make_ctc_beam_searcher(Pieces(), vocab_size=4, token_prune_min_logp=bad)


# --------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: make_policy("nope", 0.5), "policy: unknown policy 'nope'"),
        (lambda: make_policy("entropy", 1.5), "threshold: 1.5 is outside"),
        (lambda: make_policy("entropy", float("nan")), "threshold"),
        (lambda: make_policy("posterior_greedy", -0.1), "threshold: -0.1 is outside"),
        (lambda: make_policy("posterior_greedy", "high"), "threshold"),
        (lambda: make_policy("posterior_greedy"), "threshold: the posterior_greedy policy needs"),
        (lambda: make_policy("fixed", exit=4, num_exits=3), "exit: the model has exits 1..3, got 4"),
        (lambda: make_policy("fixed", exit=0, num_exits=3), "exit: the model has exits 1..3, got 0"),
        (lambda: make_policy("fixed"), "exit"),
        (lambda: make_policy("oracle"), "analysis"),
        (lambda: make_policy("budget", 10.0), "latency table"),
        (lambda: make_policy("posterior", 0.5), "beam searcher"),
        (lambda: GreedyPosteriorPolicy(0.5, form="median"), "form"),
    ],
)
def test_bad_arguments_name_the_argument(make, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(".", r"\.")):
        make()


# ------------------------------------------------------------------ budget
def test_latency_table_fit_and_budget_choice():
    points = [{"seconds": s, "ms": [1 + 2 * s, 2 + 4 * s, 3 + 6 * s]} for s in (1.0, 2.0, 4.0)]
    table = fit_latency_table(points)
    assert table.intercept_ms == pytest.approx([1, 2, 3], abs=1e-3)
    assert table.ms_per_second == pytest.approx([2, 4, 6], abs=1e-3)
    policy = BudgetPolicy(20.0, table)
    # 1 s: exit costs 3/6/9 ms -> last exit; 3 s: 7/14/21 -> exit 2; 10 s: 21/42/63 -> exit 1 (fallback)
    assert policy.chosen_exits(torch.tensor([1.0, 3.0, 10.0])).tolist() == [2, 1, 0]
    lp = torch.zeros(3, 2, 5)
    assert policy(0, lp, None, torch.tensor([1.0, 3.0, 10.0])).tolist() == [False, False, True]
    assert policy(1, lp, None, torch.tensor([1.0, 3.0, 10.0])).tolist() == [False, True, True]
    with pytest.raises(ValueError, match="durations"):
        policy(0, lp, None)
    with pytest.raises(ValueError, match="threshold"):
        BudgetPolicy(0.0, table)


def test_latency_table_round_trip(tmp_path):
    from earlyexit_brain.latency import LatencyTable

    table = fit_latency_table([{"seconds": 1.0, "ms": [1.0, 2.0]}, {"seconds": 2.0, "ms": [2.0, 4.0]}])
    table.save(str(tmp_path / "t.json"))
    again = LatencyTable.load(str(tmp_path / "t.json"))
    assert again.to_json() == table.to_json()
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        LatencyTable.load(str(tmp_path / "bad.json"))


def test_oracle_picks_the_shallowest_exit_agreeing_with_the_last():
    assert oracle_exits([["x", "y", "y"], ["a", "a", "a"], ["p", "q", "r"], ["a", "b", "a"]]) == [1, 0, 2, 0]


# ------------------------------------------------------- dynamic inference
def tiny_model(num_layers=6, exits=(2, 4, 6)):
    torch.manual_seed(0)
    enc = EarlyExitConformerEncoder(
        20, num_layers=num_layers, d_model=32, nhead=4, d_ffn=64, exit_layers=list(exits), kernel_size=3, dropout=0.0
    ).eval()
    heads = CTCExitHeads(32, 7, len(exits)).eval()
    return enc, heads


def count_layer_calls(enc):
    calls = {i: [] for i in range(len(enc.layers))}
    for i, layer in enumerate(enc.layers):
        layer.register_forward_hook(lambda m, inp, out, i=i: calls[i].append(inp[0].shape[0]))
    return calls


class StopRows(ExitPolicy):
    """Stops the given rows (indices into the original batch order) at exit 0."""

    def __init__(self, rows_at_first_exit, batch):
        self.mask = torch.zeros(batch, dtype=torch.bool)
        self.mask[list(rows_at_first_exit)] = True
        self.seen = []

    def __call__(self, exit_index, log_probs, lengths, durations=None):
        self.seen.append((exit_index, log_probs.shape[0]))
        if exit_index == 0:
            return self.mask.clone()
        return torch.zeros(log_probs.shape[0], dtype=torch.bool)


@torch.no_grad()
def test_dynamic_inference_never_runs_layers_above_the_deepest_needed_exit():
    enc, heads = tiny_model()
    calls = count_layer_calls(enc)
    feats, lengths = torch.randn(4, 41, 20), torch.tensor([1.0, 0.9, 0.6, 0.4])
    out = run_dynamic(enc, heads, feats, lengths, FixedExit(0))
    assert out.exits.tolist() == [0] * 4 and out.layers.tolist() == [2] * 4
    assert [len(calls[i]) for i in range(6)] == [1, 1, 0, 0, 0, 0]
    for c in calls.values():
        c.clear()
    out = run_dynamic(enc, heads, feats, lengths, FixedExit(1))
    assert [len(calls[i]) for i in range(6)] == [1, 1, 1, 1, 0, 0]
    # utterances that stop leave the batch: layers 3-6 see only the two others
    for c in calls.values():
        c.clear()
    policy = StopRows([0, 2], 4)
    out = run_dynamic(enc, heads, feats, lengths, policy)
    assert out.exits.tolist() == [0, 2, 0, 2]
    assert out.layers.tolist() == [2, 6, 2, 6]
    assert [calls[i] for i in range(6)] == [[4], [4], [2], [2], [2], [2]]
    assert policy.seen == [(0, 4), (1, 2)]  # the last exit needs no decision


@torch.no_grad()
@pytest.mark.parametrize("k", [0, 1, 2])
def test_policy_forced_to_exit_k_equals_the_fixed_exit_k_path(k):
    enc, heads = tiny_model()
    feats, lengths = torch.randn(3, 37, 20), torch.tensor([1.0, 0.7, 0.5])
    fixed = heads.forward_exit(k, enc(feats, lengths, max_exit=k)[k])
    out = run_dynamic(enc, heads, feats, lengths, FixedExit(k))
    frames = torch.round(lengths * fixed.shape[1]).long()
    for b in range(3):
        assert torch.equal(out.log_probs[b], fixed[b, : frames[b]])
        assert torch.equal(out.log_probs[b].argmax(-1), fixed[b, : frames[b]].argmax(-1))


class Unplanned(BudgetPolicy):
    """The budget policy deciding at each exit from the posteriors' turn, as a confidence policy does."""

    def planned_exits(self, batch, durations, num_exits):
        return None


@torch.no_grad()
def test_planned_policies_compute_only_the_exits_they_stop_at():
    enc, heads = tiny_model()
    head_calls = [0, 0, 0]
    for k, head in enumerate(heads.heads):
        head.register_forward_hook(lambda *args, k=k: head_calls.__setitem__(k, head_calls[k] + 1))
    calls = count_layer_calls(enc)
    feats, lengths = torch.randn(3, 41, 20), torch.tensor([1.0, 0.8, 0.6])
    out = run_dynamic(enc, heads, feats, lengths, FixedExit(1))
    assert out.exits.tolist() == [1] * 3 and head_calls == [0, 1, 0]
    assert [len(calls[i]) for i in range(6)] == [1, 1, 1, 1, 0, 0]
    # budget: 1 s of audio fits the last exit, 10 s only the first (see the table test above)
    points = [{"seconds": s, "ms": [1 + 2 * s, 2 + 4 * s, 3 + 6 * s]} for s in (1.0, 2.0, 4.0)]
    table, durations = fit_latency_table(points), torch.tensor([1.0, 10.0, 1.0])
    head_calls[:] = [0, 0, 0]
    for c in calls.values():
        c.clear()
    out = run_dynamic(enc, heads, feats, lengths, BudgetPolicy(20.0, table), durations, trim=False)
    assert out.exits.tolist() == [2, 0, 2] and head_calls == [1, 0, 1]
    assert [calls[i] for i in range(6)] == [[3], [3], [2], [2], [2], [2]]
    # the same outputs as deciding at every exit
    ref = run_dynamic(enc, heads, feats, lengths, Unplanned(20.0, table), durations, trim=False)
    assert ref.exits.tolist() == [2, 0, 2] and head_calls == [2, 1, 2]
    for b in range(3):
        assert torch.equal(out.log_probs[b], ref.log_probs[b])


@torch.no_grad()
def test_utterances_leaving_the_batch_do_not_change_the_others():
    enc, heads = tiny_model()
    feats, lengths = torch.randn(3, 45, 20), torch.tensor([1.0, 0.55, 0.3])
    full = heads.forward_exit(2, enc(feats, lengths)[2])
    frames = torch.round(lengths * full.shape[1]).long()
    # without trimming, the survivors' outputs are exactly the full batch's
    out = run_dynamic(enc, heads, feats, lengths, StopRows([0], 3), trim=False)
    for b in (1, 2):
        assert out.exits[b] == 2
        assert torch.allclose(out.log_probs[b], full[b, : frames[b]], atol=1e-5)
    # with trimming, an unpadded survivor is unchanged (the padding is cut to its length)
    out = run_dynamic(enc, heads, feats, lengths, StopRows([1, 2], 3))
    assert out.exits.tolist() == [2, 0, 0]
    assert torch.allclose(out.log_probs[0], full[0], atol=1e-5)


# --------------------------------------------------- sweep and calibration
def hand_outputs():
    """4 utterances, 3 exits (layers 2/4/6), 10 reference words each."""
    errors = torch.tensor([[0, 0, 0], [5, 1, 1], [4, 4, 0], [6, 3, 2]], dtype=torch.float64)
    conf = torch.tensor(
        [[0.9, 0.95, float("nan")], [0.5, 0.8, float("nan")], [0.6, 0.7, float("nan")], [0.2, 0.4, float("nan")]],
        dtype=torch.float64,
    )
    hyps = [["a", "a", "a"], ["b", "c", "c"], ["d", "d", "e"], ["f", "g", "h"]]
    ms = torch.tensor([[1, 2, 3]] * 4, dtype=torch.float64)
    return ExitOutputs(
        ids=["u0", "u1", "u2", "u3"],
        durations=torch.tensor([1.0, 2.0, 3.0, 4.0]),
        ref_words=torch.full((4,), 10.0, dtype=torch.float64),
        errors=errors,
        hyps=hyps,
        exit_ms=ms,
        exit_layers=[2, 4, 6],
        scores={"posterior_greedy": conf},
        policy_ms={"posterior_greedy": torch.zeros(4, 3, dtype=torch.float64)},
    )


def test_summarize_and_simulated_exits():
    out = hand_outputs()
    scorer = GreedyPosteriorPolicy(0.5)
    exits = confidence_exits(out, scorer, "posterior_greedy", 0.75)
    assert exits.tolist() == [0, 1, 2, 2]
    s = summarize(out, exits)
    assert s == {
        "wer": 100 * (0 + 1 + 0 + 2) / 40,
        "avg_layers": 4.5,
        "avg_exit": 2.25,
        "seconds": (1 + 2 + 3 + 3) / 1000,
    }


def test_calibration_targets():
    out = hand_outputs()
    scorer = GreedyPosteriorPolicy(0.5)
    # Last exit: 3 errors / 40 words = 7.5 %. Thresholds 1.0, 0.95, 0.9 and 0.8 keep 7.5 % with
    # 6, 5.5, 5 and 4.5 layers; 0.7 stops u2 at exit 2 (17.5 %, 4 layers); lower ones are worse.
    cal = calibrate(out, scorer, "posterior_greedy", "max_wer_increase", 2.5)
    assert cal["threshold"] == pytest.approx(0.8)
    assert cal["dev"]["wer"] == 7.5 and cal["dev"]["avg_layers"] == 4.5
    cal = calibrate(out, scorer, "posterior_greedy", "avg_layers", 4.0)
    assert cal["dev"]["avg_layers"] <= 4.0
    assert cal["threshold"] == pytest.approx(0.7)  # 0+1+4+2 errors at 4.0 layers: best WER within 4 layers
    with pytest.raises(ValueError, match="calibration_target"):
        calibrate(out, scorer, "posterior_greedy", "speed", 1.0)


def test_calibration_stops_at_the_first_threshold_that_breaks_the_target():
    """A dev WER that dips back within the target beyond a threshold that breaks it is not
    taken: from the most conservative threshold on, the first violation ends the search."""
    errors = torch.tensor([[3, 3, 0], [0, 3, 3]], dtype=torch.float64)
    conf = torch.tensor([[0.1, 0.9, float("nan")], [0.5, 0.2, float("nan")]], dtype=torch.float64)
    out = ExitOutputs(
        ids=["u0", "u1"],
        durations=torch.tensor([1.0, 2.0]),
        ref_words=torch.full((2,), 10.0, dtype=torch.float64),
        errors=errors,
        hyps=[["a", "b", "c"], ["d", "e", "f"]],
        exit_ms=torch.tensor([[1, 2, 3]] * 2, dtype=torch.float64),
        exit_layers=[2, 4, 6],
        scores={"posterior_greedy": conf},
        policy_ms={"posterior_greedy": torch.zeros(2, 3, dtype=torch.float64)},
    )
    scorer = GreedyPosteriorPolicy(0.5)
    # 0.9 stops u0 at exit 2 (+3 errors: 30% vs 15%); 0.5 also stops u1 at exit 1 (-3: 15% again,
    # 3 layers) and 0.1 both at exit 1 (15%, 2 layers): a dip, not a trend
    assert summarize(out, confidence_exits(out, scorer, "posterior_greedy", 0.1))["wer"] == 15.0
    cal = calibrate(out, scorer, "posterior_greedy", "max_wer_increase", 1.0)
    assert cal["threshold"] == pytest.approx(1.0) and cal["dev"]["avg_layers"] == 6.0
    cal = calibrate(out, scorer, "posterior_greedy", "max_wer_increase", 15.0)  # 0.9 allowed now
    assert cal["threshold"] == pytest.approx(0.1) and cal["dev"]["avg_layers"] == 2.0


def test_calibration_when_no_threshold_meets_the_target():
    """Posterior scores of exactly 1 (a one-hypothesis N-best) stop at every threshold, even
    the most conservative one: calibration takes the lowest dev WER instead of failing."""
    out = hand_outputs()
    conf = out.scores["posterior_greedy"].clone()
    conf[3, 0] = 1.0  # u3 is sure at exit 1, where it makes 6 errors instead of 2
    out.scores["posterior_greedy"] = conf
    cal = calibrate(out, GreedyPosteriorPolicy(0.5), "posterior_greedy", "max_wer_increase", 1.0)
    assert cal["threshold"] == pytest.approx(1.0)  # every other utterance goes to the last exit
    assert cal["dev"]["wer"] == 100 * (0 + 1 + 0 + 6) / 40 and cal["dev_last_exit"]["wer"] == 7.5


def test_calibration_confidence_guards_against_one_costly_utterance():
    """40 utterances of 10 words; stopping at exit 1 costs nothing except +4 errors for u4 and
    +1 for u20 (scores descend with the index; exit 2 never stops). On dev itself u4's +4 is
    exactly +1 point (4 of 400 words), so the plain rule stops u0..u19 early; on resampled dev
    sets u4 is often drawn twice, so at confidence 0.9 only u0..u3 may stop."""
    n = 40
    errors = torch.ones(n, 3, dtype=torch.float64)
    errors[4, 0], errors[20, 0] = 5.0, 2.0
    conf = torch.stack(
        [
            torch.linspace(0.99, 0.6, n, dtype=torch.float64),
            torch.zeros(n, dtype=torch.float64),
            torch.full((n,), float("nan"), dtype=torch.float64),
        ],
        1,
    )
    out = ExitOutputs(
        ids=[f"u{i}" for i in range(n)],
        durations=torch.ones(n, dtype=torch.float64),
        ref_words=torch.full((n,), 10.0, dtype=torch.float64),
        errors=errors,
        hyps=[["a", "b", "c"]] * n,
        exit_ms=torch.tensor([[1, 2, 3]] * n, dtype=torch.float64),
        exit_layers=[2, 4, 6],
        scores={"posterior_greedy": conf},
        policy_ms={"posterior_greedy": torch.zeros(n, 3, dtype=torch.float64)},
    )
    scorer = GreedyPosteriorPolicy(0.5)
    plain = calibrate(out, scorer, "posterior_greedy", "max_wer_increase", 1.0)
    sure = calibrate(out, scorer, "posterior_greedy", "max_wer_increase", 1.0, confidence=0.9)
    assert confidence_exits(out, scorer, "posterior_greedy", plain["threshold"]).tolist() == [0] * 20 + [2] * 20
    assert confidence_exits(out, scorer, "posterior_greedy", sure["threshold"]).tolist() == [0] * 4 + [2] * 36
    assert plain["dev"]["wer"] - plain["dev_last_exit"]["wer"] == pytest.approx(1.0)
    assert sure["dev"]["wer"] == sure["dev_last_exit"]["wer"]
    # the interval brackets the dev increase, and is wide for the plain choice
    low, high = plain["dev_increase_interval"]
    assert low <= 1.0 < high and high >= 2.0
    assert sure["dev_increase_interval"] == [0.0, 0.0]
    boot = WerIncreaseBootstrap(out)
    assert boot.quantile(confidence_exits(out, scorer, "posterior_greedy", sure["threshold"]), 0.9) <= 1.0
    with pytest.raises(ValueError, match="calibration_confidence"):
        calibrate(out, scorer, "posterior_greedy", "max_wer_increase", 1.0, confidence=1.0)
    # avg_layers ignores it (a recipe's confidence stays valid when the target is switched)
    assert calibrate(out, scorer, "posterior_greedy", "avg_layers", 4.0, confidence=0.9) == calibrate(
        out, scorer, "posterior_greedy", "avg_layers", 4.0
    )


def test_evaluate_policies_structure():
    out = hand_outputs()
    table = fit_latency_table([{"seconds": 1.0, "ms": [1.0, 2.0, 3.0]}, {"seconds": 4.0, "ms": [4.0, 8.0, 12.0]}])
    result = evaluate_policies(
        out,
        {"test": out},
        {"posterior_greedy": GreedyPosteriorPolicy(0.5)},
        table,
        ["posterior_greedy", "budget"],
        sweep_points=3,
    )
    names = [p["policy"] for p in result["policies"]]
    assert names[:5] == ["fixed", "fixed", "fixed", "oracle", "oracle_errors"]
    assert {"posterior_greedy", "budget"} <= set(names)
    oracle = result["policies"][3]["sets"]["test"]
    assert oracle["wer"] == 7.5 and oracle["avg_layers"] == pytest.approx((2 + 4 + 6 + 6) / 4)
    assert result["policies"][4]["sets"]["test"] == oracle  # no exit with fewer errors but other text
    assert set(result["references"]["test"]["policies"]) == {"posterior_greedy", "budget"}
    assert sum(p["calibrated"] for p in result["policies"]) == 1
    for p in result["policies"]:
        assert set(p["sets"]["test"]) == {"wer", "avg_layers", "avg_exit", "seconds"}


def test_calibration_confidence_reaches_the_report():
    from earlyexit_brain.report import policy_markdown

    out = hand_outputs()
    result = evaluate_policies(
        out,
        {"test": out},
        {"posterior_greedy": GreedyPosteriorPolicy(0.5)},
        None,
        ["posterior_greedy"],
        value=2.5,
        sweep_points=3,
        confidence=0.9,
    )
    cal = result["calibration"]
    assert cal["confidence"] == 0.9
    low, high = cal["thresholds"]["posterior_greedy"]["dev_increase_interval"]
    assert low <= high
    md = "\n".join(policy_markdown({**result, "num_layers": 6}))
    assert "with bootstrap confidence 0.9" in md
    assert f"increase 90% interval {low:+.2f} to {high:+.2f}" in md
