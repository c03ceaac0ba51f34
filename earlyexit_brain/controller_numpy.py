"""The learned exit controller's features and estimator in numpy: the one definition that
PyTorch (:mod:`earlyexit_brain.controller`) and the ONNX runtime (:mod:`earlyexit_brain.runtime`)
both compute with.

At exit ``k`` the controller reads ``9 + D`` numbers per utterance (:func:`controller_features`):
statistics of the exit's CTC posteriors over the valid frames (:data:`CONTROLLER_STATISTICS`:
mean entropy divided by ``log V``, mean and geometric mean of the best token's posterior, its
minimum, the share of blank frames, greedy tokens per frame), its agreement with the previous
exit (the share of frames with the same best token among those where either is not blank; whether
the two greedy hypotheses are the same token sequence), ``log`` of the number of frames, and the
exit's encoder states averaged over the valid frames. numpy rather than PyTorch: at batch 1 the
features are some forty operations on small arrays, where numpy's per-operation overhead is a
fraction of PyTorch's.
"""

import math
from typing import Dict, List, Optional

import numpy as np

from .policy_bundle import CONTROLLER_STATISTICS, ControllerWeights


def greedy_tokens(best: np.ndarray, blank_index: int) -> np.ndarray:
    """The greedy CTC hypothesis (repeats merged, blanks dropped) of one utterance's best tokens."""
    if best.size == 0:
        return best
    keep = np.empty(best.shape, bool)
    keep[0] = True
    np.not_equal(best[1:], best[:-1], out=keep[1:])
    keep &= best != blank_index
    return best[keep]


def controller_features(
    hidden: np.ndarray,
    log_probs: np.ndarray,
    frames: np.ndarray,
    previous: Optional[np.ndarray] = None,
    blank_index: int = 0,
) -> np.ndarray:
    """The controller's features ``(B, 9 + D)`` (float32) at one exit.

    ``hidden`` are the exit's encoder states ``(B, T, D)``, ``log_probs`` its CTC
    log-probabilities ``(B, T, V)``, ``frames`` the valid frames ``(B,)`` (at least 1),
    ``previous`` the previous exit's log-probabilities ``(B, T', V)`` with ``T' >= T`` (extra
    frames are padding) or its best tokens ``(B, T')``; None at the first exit (which agrees
    with itself). Padded frames never count.
    """
    b, t, v = log_probs.shape
    lp = np.asarray(log_probs, np.float32)
    frames = np.clip(np.asarray(frames).astype(np.int64), 1, t)
    n = frames.astype(np.float32)
    padded = bool((frames < t).any())
    mask = (np.arange(t)[None, :] < frames[:, None]).astype(np.float32) if padded else None

    def mean(x):
        return (x * mask if padded else x).sum(1, dtype=np.float32) / n

    best = lp.argmax(-1)
    best_lp = lp.max(-1)
    best_p = np.exp(best_lp)
    entropy = -(np.exp(lp) * lp).sum(-1) / np.float32(math.log(v))
    if previous is None:
        prev = best
    else:
        previous = np.asarray(previous)
        prev = (previous.argmax(-1) if previous.ndim == 3 else previous)[:, :t]
    voiced = (best != blank_index) | (prev != blank_index)
    if padded:
        voiced &= mask > 0
    agree = (voiced & (best == prev)).sum(1).astype(np.float32)
    count = voiced.sum(1).astype(np.float32)
    frame_agreement = np.where(count > 0, agree / np.maximum(count, 1), np.float32(1))
    tokens, same = np.zeros(b, np.float32), np.zeros(b, np.float32)
    for i in range(b):
        hyp = greedy_tokens(best[i, : frames[i]], blank_index)
        tokens[i] = hyp.size
        same[i] = float(np.array_equal(hyp, greedy_tokens(prev[i, : frames[i]], blank_index)))
    lowest = np.where(mask > 0, best_p, np.float32(1)).min(1) if padded else best_p.min(1)
    stats = np.stack(
        [
            mean(entropy),
            mean(best_p),
            mean(best_lp),
            lowest,
            mean((best == blank_index).astype(np.float32)),
            tokens / n,
            frame_agreement,
            same,
            np.log(n),
        ],
        1,
    ).astype(np.float32)
    assert stats.shape[1] == len(CONTROLLER_STATISTICS)
    states = np.asarray(hidden, np.float32)
    pooled = (states * mask[:, :, None] if padded else states).sum(1, dtype=np.float32) / n[:, None]
    return np.concatenate([stats, pooled.astype(np.float32)], 1)


def estimator_arrays(weights: ControllerWeights) -> List[Dict[str, np.ndarray]]:
    """Per decision exit, the estimator in float64 with the standardisation folded into its first
    layer (``A (x - mean) / scale + c`` is ``(A / scale) x + (c - (A / scale) mean)``): what
    :func:`controller_probability` computes with, built once per policy, not at every decision."""
    out = []
    for est in weights.exits:
        mean = np.asarray(est["mean"], np.float64)
        scale = np.asarray(est["scale"], np.float64)
        if weights.hidden_units:
            w1 = np.asarray(est["w1"], np.float64) / scale
            out.append(
                {
                    "w1": np.ascontiguousarray(w1.T),
                    "b1": np.asarray(est["b1"], np.float64) - w1 @ mean,
                    "weight": np.asarray(est["weight"], np.float64),
                    "bias": float(est["bias"]),
                }
            )
        else:
            w = np.asarray(est["weight"], np.float64) / scale
            out.append({"weight": w, "bias": float(est["bias"]) - float(w @ mean)})
    return out


def controller_probability(
    weights: ControllerWeights,
    exit_index: int,
    features: np.ndarray,
    arrays: Optional[List[Dict[str, np.ndarray]]] = None,
) -> np.ndarray:
    """``P(no extra word error if stopping here)`` ``(B,)`` (float32, float64 inside) at
    ``exit_index`` (0-based, not the last); ``arrays``: :func:`estimator_arrays` of ``weights``
    when the caller keeps them."""
    est = (arrays or estimator_arrays(weights))[exit_index]
    h = np.asarray(features, np.float64)
    if weights.hidden_units:
        h = np.tanh(h @ est["w1"] + est["b1"])
    logit = h @ est["weight"] + est["bias"]
    return np.exp(-np.logaddexp(0.0, -logit)).astype(np.float32)  # sigmoid without overflow
