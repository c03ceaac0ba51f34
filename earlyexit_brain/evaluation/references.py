"""The references a policy is judged against (docs/exit_policies.md): the fixed-exit line, the area
between a policy's WER-vs-depth curve and that line, and the agreement and error-aware oracles."""

import bisect
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..latency import LatencyTable
from ..policies import BudgetPolicy, ConfidencePolicy, error_oracle_exits, oracle_exits
from .exit_outputs import ExitOutputs
from .simulation import budget_sweep, candidate_thresholds, confidence_exits, depth_and_wer


def fixed_exit_line(outputs: ExitOutputs) -> Tuple[List[float], List[float]]:
    """``(depths, wers)`` of the fixed exits, by depth: the vertices of the fixed-exit line.

    ``depths`` are each exit's compute layers (``compute_layers``, else
    ``exit_layers``, as :func:`summarize` counts them) and ``wers`` the WER (%)
    of sending every utterance to that exit. Between two adjacent exits ``k``
    and ``k + 1`` the line is what needs no policy at all: send each utterance
    to exit ``k + 1`` with probability ``p`` and to exit ``k`` otherwise,
    at random. The reference words do not depend on the choice, so the expected
    errors, and with them the expected WER, are ``(1 - p) WER_k + p WER_{k+1}``
    while the expected average depth is ``(1 - p) d_k + p d_{k+1}``: as ``p``
    goes from 0 to 1 the expectation moves along the straight segment between
    the two fixed points, and :func:`line_wer` is the linear interpolation.
    """
    words = outputs.ref_words.sum().clamp(min=1)
    layers = outputs.compute_layers or outputs.exit_layers
    points = sorted(
        (float(layers[k]), 100.0 * float(outputs.errors[:, k].sum() / words)) for k in range(outputs.num_exits)
    )
    return [d for d, _ in points], [w for _, w in points]


def _interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear ``y(x)`` through ascending ``xs``, constant beyond the ends."""
    if x <= xs[0]:
        return float(ys[0])
    if x >= xs[-1]:
        return float(ys[-1])
    i = bisect.bisect_right(xs, x) - 1
    x0, x1 = xs[i], xs[i + 1]
    if x1 == x0:
        return float(ys[i + 1])
    return float(ys[i] + (ys[i + 1] - ys[i]) * (x - x0) / (x1 - x0))


def line_wer(depths: Sequence[float], wers: Sequence[float], depth: float) -> float:
    """WER of the fixed-exit line (:func:`fixed_exit_line`) at average depth ``depth``.

    Example
    -------
    >>> line_wer([2.0, 4.0, 6.0], [30.0, 20.0, 16.0], 3.0)
    25.0
    >>> line_wer([2.0, 4.0, 6.0], [30.0, 20.0, 16.0], 5.5)
    17.0
    """
    return _interpolate(depths, wers, depth)


def area_below_line(depths: Sequence[float], wers: Sequence[float], points: Sequence[Tuple[float, float]]) -> Dict:
    """Signed area between the fixed-exit line and a policy's WER-vs-depth curve.

    ``points`` are the policy's ``(average depth, WER)`` points. They are sorted
    by depth, points of equal depth averaged, and the curve is the
    piecewise-linear path through them. Over the depth range ``[lo, hi]`` it
    covers, ``area = integral of (line_wer(d) - curve(d)) dd`` in WER points x
    layers, by the trapezoid rule on the union of the policy's depths and the
    fixed exits' depths inside the range (exact for the two piecewise-linear
    functions). Positive when the policy lies below the line (better).
    ``mean_gap = area / (hi - lo)``: the average WER points below the line. A
    policy of one depth has ``area`` 0 and ``mean_gap`` None.

    Example
    -------
    >>> area_below_line([2.0, 6.0], [30.0, 10.0], [(3.0, 24.0), (5.0, 14.0)])
    {'area': 2.0, 'mean_gap': 1.0, 'depth_range': [3.0, 5.0]}
    """
    merged: List[List[float]] = []
    for d, w in sorted((float(d), float(w)) for d, w in points if d == d and w == w):  # NaN: an empty set
        if merged and abs(d - merged[-1][0]) <= 1e-9:
            merged[-1][1] += w
            merged[-1][2] += 1
        else:
            merged.append([d, w, 1])
    if not merged:
        return {"area": 0.0, "mean_gap": None, "depth_range": None}
    xs = [d for d, _, _ in merged]
    ys = [w / n for _, w, n in merged]
    lo, hi = xs[0], xs[-1]
    if hi - lo <= 1e-9:
        return {"area": 0.0, "mean_gap": None, "depth_range": [lo, lo]}
    grid = sorted(set(xs) | {float(d) for d in depths if lo < d < hi})
    gaps = [line_wer(depths, wers, x) - _interpolate(xs, ys, x) for x in grid]
    area = sum((grid[i + 1] - grid[i]) * (gaps[i] + gaps[i + 1]) / 2.0 for i in range(len(grid) - 1))
    return {"area": area, "mean_gap": area / (hi - lo), "depth_range": [lo, hi]}


def curve_thresholds(dev: ExitOutputs, scorer: ConfidencePolicy, name: str, limit: int = 200) -> List[float]:
    """The thresholds of a confidence policy's dense curve: every distinct dev candidate
    (:func:`candidate_thresholds`; ``limit`` quantiles of them when there are more) and the
    most conservative threshold of the policy's range (as :func:`calibrate` tries it)."""
    cands = candidate_thresholds(dev, name)
    if len(cands) > limit:
        cands = torch.quantile(cands, torch.linspace(0.0, 1.0, limit, dtype=torch.float64))
    never = scorer.valid_range[1] if scorer.higher_is_confident else scorer.valid_range[0]
    return sorted({float(v) for v in cands.tolist()} | {float(never)})


