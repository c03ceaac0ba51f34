"""The learned exit controller: at each exit, the estimated chance that stopping costs no word error.

Published early-exit recognisers stop when a confidence score (entropy, a posterior) passes a
threshold. The learned controller instead *learns* when stopping is safe: at exit ``k`` (every
exit but the last) a small estimator reads only what has already been computed there and
predicts ``P(errors at exit k <= errors at the last exit)``, the probability that stopping
costs no word error against going on to the end. It is trained after the recogniser, with the
recogniser frozen, on held-out utterances (the synthetic corpus's ``controller`` split: see
docs/exit_policies.md), and the ``learned`` policy stops at the first exit where that
probability reaches a threshold calibrated on dev like the other policies'.

What it reads at exit ``k`` (:func:`exit_features`, ``F = 9 + D`` values per utterance):

* statistics of the exit's CTC posteriors over the valid frames: mean entropy (divided by
  ``log V``), mean and geometric mean of the best token's posterior, its minimum, the share of
  blank frames, the greedy tokens per frame;
* agreement with the previous exit (the first exit compares with itself, giving 1): the share of
  frames with the same best token among the frames where either is not blank, and whether the
  two greedy hypotheses are the same token sequence;
* ``log`` of the number of frames (the utterance length);
* the exit's encoder states averaged over the valid frames (``D`` values).

The estimator (:class:`~earlyexit_brain.policy_bundle.ControllerWeights`) is one logistic
regression per exit on the standardised features, or with ``hidden_units`` > 0 one ``tanh``
hidden layer; it is a few kilobytes, stored as JSON in the model's policy bundle (no pickle).
"""

import logging
import math
from typing import Dict, List, Optional, Sequence

import torch

from .policy_bundle import CONTROLLER_STATISTICS, ControllerWeights

logger = logging.getLogger(__name__)


def _greedy(tokens: torch.Tensor, blank_index: int) -> List[int]:
    """The greedy CTC hypothesis (repeats merged, blanks dropped) of one utterance's best tokens."""
    merged = torch.unique_consecutive(tokens)
    return merged[merged != blank_index].tolist()


def exit_features(
    hidden: torch.Tensor,
    log_probs: torch.Tensor,
    frames: torch.Tensor,
    previous: Optional[torch.Tensor] = None,
    blank_index: int = 0,
) -> torch.Tensor:
    """The controller's features ``(B, F)`` at one exit (float32; the module docstring lists them).

    Arguments
    ---------
    hidden : torch.Tensor
        The exit's encoder states ``(B, T, D)``.
    log_probs : torch.Tensor
        The exit's CTC log-probabilities ``(B, T, V)``.
    frames : torch.Tensor
        Valid frames per utterance ``(B,)`` (at least 1).
    previous : torch.Tensor, optional
        The previous exit's log-probabilities ``(B, T', V)`` with ``T' >= T`` (extra frames are
        padding) or its best tokens ``(B, T')``; None at the first exit.
    blank_index : int
        The CTC blank's id.
    """
    b, t, v = log_probs.shape
    lp = log_probs.float()
    frames = frames.to(lp.device).long().clamp(1, t)
    mask = (torch.arange(t, device=lp.device)[None, :] < frames[:, None]).float()  # (B, T)
    n = frames.float()

    def mean(x):
        return (x * mask).sum(1) / n

    best_lp, best = lp.max(-1)  # (B, T)
    best_p = best_lp.exp()
    entropy = -(lp.exp() * lp).sum(-1) / math.log(v)
    if previous is None:
        prev = best
    else:
        prev = previous.argmax(-1) if previous.dim() == 3 else previous
        prev = prev[:, :t].to(best.device)
    voiced = ((best != blank_index) | (prev != blank_index)).float() * mask
    agree = ((best == prev).float() * voiced).sum(1)
    frame_agreement = torch.where(voiced.sum(1) > 0, agree / voiced.sum(1).clamp(min=1), torch.ones_like(agree))
    same, tokens = [], []
    for i in range(b):
        hyp = _greedy(best[i, : int(frames[i])], blank_index)
        tokens.append(len(hyp))
        same.append(float(hyp == _greedy(prev[i, : int(frames[i])], blank_index)))
    stats = torch.stack(
        [
            mean(entropy),
            mean(best_p),
            mean(best_lp),
            torch.where(mask > 0, best_p, torch.ones_like(best_p)).min(1).values,
            mean((best == blank_index).float()),
            torch.tensor(tokens, dtype=torch.float32, device=lp.device) / n,
            frame_agreement,
            torch.tensor(same, dtype=torch.float32, device=lp.device),
            n.log(),
        ],
        1,
    )
    assert stats.shape[1] == len(CONTROLLER_STATISTICS)
    pooled = (hidden.float() * mask[:, :, None]).sum(1) / n[:, None]
    return torch.cat([stats, pooled], 1)


def controller_probability(weights: ControllerWeights, exit_index: int, features: torch.Tensor) -> torch.Tensor:
    """``P(no extra word error if stopping here)`` ``(B,)`` at ``exit_index`` (0-based, not the last)."""
    est = weights.exits[exit_index]
    x = features.double()
    z = (x - torch.tensor(est["mean"], dtype=torch.float64)) / torch.tensor(est["scale"], dtype=torch.float64)
    if weights.hidden_units:
        z = torch.tanh(
            z @ torch.tensor(est["w1"], dtype=torch.float64).T + torch.tensor(est["b1"], dtype=torch.float64)
        )
    return torch.sigmoid(z @ torch.tensor(est["weight"], dtype=torch.float64) + est["bias"]).float()


