"""The learned exit controller's features and estimator in numpy: the one definition that
PyTorch (:mod:`earlyexit_brain.controller`) and the ONNX runtime (:mod:`earlyexit_brain.runtime`)
both compute with.

At exit ``k`` the controller reads 9 numbers per utterance, ``9 + D`` for a controller that also
reads the states (:func:`controller_features`):
statistics of the exit's CTC posteriors over the valid frames (:data:`CONTROLLER_STATISTICS`:
mean entropy divided by ``log V``, mean and geometric mean of the best token's posterior, its
minimum, the share of blank frames, greedy tokens per frame), its agreement with the previous
exit (the share of frames with the same best token among those where either is not blank; whether
the two greedy hypotheses are the same token sequence), ``log`` of the number of frames, and
(``ControllerWeights.reads_states``) the exit's encoder states averaged over the valid frames.
numpy rather than PyTorch: at batch 1 the features are some thirty operations on small arrays,
where numpy's per-operation overhead is a fraction of PyTorch's.
"""

import math
from typing import Dict, List, Optional

import numpy as np

from .policy_bundle import CONTROLLER_STATISTICS, ControllerWeights


def _hypothesis_keep(best: np.ndarray, blank_index: int) -> np.ndarray:
    """``(B, T)`` bool: the frames whose best token starts a new token of the greedy hypothesis
    (not blank, not a repeat of the frame before)."""
    keep = best != blank_index
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]
    return keep


def greedy_tokens(best: np.ndarray, blank_index: int) -> np.ndarray:
    """The greedy CTC hypothesis (repeats merged, blanks dropped) of one utterance's best tokens."""
    return best[_hypothesis_keep(best[None], blank_index)[0]]


def controller_features(
    hidden: np.ndarray,
    log_probs: np.ndarray,
    frames: np.ndarray,
    previous: Optional[np.ndarray] = None,
    blank_index: int = 0,
    states: bool = True,
) -> np.ndarray:
    """The controller's features ``(B, 9 + D)`` (float32) at one exit; ``(B, 9)`` without
    ``states`` (the statistics alone, for a controller that does not read the states).

    ``hidden`` are the exit's encoder states ``(B, T, D)``, ``log_probs`` its CTC
    log-probabilities ``(B, T, V)``, ``frames`` the valid frames ``(B,)`` (at least 1),
    ``previous`` the previous exit's log-probabilities ``(B, T', V)`` with ``T' >= T`` (extra
    frames are padding) or its best tokens ``(B, T')``; None at the first exit (which agrees
    with itself). Padded frames never count.

    ``hidden`` may be None without ``states``.

    The decision runs at every exit at batch 1, where each numpy call's overhead, not its
    arithmetic, is the cost: one unpadded utterance takes a path of its own with four numpy calls
    and Python over its best tokens (:func:`_one_utterance`); in a batch, the per-frame values
    that are averaged are written into one array and averaged by one matrix product with the
    frame weights (``1 / frames`` on the valid frames, 0 on padding), and so are the encoder
    states.
    """
    b, t, v = log_probs.shape
    lp = np.asarray(log_probs, np.float32)
    if b == 1 and int(np.asarray(frames).reshape(-1)[0]) >= t:  # one unpadded utterance: a dynamic run's decision
        return _one_utterance(
            lp[0], None if previous is None else np.asarray(previous)[0], blank_index, hidden[0] if states else None
        )
    frames = np.minimum(np.maximum(np.asarray(frames, np.int64), 1), t)  # np.clip: 5x the call time
    n = frames.astype(np.float32)
    valid = np.arange(t)[None, :] < frames[:, None] if int(frames.min()) < t else None
    weights = np.full((b, t), 1.0 / t, np.float32) if valid is None else valid / n[:, None].astype(np.float32)

    best = lp.argmax(-1)
    per_frame = np.empty((b, 6, t), np.float32)  # the statistics averaged over the frames, in column order
    np.einsum("btv,btv->bt", np.exp(lp), lp, out=per_frame[:, 0])  # -entropy (scaled below)
    per_frame[:, 2] = lp.reshape(b * t, v)[np.arange(b * t), best.ravel()].reshape(b, t)  # log of the best
    np.exp(per_frame[:, 2], out=per_frame[:, 1])
    np.equal(best, blank_index, out=per_frame[:, 4], casting="unsafe")
    keep = _hypothesis_keep(best, blank_index)
    per_frame[:, 5] = keep
    per_frame[:, 3] = per_frame[:, 1] if valid is None else np.where(valid, per_frame[:, 1], np.float32(1))
    out = np.empty((b, len(CONTROLLER_STATISTICS) + (hidden.shape[2] if states else 0)), np.float32)
    out[:, :6] = np.matmul(per_frame, weights[:, :, None])[:, :, 0]
    out[:, 0] *= np.float32(-1.0 / math.log(v))
    out[:, 3] = per_frame[:, 3].min(1)  # the lowest best-token posterior, not its mean

    if previous is None:
        out[:, 6:8] = 1  # the first exit agrees with itself
    else:
        previous = np.asarray(previous)
        prev = (previous.argmax(-1) if previous.ndim == 3 else previous)[:, :t]
        voiced = (best != blank_index) | (prev != blank_index)
        if valid is not None:
            voiced &= valid
        count = voiced.sum(1)
        out[:, 6] = (voiced & (best == prev)).sum(1) / np.maximum(count, 1)
        out[count == 0, 6] = 1  # nothing voiced in either: they agree
        prev_keep = _hypothesis_keep(prev, blank_index)
        if valid is not None:  # the hypotheses of the valid frames
            keep &= valid
            prev_keep &= valid
        out[:, 7] = [np.array_equal(best[i][keep[i]], prev[i][prev_keep[i]]) for i in range(b)]
    out[:, 8] = np.log(n)
    if states:
        out[:, 9:] = np.matmul(weights[:, None, :], np.asarray(hidden, np.float32))[:, 0]
    return out


