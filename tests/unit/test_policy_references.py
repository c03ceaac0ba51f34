"""Exit policies judged against the fixed-exit line (area, mean gap, calibrated gap) and the
error-aware oracle; every expected number is derived by hand in the comments."""

import os

import pytest
import torch

from earlyexit_brain.evaluation import (
    ExitOutputs,
    area_below_line,
    evaluate_policies,
    fixed_exit_line,
    line_wer,
)
from earlyexit_brain.latency import fit_latency_table
from earlyexit_brain.policies import GreedyPosteriorPolicy, error_oracle_exits, oracle_exits

# The fixed-exit line of the points (2, 30), (4, 20), (6, 15): slope -5 per layer up to
# depth 4, then -2.5.
LINE = ([2.0, 4.0, 6.0], [30.0, 20.0, 15.0])


def outputs(compute_layers=None):
    """4 utterances of 10 words, exits after layers 2/4/6; exit totals 15, 8 and 3 errors (WER
    37.5, 20 and 7.5). u1's exit-2 text differs from the last exit's but has as few errors."""
    conf = torch.tensor(
        [[0.9, 0.95, float("nan")], [0.5, 0.8, float("nan")], [0.6, 0.7, float("nan")], [0.2, 0.4, float("nan")]],
        dtype=torch.float64,
    )
    return ExitOutputs(
        ids=["u0", "u1", "u2", "u3"],
        durations=torch.ones(4, dtype=torch.float64),
        ref_words=torch.full((4,), 10.0, dtype=torch.float64),
        errors=torch.tensor([[0, 0, 0], [5, 1, 1], [4, 4, 0], [6, 3, 2]], dtype=torch.float64),
        hyps=[["a", "a", "a"], ["b", "c", "z"], ["d", "d", "e"], ["f", "g", "h"]],
        exit_ms=torch.tensor([[1, 2, 3]] * 4, dtype=torch.float64),
        exit_layers=[2, 4, 6],
        compute_layers=compute_layers,
        scores={"posterior_greedy": conf, "learned": conf.clone()},
        policy_ms={n: torch.zeros(4, 3, dtype=torch.float64) for n in ("posterior_greedy", "learned")},
    )


def test_fixed_exit_line_points_and_interpolation():
    assert fixed_exit_line(outputs()) == ([2.0, 4.0, 6.0], [37.5, 20.0, 7.5])
    # a Splitformer's branches counted: the depths are the compute layers
    assert fixed_exit_line(outputs(compute_layers=[4, 6, 10]))[0] == [4.0, 6.0, 10.0]
    # half of the utterances at exit 1 and half at exit 2: depth 3, WER (30 + 20) / 2
    assert line_wer(*LINE, 3.0) == pytest.approx(25.0)
    assert line_wer(*LINE, 5.0) == pytest.approx(17.5)  # (20 + 15) / 2
    assert line_wer(*LINE, 4.5) == pytest.approx(18.75)  # a quarter of the way from 20 to 15
    assert line_wer(*LINE, 2.0) == 30.0 and line_wer(*LINE, 6.0) == 15.0
    assert line_wer(*LINE, 1.0) == 30.0 and line_wer(*LINE, 7.0) == 15.0  # constant beyond the exits


def test_area_of_a_policy_on_the_line_is_zero():
    on_line = [(2.0, 30.0), (3.0, 25.0), (4.0, 20.0), (5.0, 17.5), (6.0, 15.0)]  # through the kink at 4
    result = area_below_line(*LINE, on_line)
    assert result["area"] == pytest.approx(0.0, abs=1e-12)
    assert result["mean_gap"] == pytest.approx(0.0, abs=1e-12)
    assert result["depth_range"] == [2.0, 6.0]


def test_area_one_point_below_over_two_layers_is_two():
    # 1 WER point under the line at 3, 4 and 5 (line 25, 20, 17.5), given out of order
    below = [(5.0, 16.5), (3.0, 24.0), (4.0, 19.0)]
    result = area_below_line(*LINE, below)
    assert result["area"] == pytest.approx(2.0)  # 1 point x 2 layers
    assert result["mean_gap"] == pytest.approx(1.0)
    assert result["depth_range"] == [3.0, 5.0]
    above = area_below_line(*LINE, [(3.0, 26.0), (4.0, 21.0), (5.0, 18.5)])
    assert above["area"] == pytest.approx(-2.0) and above["mean_gap"] == pytest.approx(-1.0)


def test_area_follows_the_line_through_a_fixed_exit_between_policy_points():
    # policy points (3, 24) and (5, 16.5) only: the curve is straight from 24 to 16.5 (20.25 at
    # depth 4) while the line bends at the fixed exit (4, 20). Gaps: +1 at 3, -0.25 at 4, +1
    # at 5; two trapezoids of width 1: (1 - 0.25) / 2 + (-0.25 + 1) / 2 = 0.75.
    result = area_below_line(*LINE, [(3.0, 24.0), (5.0, 16.5)])
    assert result["area"] == pytest.approx(0.75)
    assert result["mean_gap"] == pytest.approx(0.375)