def stop_labels(errors: torch.Tensor) -> torch.Tensor:
    """Training targets ``(U, K - 1)``: 1 where an utterance's exit ``k`` has no more word errors
    than its last exit (stopping there costs nothing against going on), from ``errors`` ``(U, K)``."""
    return (errors[:, :-1] <= errors[:, -1:]).float()


def auc(scores: torch.Tensor, labels: torch.Tensor) -> Optional[float]:
    """Area under the ROC curve (the chance that a random positive scores above a random negative,
    ties counting half); None when one class is absent."""
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + 0.5 * ties)


def fit_controller(
    features: Sequence[torch.Tensor],
    errors: torch.Tensor,
    blank_index: int,
    hidden_units: int = 0,
    weight_decay: float = 1e-2,
    steps: int = 300,
    seed: int = 0,
    validation: Optional[Dict] = None,
) -> ControllerWeights:
    """Fit one estimator per exit but the last on held-out utterances.

    Arguments
    ---------
    features : list of torch.Tensor
        Per exit, ``(U, F)`` features of :func:`exit_features` (the last exit's are not used).
    errors : torch.Tensor
        ``(U, K)`` word errors of each utterance's hypothesis at each exit.
    blank_index : int
        Stored with the weights (the features need it).
    hidden_units : int
        0: logistic regression; else one ``tanh`` layer of this many units.
    weight_decay : float
        L2 penalty on the weights (not the biases), on standardised features.
    steps : int
        Full-batch L-BFGS iterations per exit.
    validation : dict, optional
        ``{"features": [...], "errors": ...}`` of other utterances (dev) whose AUC is recorded.
    """
    num_exits = errors.shape[1]
    labels = stop_labels(errors)
    gen = torch.Generator().manual_seed(seed)
    exits, report = [], []
    for k in range(num_exits - 1):
        x = features[k].double()
        y = labels[:, k].double()
        mean = x.mean(0)
        scale = x.std(0, unbiased=False)
        scale = torch.where(scale > 1e-6, scale, torch.ones_like(scale))
        est, train_p = _fit_exit((x - mean) / scale, y, hidden_units, weight_decay, steps, gen)
        exits.append({"mean": mean.tolist(), "scale": scale.tolist(), **est})
        report.append(
            {
                "exit": k + 1,
                "utterances": int(len(y)),
                "stop_is_free": round(float(y.mean()), 4),
                "train_auc": _rounded(auc(train_p, y)),
            }
        )
    weights = ControllerWeights(
        num_exits=num_exits,
        hidden_size=features[0].shape[1] - len(CONTROLLER_STATISTICS),
        hidden_units=int(hidden_units),
        blank_index=int(blank_index),
        exits=exits,
        training={"hidden_units": int(hidden_units), "weight_decay": float(weight_decay), "exits": report},
    )
    if validation is not None:
        vlabels = stop_labels(validation["errors"])
        for k, row in enumerate(report):
            p = controller_probability(weights, k, validation["features"][k])
            row["dev_auc"] = _rounded(auc(p, vlabels[:, k]))
            row["dev_stop_is_free"] = round(float(vlabels[:, k].mean()), 4)
    return weights


def _fit_exit(z: torch.Tensor, y: torch.Tensor, hidden_units: int, weight_decay: float, steps: int, gen):
    """One exit's estimator on standardised features ``z`` ``(U, F)`` and 0/1 targets ``y``:
    its weights (JSON lists) and its probabilities on ``z``."""
    f = z.shape[1]
    if hidden_units:
        w1 = (torch.randn(hidden_units, f, generator=gen, dtype=torch.float64) / math.sqrt(f)).requires_grad_()
        b1 = torch.zeros(hidden_units, dtype=torch.float64, requires_grad=True)
        w = (torch.randn(hidden_units, generator=gen, dtype=torch.float64) / math.sqrt(hidden_units)).requires_grad_()
        params = [w1, b1, w]
    else:
        w1 = b1 = None
        w = torch.zeros(f, dtype=torch.float64, requires_grad=True)
        params = [w]
    prior = float(y.mean().clamp(1e-3, 1 - 1e-3))
    b = torch.tensor(math.log(prior / (1 - prior)), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(params + [b], max_iter=steps, line_search_fn="strong_wolfe")

    def logits():
        h = torch.tanh(z @ w1.T + b1) if hidden_units else z
        return h @ w + b

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(), y)
        loss = loss + weight_decay * sum((p**2).sum() for p in params) / 2
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    est = {"weight": w.detach().tolist(), "bias": float(b.detach())}
    if hidden_units:
        est["w1"] = w1.detach().tolist()
        est["b1"] = b1.detach().tolist()
    with torch.no_grad():
        return est, torch.sigmoid(logits())


def _rounded(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 4)


def parameter_count(weights: ControllerWeights) -> int:
    """Trained numbers of the estimators (standardisation included)."""
    f, h = weights.num_features, weights.hidden_units
    per_exit = 2 * f + (h * f + h + h if h else f) + 1
    return per_exit * len(weights.exits)