def _one_utterance(lp: np.ndarray, previous: Optional[np.ndarray], blank_index: int, hidden: Optional[np.ndarray]):
    """:func:`controller_features` of one unpadded utterance (``lp`` ``(T, V)``, ``previous``
    ``(T', V)`` or ``(T',)``, ``hidden`` ``(T, D)`` or None): the same values from four numpy
    calls on the ``(T, V)`` array (entropy, best token and its log-probability) and Python over
    the ``T`` best tokens. A decision comes right after the encoder, when each distinct numpy
    call runs with cold caches (10-40 microseconds each, against 1-3 warm); the interpreter's
    loop over some tens of frames stays warm."""
    t, v = lp.shape
    best = lp.argmax(1).tolist()
    log_best = lp.max(1).tolist()
    entropy = float(np.vdot(np.exp(lp), lp)) / (-t * math.log(v))
    best_p = [math.exp(x) for x in log_best]
    tokens, blanks = _python_hypothesis(best, blank_index)
    row = [entropy, sum(best_p) / t, sum(log_best) / t, min(best_p), blanks / t, len(tokens) / t]
    if previous is None:
        row += [1.0, 1.0]  # the first exit agrees with itself
    else:
        prev = (previous.argmax(1) if previous.ndim == 2 else previous)[:t].tolist()
        either = same = 0
        for b, p in zip(best, prev):
            if b != blank_index or p != blank_index:
                either += 1
                same += b == p
        row.append(same / either if either else 1.0)
        row.append(float(tokens == _python_hypothesis(prev, blank_index)[0]))
    row.append(math.log(t))
    if hidden is None:
        return np.array([row], np.float32)
    return np.concatenate([np.array(row, np.float32), np.asarray(hidden, np.float32).mean(0)])[None]


def _python_hypothesis(best: List[int], blank_index: int):
    """``(tokens, blank frames)`` of one utterance's best tokens as Python ints: the
    greedy CTC hypothesis (repeats merged, blanks dropped), as :func:`greedy_tokens`."""
    tokens, blanks, last = [], 0, -1
    for b in best:
        if b == blank_index:
            blanks += 1
        elif b != last:
            tokens.append(b)
        last = b
    return tokens, blanks


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
    """The controller's probability that stopping is safe ``(B,)`` (float32, float64 inside) at
    ``exit_index`` (0-based, not the last), from :func:`controller_features` (with or without
    the states: a controller that does not read them uses the statistics, the first columns);
    ``arrays``: :func:`estimator_arrays` of ``weights`` when the caller keeps them."""
    est = (arrays or estimator_arrays(weights))[exit_index]
    if not weights.hidden_units and len(features) == 1:  # one decision: the logistic in Python scalars
        logit = float(np.dot(est["weight"], features[0, : len(est["weight"])])) + est["bias"]
        return np.array([0.5 + 0.5 * math.tanh(0.5 * logit)], np.float32)
    h = np.asarray(features, np.float64)[:, : weights.num_features]
    if weights.hidden_units:
        h = np.tanh(h @ est["w1"] + est["b1"])
    logit = h @ est["weight"] + est["bias"]
    return (0.5 + 0.5 * np.tanh(0.5 * logit)).astype(np.float32)  # the sigmoid, without overflow