def test_points_of_equal_depth_are_averaged_and_one_depth_has_no_area():
    # (3, 24) and (3, 26) average to (3, 25), on the line; to (5, 17.5), also on it, the curve is
    # straight (21.25 at depth 4 against the line's 20): a triangle of height -1.25 and base 2
    result = area_below_line(*LINE, [(3.0, 24.0), (5.0, 17.5), (3.0, 26.0)])
    assert result["area"] == pytest.approx(-1.25)
    single = area_below_line(*LINE, [(4.0, 19.0), (4.0, 18.0)])
    assert single == {"area": 0.0, "mean_gap": None, "depth_range": [4.0, 4.0]}


def test_error_aware_oracle_takes_the_shallowest_exit_with_no_more_errors():
    errors = torch.tensor([[3, 2, 2], [3, 2, 1], [0, 2, 2], [5, 1, 4]], dtype=torch.float64)
    # u0: 2 <= 2 at exit 2; u1: only the last has 1; u2: 0 <= 2 at once; u3: 1 <= 4 at exit 2
    assert error_oracle_exits(errors) == [1, 2, 0, 1]
    assert error_oracle_exits([[1], [0]]) == [0, 0]  # one exit
    # never deeper than the agreement oracle (equal text, equal errors)
    out = outputs()
    assert oracle_exits(out.hyps) == [0, 2, 2, 2] and error_oracle_exits(out.errors) == [0, 1, 2, 2]


def test_evaluate_policies_references():
    out = outputs()
    table = fit_latency_table([{"seconds": 1.0, "ms": [1.0, 2.0, 3.0]}, {"seconds": 4.0, "ms": [4.0, 8.0, 12.0]}])
    scorer = GreedyPosteriorPolicy(0.5)
    result = evaluate_policies(
        out,
        {"test": out},
        {"posterior_greedy": scorer, "learned": GreedyPosteriorPolicy(0.5)},
        table,
        ["posterior_greedy", "budget", "learned"],
        value=1.0,
        sweep_points=3,
    )
    names = [p["policy"] for p in result["policies"]]
    assert names[:5] == ["fixed", "fixed", "fixed", "oracle", "oracle_errors"]
    # agreement oracle: exits 1, 3, 3, 3 -> depth 5, errors 0 + 1 + 0 + 2 -> WER 7.5;
    # error-aware: exits 1, 2, 3, 3 -> depth 4.5, the same WER
    assert result["policies"][3]["sets"]["test"]["avg_layers"] == 5.0
    errors_oracle = result["policies"][4]["sets"]["test"]
    assert errors_oracle["avg_layers"] == 4.5 and errors_oracle["wer"] == 7.5

    ref = result["references"]["test"]
    assert ref["fixed_line"] == {"layers": [2.0, 4.0, 6.0], "wer": [37.5, 20.0, 7.5]}
    # The line: 37.5 - 8.75 (d - 2) up to depth 4, then 20 - 6.25 (d - 4).
    # The policy stops at the first exit whose score is >= t. Over the dev candidates 0.2, 0.4,
    # ..., 0.95 and 1.0 its (depth, WER) points are (2, 37.5), (2.5, 30), (3, 27.5),
    # (3.5, 17.5), (4, 17.5), (4.5, 7.5), (5, 7.5), (5.5, 7.5), (6, 7.5); the line there is
    # 37.5, 33.125, 28.75, 24.375, 20, 16.875, 13.75, 10.625, 7.5, so the gaps are
    # 0, 3.125, 1.25, 6.875, 2.5, 9.375, 6.25, 3.125, 0 and the trapezoids of width 0.5 sum to
    # 0.5 * (3.125 + 1.25 + 6.875 + 2.5 + 9.375 + 6.25 + 3.125) = 16.25 over 4 layers.
    pg = ref["policies"]["posterior_greedy"]
    assert pg["area"] == pytest.approx(16.25)
    assert pg["mean_gap"] == pytest.approx(16.25 / 4)
    assert pg["depth_range"] == [2.0, 6.0]
    # calibrated (+1 point on dev = 8.5 at most): the walk from t = 1 stops before 0.7 (WER 17.5);
    # of 1.0, 0.95, 0.9, 0.8 the shallowest is 0.8 at depth 4.5, WER 7.5; the line is 16.875 there
    cal = pg["calibrated"]
    assert cal["threshold"] == pytest.approx(0.8)
    assert (cal["avg_layers"], cal["wer"]) == (4.5, 7.5)
    assert cal["line_wer"] == pytest.approx(16.875) and cal["gap"] == pytest.approx(9.375)
    # a policy under another name (the learned one) is judged the same way, with no name listed
    assert ref["policies"]["learned"] == pg
    # budget: every utterance lasts 1 s, so each budget sends all of them to one fixed exit,
    # from the first (budget 1 ms) to the last (3 ms): on the line, area 0, no calibrated point
    budget = ref["policies"]["budget"]
    assert budget["area"] == pytest.approx(0.0, abs=1e-9) and budget["mean_gap"] == pytest.approx(0.0, abs=1e-9)
    assert budget["depth_range"] == [2.0, 6.0] and budget["calibrated"] is None
    # the oracles, single points: the line is 13.75 at depth 5 and 16.875 at 4.5
    assert ref["oracles"]["oracle"]["gap"] == pytest.approx(13.75 - 7.5)
    assert ref["oracles"]["oracle_errors"] == {"avg_layers": 4.5, "wer": 7.5, "line_wer": 16.875, "gap": 9.375}


