"""The exit policies simulated on the records of :class:`~.exit_outputs.ExitOutputs`: the exit a
threshold or a budget chooses for each utterance, and the WER, depth and time of that choice.

A policy decision for an utterance depends only on that utterance's own per-exit
scores, so the exit any threshold would choose, and the resulting WER, depth
and time, follow exactly from the records: a sweep over thresholds costs no
further passes. (``tests/unit/test_exits.py`` checks that the simulated choice
equals a real dynamic run.)
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..latency import LatencyTable
from ..policies import ConfidencePolicy
from .exit_outputs import ExitOutputs


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
