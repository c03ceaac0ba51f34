"""Offline simulation of the exit policies over :class:`~.exit_outputs.ExitOutputs`, threshold
calibration on dev (with its bootstrap bound) and the WER-vs-compute sweeps.

A policy decision for an utterance depends only on that utterance's own per-exit
scores, so the exit any threshold would choose, and the resulting WER, depth
and time, follow exactly from the records: a sweep over thresholds costs no
further passes. (``tests/unit/test_exits.py`` checks that the simulated choice
equals a real dynamic run.)
"""

import bisect
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..latency import LatencyTable
from ..policies import BudgetPolicy, ConfidencePolicy, error_oracle_exits, oracle_exits
from .exit_outputs import ExitOutputs

logger = logging.getLogger(__name__)


def first_stop(stop: torch.Tensor) -> torch.Tensor:
    """0-based exit per utterance from a ``(U, K)`` stop matrix (the last exit always stops)."""
    stop = stop.clone()
    stop[:, -1] = True
    return stop.to(torch.int8).argmax(1)


def confidence_exits(outputs: ExitOutputs, scorer: ConfidencePolicy, name: str, threshold: float) -> torch.Tensor:
    """Exits chosen by a confidence policy at ``threshold``."""
    scores = outputs.scores[name]
    return first_stop(scorer.stops(scores.nan_to_num(0.0), threshold))


def summarize(outputs: ExitOutputs, exits: torch.Tensor, overhead: Optional[str] = None) -> Dict:
    """WER, average layers computed (``compute_layers``: a Splitformer's branches included), average
    exit and seconds (encoder to the exit plus policy decisions)."""
    rows = torch.arange(len(exits))
    wer = 100.0 * float(outputs.errors[rows, exits].sum() / outputs.ref_words.sum().clamp(min=1))
    layers = torch.tensor(outputs.compute_layers or outputs.exit_layers, dtype=torch.float64)[exits]
    ms = outputs.exit_ms[rows, exits]
    if overhead is not None:
        taken = torch.arange(outputs.num_exits)[None, :] <= exits[:, None]
        ms = ms + (outputs.policy_ms[overhead] * taken).sum(1)
    return {
        "wer": round(wer, 2),
        "avg_layers": round(float(layers.mean()), 3),
        "avg_exit": round(float((exits + 1).double().mean()), 3),
        "seconds": round(float(ms.sum()) / 1000.0, 3),
    }


def candidate_thresholds(outputs: ExitOutputs, name: str) -> torch.Tensor:
    """Every distinct score at the exits where a decision is made."""
    scores = outputs.scores[name][:, :-1].flatten()
    return torch.unique(scores[~torch.isnan(scores)])


def threshold_points(outputs: ExitOutputs, scorer: ConfidencePolicy, name: str, thresholds: Sequence[float]) -> List:
    """``[(threshold, summary, exits), ...]`` of a confidence policy, decision time included
    in the summary; ``exits`` (each utterance's chosen exit) is kept for the bootstrap."""
    points = []
    for thr in thresholds:
        exits = confidence_exits(outputs, scorer, name, thr)
        points.append((thr, summarize(outputs, exits, overhead=name), exits))
    return points


class WerIncreaseBootstrap:
    """Paired bootstrap over utterances of the WER increase (points) over the last exit.

    The same ``resamples`` draws of the utterances (with replacement, fixed
    ``seed``) serve every threshold, so two thresholds are compared on the same
    resampled dev sets.
    """

    def __init__(self, outputs: ExitOutputs, resamples: int = 1000, seed: int = 0):
        n = len(outputs.ids)
        gen = torch.Generator().manual_seed(seed)
        draws = torch.randint(0, max(n, 1), (resamples, n), generator=gen)  # n = 0: no draws
        self.counts = torch.zeros(resamples, n, dtype=torch.float64)
        self.counts.scatter_add_(1, draws, torch.ones(resamples, n, dtype=torch.float64))
        self.outputs = outputs
        self.words = (self.counts @ outputs.ref_words).clamp(min=1)

    def increases(self, exits: torch.Tensor) -> torch.Tensor:
        """``(resamples,)`` WER increases of the choice ``exits`` over the last exit."""
        out = self.outputs
        diff = out.errors[torch.arange(len(exits)), exits] - out.errors[:, -1]
        return 100.0 * (self.counts @ diff) / self.words

    def quantile(self, exits: torch.Tensor, q: float) -> float:
        return float(torch.quantile(self.increases(exits), q))