def policy_references(
    dev: ExitOutputs,
    sets: Dict[str, ExitOutputs],
    scorers: Dict[str, ConfidencePolicy],
    latency_table: Optional[LatencyTable],
    names: Sequence[str],
    calibrated: Dict[str, float],
    curve_points: int = 200,
    budget_points: int = 50,
) -> Dict:
    """Every policy of ``names`` judged against the fixed-exit line on every set.

    ``calibrated`` maps a confidence policy to its dev threshold. A confidence
    policy's curve applies :func:`curve_thresholds` of dev (and its calibrated
    threshold) to the set; ``budget``'s is a :func:`budget_sweep` of
    ``budget_points`` budgets. Returns ``{set: {"fixed_line": {"layers",
    "wer"}, "policies": {name: {"area", "mean_gap", "depth_range", "points",
    "calibrated"}}, "oracles": {name: {"avg_layers", "wer", "line_wer",
    "gap"}}}}``; ``calibrated`` is ``{"threshold", "avg_layers", "wer",
    "line_wer", "gap"}`` (None for ``budget``); ``gap`` is the line's WER at
    the point's depth minus the point's WER (positive: below the line).
    """

    def judged(depths, wers, depth, wer):
        line = line_wer(depths, wers, depth)
        return {
            "avg_layers": round(depth, 3),
            "wer": round(wer, 2),
            "line_wer": round(line, 4),
            "gap": round(line - wer, 4),
        }

    references = {}
    for set_name, out in sets.items():
        depths, wers = fixed_exit_line(out)
        row = {
            "fixed_line": {"layers": [round(d, 3) for d in depths], "wer": [round(w, 4) for w in wers]},
            "policies": {},
            "oracles": {},
        }
        for oracle, exits in (
            ("oracle", oracle_exits(out.hyps)),
            ("oracle_errors", error_oracle_exits(out.errors)),
        ):
            row["oracles"][oracle] = judged(depths, wers, *depth_and_wer(out, torch.tensor(exits, dtype=torch.long)))
        for name in names:
            if name == "budget":
                if latency_table is None:
                    continue
                choices = [
                    BudgetPolicy(max(b, 1e-6), latency_table).chosen_exits(out.durations)
                    for b in budget_sweep(dev, latency_table, budget_points)
                ]
                cal = None
            else:
                scorer = scorers[name]
                thresholds = curve_thresholds(dev, scorer, name, curve_points)
                if name in calibrated:
                    thresholds = sorted(set(thresholds) | {float(calibrated[name])})
                choices = [confidence_exits(out, scorer, name, t) for t in thresholds]
                cal = None
                if name in calibrated:
                    thr = float(calibrated[name])
                    cal = {
                        "threshold": thr,
                        **judged(depths, wers, *depth_and_wer(out, confidence_exits(out, scorer, name, thr))),
                    }
            points = [depth_and_wer(out, exits) for exits in choices]
            area = area_below_line(depths, wers, points)
            row["policies"][name] = {
                "area": round(area["area"], 4),
                "mean_gap": None if area["mean_gap"] is None else round(area["mean_gap"], 4),
                "depth_range": None if area["depth_range"] is None else [round(d, 3) for d in area["depth_range"]],
                "points": len(points),
                "calibrated": cal,
            }
        references[set_name] = row
    return references
