"""Threshold calibration on dev (with its paired bootstrap bound), and every policy evaluated on every
set: calibrated point, depth-matched comparison, WER-vs-compute sweeps and the references of
:mod:`.references` (the policies themselves are simulated on the records by :mod:`.simulation`)."""

import logging
from typing import Dict, List, Optional, Sequence

import torch

from ..latency import LatencyTable
from ..policies import BudgetPolicy, ConfidencePolicy, error_oracle_exits, oracle_exits
from .exit_outputs import ExitOutputs
from .references import policy_references
from .simulation import (
    budget_sweep,
    candidate_thresholds,
    confidence_exits,
    nearest_depth,
    summarize,
    sweep_thresholds,
    threshold_points,
)

logger = logging.getLogger(__name__)


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