def calibrate(
    outputs: ExitOutputs,
    scorer: ConfidencePolicy,
    name: str,
    target: str = "max_wer_increase",
    value: float = 1.0,
    confidence: Optional[float] = None,
    resamples: int = 1000,
) -> Dict:
    """Pick a confidence policy's threshold on a dev set.

    ``max_wer_increase``: going from the most conservative threshold towards
    the most aggressive one, the threshold with the fewest average layers before
    the first whose WER is more than ``value`` points above the last exit's (a
    threshold beyond one that breaks the target is not taken even when the dev
    WER dips back within it: such dips are noise on a small dev set, measured in
    docs/performance.md). With ``confidence`` (in (0, 1)), a threshold breaks
    the target when the ``confidence`` quantile of its WER increase under a
    paired bootstrap over the dev utterances exceeds ``value``, rather than the
    increase measured on dev itself: the target then holds on resampled dev sets
    with that probability, at the cost of depth. ``avg_layers`` ignores
    ``confidence`` and takes the
    threshold with the lowest WER whose average depth is at most ``value``
    layers. Ties go to the more conservative threshold (deeper). When no
    threshold meets ``max_wer_increase`` (scores at the top of the range always
    stop), the one with the lowest WER is taken, with a warning.

    The result carries ``dev_increase_interval``: the 5% and 95% bootstrap
    quantiles of the chosen threshold's dev WER increase over the last exit.
    """
    if confidence is not None and not 0.0 < confidence < 1.0:
        raise ValueError(f"calibration_confidence must be null or a number in (0, 1), got {confidence!r}")
    last = summarize(outputs, torch.full((len(outputs.ids),), outputs.num_exits - 1))
    never = scorer.valid_range[1] if scorer.higher_is_confident else scorer.valid_range[0]
    points = threshold_points(outputs, scorer, name, [never] + candidate_thresholds(outputs, name).tolist())
    boot = WerIncreaseBootstrap(outputs, resamples)
    if target == "max_wer_increase":
        ok = []
        for point in sorted(points, key=lambda p: p[0], reverse=scorer.higher_is_confident):
            if confidence is None:
                increase = point[1]["wer"] - last["wer"]
            else:
                increase = boot.quantile(point[2], confidence)
            if increase > value + 1e-9:
                break
            ok.append(point)
        if ok:
            best_thr, best, best_exits = min(ok, key=lambda p: (p[1]["avg_layers"], p[1]["wer"]))
        else:
            # Even the most conservative threshold stops some utterances early: scores at
            # the top of the policy's range (an N-best posterior of exactly 1 when the beam
            # holds one hypothesis) always stop. Take the lowest dev WER, deeper on ties.
            best_thr, best, best_exits = min(points, key=lambda p: (p[1]["wer"], -p[1]["avg_layers"]))
            logger.warning(
                "%s: no threshold keeps the dev WER within %.2f points of the last "
                "exit (%.2f)%s; using %.4g (dev WER %.2f)",
                name,
                value,
                last["wer"],
                "" if confidence is None else f" at confidence {confidence}",
                best_thr,
                best["wer"],
            )
    elif target == "avg_layers":
        ok = [p for p in points if p[1]["avg_layers"] <= value + 1e-9]
        if ok:
            best_thr, best, best_exits = min(ok, key=lambda p: (p[1]["wer"], -p[1]["avg_layers"]))
        else:  # the target is below the first exit: stop as early as the policy can
            best_thr, best, best_exits = min(points, key=lambda p: (p[1]["avg_layers"], p[1]["wer"]))
    else:
        raise ValueError(f"calibration_target: accepted values are 'max_wer_increase' and 'avg_layers', got {target!r}")
    increases = boot.increases(best_exits)
    interval = [round(float(torch.quantile(increases, q)), 2) for q in (0.05, 0.95)]
    return {"threshold": float(best_thr), "dev": best, "dev_last_exit": last, "dev_increase_interval": interval}


def sweep_thresholds(outputs: ExitOutputs, name: str, points: int) -> List[float]:
    """``points`` thresholds spread over the dev scores' quantiles."""
    cands = candidate_thresholds(outputs, name)
    if len(cands) == 0:
        return []
    qs = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    return sorted({round(float(v), 6) for v in torch.quantile(cands, qs)})


def budget_sweep(outputs: ExitOutputs, table: LatencyTable, points: int) -> List[float]:
    """Budgets (ms) spanning the predicted cost of the first to the last exit."""
    low = float(table.predict_ms(0, outputs.durations).min())
    high = float(table.predict_ms(table.num_exits - 1, outputs.durations).max())
    return [round(v, 3) for v in torch.linspace(low, high, points).tolist()]


def nearest_depth(outputs: ExitOutputs, scorer: ConfidencePolicy, name: str, avg_layers: float) -> Dict:
    """The point of a policy whose average depth is closest to ``avg_layers`` (then lowest WER)."""
    points = threshold_points(outputs, scorer, name, candidate_thresholds(outputs, name).tolist())
    if not points:
        return {}
    thr, point, _ = min(points, key=lambda p: (abs(p[1]["avg_layers"] - avg_layers), p[1]["wer"]))
    return {"threshold": thr, **point}