def test_two_point_and_one_depth_policies_and_no_latency_table():
    out = outputs()
    nan = float("nan")
    # "flat": scores 0 at the first exits. Its thresholds are the dev candidate 0 (every
    # utterance stops at exit 1: (2, 37.5)) and 1, the most conservative (all at the last
    # exit: (6, 7.5)), both fixed points; the straight segment between them is 22.5 at depth
    # 4, where the line bends down to 20: a triangle of height -2.5 and base 4, area -5.
    # "sure": scores 1, the top of the range, which stop at exit 1 whatever the threshold.
    out.scores = {
        "flat": torch.tensor([[0.0, 0.0, nan]] * 4, dtype=torch.float64),
        "sure": torch.tensor([[1.0, 1.0, nan]] * 4, dtype=torch.float64),
    }
    out.policy_ms = {n: torch.zeros(4, 3, dtype=torch.float64) for n in out.scores}
    scorers = {"flat": GreedyPosteriorPolicy(0.5), "sure": GreedyPosteriorPolicy(0.5)}
    result = evaluate_policies(out, {"test": out}, scorers, None, ["flat", "sure", "budget"])
    refs = result["references"]["test"]["policies"]
    assert refs["flat"]["depth_range"] == [2.0, 6.0] and refs["flat"]["points"] == 2
    assert refs["flat"]["area"] == pytest.approx(-5.0) and refs["flat"]["mean_gap"] == pytest.approx(-1.25)
    assert refs["sure"]["depth_range"] == [2.0, 2.0] and refs["sure"]["area"] == 0.0
    assert refs["sure"]["mean_gap"] is None
    assert refs["sure"]["calibrated"]["gap"] == pytest.approx(0.0)  # the first fixed exit itself
    assert "budget" not in refs  # no latency table, no budget sweep


def test_report_shows_the_references():
    from earlyexit_brain.report import policy_markdown

    out = outputs()
    result = evaluate_policies(
        out, {"test": out}, {"posterior_greedy": GreedyPosteriorPolicy(0.5)}, None, ["posterior_greedy"]
    )
    result["references"]["test"]["policies"]["single"] = {
        "area": 0.0,
        "mean_gap": None,
        "depth_range": [4.0, 4.0],
        "points": 3,
        "calibrated": None,
    }
    md = "\n".join(policy_markdown({**result, "num_layers": 6}))
    assert "## Policies against the fixed-exit line" in md and "### test" in md
    assert "| posterior_greedy | 2.00 to 6.00 | +16.25 | +4.06 | 4.50 | 7.50 | +9.38 |" in md
    assert "| single | 4.00 (single depth) | +0.00 | - | - | - | - |" in md
    assert "oracle_errors (no more word errors than the last exit): 4.50 layers, WER 7.50" in md
    assert "Positive means the policy lies below the line" in md


def test_plot_draws_the_line_and_both_oracles(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from earlyexit_brain.report import _plot_policies, plot_wer_vs_compute

    out = outputs()
    result = evaluate_policies(
        out, {"test": out}, {"posterior_greedy": GreedyPosteriorPolicy(0.5)}, None, ["posterior_greedy"]
    )
    fig, ax = plt.subplots()
    _plot_policies(ax, result["policies"], "test")
    handles, labels = ax.get_legend_handles_labels()
    by_label = dict(zip(labels, handles))
    line = by_label["fixed-exit line (random split)"]
    assert line.get_linestyle() == "--"
    assert list(line.get_xdata()) == [2.0, 4.0, 6.0] and list(line.get_ydata()) == [37.5, 20.0, 7.5]
    assert by_label["oracle (agreement)"].get_marker() == "^"
    errors = by_label["oracle (errors)"]
    assert errors.get_marker() == "D" and (list(errors.get_xdata()), list(errors.get_ydata())) == ([4.5], [7.5])
    plt.close(fig)
    report = {"num_layers": 6, "exits": [{"layer": k, "sets": {"test": {}}} for k in (2, 4, 6)], **result}
    assert os.path.isfile(plot_wer_vs_compute(report, str(tmp_path / "plot.png")))