def depth_and_wer(outputs: ExitOutputs, exits: torch.Tensor) -> Tuple[float, float]:
    """Unrounded ``(average compute layers, WER)`` of the choice ``exits`` (as :func:`summarize`)."""
    rows = torch.arange(len(exits))
    wer = 100.0 * float(outputs.errors[rows, exits].sum() / outputs.ref_words.sum().clamp(min=1))
    layers = torch.tensor(outputs.compute_layers or outputs.exit_layers, dtype=torch.float64)[exits]
    return float(layers.mean()), wer


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


def evaluate_policies(
    dev: ExitOutputs,
    sets: Dict[str, ExitOutputs],
    scorers: Dict[str, ConfidencePolicy],
    latency_table: Optional[LatencyTable],
    policies: Sequence[str] = ("entropy", "posterior", "posterior_greedy", "budget"),
    target: str = "max_wer_increase",
    value: float = 1.0,
    sweep_points: int = 9,
    confidence: Optional[float] = None,
    reference_thresholds: int = 200,
    reference_budgets: int = 50,
) -> Dict:
    """Calibrate on ``dev``, then sweep every policy on every set.

    Returns ``{"policies": [...], "calibration": {...}, "depth_matched": {...},
    "references": {...}}`` where each policy entry is ``{"policy", "threshold",
    "calibrated", "sets": {set: {"wer", "avg_layers", "avg_exit", "seconds"}}}``
    (``exit`` for fixed exits; ``threshold`` is ms for ``budget`` and None for
    ``fixed`` and the two oracles: ``oracle``, agreement with the last exit's
    text, :func:`~earlyexit_brain.policies.oracle_exits`, and ``oracle_errors``,
    no more word errors than the last exit,
    :func:`~earlyexit_brain.policies.error_oracle_exits`). ``references`` is
    :func:`policy_references` of every policy swept (dense curves of at most
    ``reference_thresholds`` dev thresholds, ``reference_budgets`` budgets).
    """
    entries: List[Dict] = []

    def add(policy, threshold, exits_for, calibrated=False, overhead=None, **extra):
        entry = {"policy": policy, "threshold": threshold, "calibrated": calibrated, **extra, "sets": {}}
        for set_name, out in sets.items():
            entry["sets"][set_name] = summarize(out, exits_for(out), overhead=overhead)
        entries.append(entry)

    for k in range(dev.num_exits):
        add("fixed", None, lambda out, k=k: torch.full((len(out.ids),), k), exit=k + 1)
    add("oracle", None, lambda out: torch.tensor(oracle_exits(out.hyps), dtype=torch.long))
    add("oracle_errors", None, lambda out: torch.tensor(error_oracle_exits(out.errors), dtype=torch.long))

    calibration = {
        "target": target,
        "value": value,
        "confidence": confidence if target == "max_wer_increase" else None,
        "thresholds": {},
    }
    judged: List[str] = []  # the policies swept, judged against the fixed-exit line
    for name in policies:
        if name == "budget":
            if latency_table is None:
                continue
            judged.append(name)
            for budget in budget_sweep(dev, latency_table, sweep_points):
                policy = BudgetPolicy(max(budget, 1e-6), latency_table)
                add("budget", budget, lambda out, p=policy: p.chosen_exits(out.durations))
            continue
        if name not in scorers:
            raise ValueError(
                f"policy_sweep: unknown policy {name!r}; accepted: {', '.join(list(scorers) + ['budget'])}"
            )
        scorer = scorers[name]
        judged.append(name)
        cal = calibrate(dev, scorer, name, target, value, confidence)
        calibration["thresholds"][name] = cal
        thresholds = {t for t in sweep_thresholds(dev, name, sweep_points) if abs(t - cal["threshold"]) > 1e-5} | {
            cal["threshold"]
        }
        for thr in sorted(thresholds):
            add(
                name,
                thr,
                lambda out, t=thr, s=scorer, n=name: confidence_exits(out, s, n, t),
                calibrated=thr == cal["threshold"],
                overhead=name,
            )

    depth_matched = {}
    if "posterior" in calibration["thresholds"]:
        ref_thr = calibration["thresholds"]["posterior"]["threshold"]
        for set_name, out in sets.items():
            ref = summarize(
                out, confidence_exits(out, scorers["posterior"], "posterior", ref_thr), overhead="posterior"
            )
            row = {"posterior": {"threshold": ref_thr, **ref}}
            for name in calibration["thresholds"]:
                if name != "posterior":
                    row[name] = nearest_depth(out, scorers[name], name, ref["avg_layers"])
            depth_matched[set_name] = row
    references = policy_references(
        dev,
        sets,
        scorers,
        latency_table,
        judged,
        {n: c["threshold"] for n, c in calibration["thresholds"].items()},
        reference_thresholds,
        reference_budgets,
    )
    return {
        "policies": entries,
        "calibration": calibration,
        "depth_matched": depth_matched,
        "references": references,
    }
