"""The learned exit controller: at each exit, the estimated chance that stopping there is safe.

Published early-exit recognisers stop when a confidence score (entropy, a posterior) passes a
threshold. The learned controller instead *learns* when stopping is safe: at exit ``k`` (every
exit but the last) a small estimator reads only what has already been computed there and
predicts the probability that stopping there is safe: by its training target, that exit ``k``'s
hypothesis equals the last exit's (``agreement``, the recipes' default) or that it has no more
word errors than the last exit's (``errors``). It is trained after the recogniser, with the
recogniser frozen, on held-out utterances (the synthetic corpus's ``controller`` split: see
docs/exit_policies.md), and the ``learned`` policy stops at the first exit where that
probability reaches a threshold calibrated on dev like the other policies'.

What it reads at exit ``k`` (:func:`exit_features`, 9 values per utterance, ``9 + D`` with the
encoder states):

* statistics of the exit's CTC posteriors over the valid frames: mean entropy (divided by
  ``log V``), mean and geometric mean of the best token's posterior, its minimum, the share of
  blank frames, the greedy tokens per frame;
* agreement with the previous exit (the first exit compares with itself, giving 1): the share of
  frames with the same best token among the frames where either is not blank, and whether the
  two greedy hypotheses are the same token sequence;
* ``log`` of the number of frames (the utterance length);
* with ``reads_states``, the exit's encoder states averaged over the valid frames (``D``
  values; off by default: fitted on held-out utterances unlike the test sets', they rank worse,
  docs/exit_policies.md).

The estimator (:class:`~earlyexit_brain.policy_bundle.ControllerWeights`) is one logistic
regression per exit on the standardised features, or with ``hidden_units`` > 0 one ``tanh``
hidden layer; it is a few kilobytes, stored as JSON in the model's policy bundle (no pickle).
The features and the estimator's output are computed by :mod:`earlyexit_brain.controller_numpy`
(numpy: the ONNX runtime uses the same functions); this module fits the estimator in PyTorch.
"""

import logging
import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .controller_numpy import controller_features
from .controller_numpy import controller_probability as numpy_probability
from .policy_bundle import CONTROLLER_STATISTICS, ControllerWeights

logger = logging.getLogger(__name__)


def _host(x: torch.Tensor) -> np.ndarray:
    """``x``'s values as a numpy array (a CPU tensor's memory shared). A CPU tensor that needs no
    gradient takes one binding call: a decision comes right after the encoder, when every
    PyTorch call it makes runs with cold caches (tens of microseconds each)."""
    try:
        return x.numpy()  # numpy's float16 and ints as they are; controller_features casts
    except (RuntimeError, TypeError):  # requires grad, not on the CPU, or a dtype numpy lacks
        pass
    x = x.detach()
    if x.is_floating_point() and x.dtype != torch.float32:
        x = x.float()
    return (x if x.device.type == "cpu" else x.cpu()).numpy()  # shares a CPU tensor's memory


def host_frames(log_probs: torch.Tensor, lengths: Optional[torch.Tensor]) -> np.ndarray:
    """:func:`earlyexit_brain.utils.valid_frames` in numpy (``round(length * T)``, halves to even
    as ``torch.round``; :func:`~earlyexit_brain.controller_numpy.controller_features` clamps to
    ``[1, T]``): a decision at batch 1 costs a fraction of the PyTorch operations' time."""
    b, t = log_probs.shape[:2]
    if lengths is None or all(v == 1.0 for v in lengths.tolist()):  # unpadded: no array arithmetic
        return np.full(b, t, np.int64)
    return np.rint(_host(lengths) * np.float32(t)).astype(np.int64)


def exit_probability(
    weights: ControllerWeights,
    exit_index: int,
    hidden: torch.Tensor,
    log_probs: torch.Tensor,
    lengths: Optional[torch.Tensor],
    previous: Optional[torch.Tensor] = None,
    arrays: Optional[List[Dict[str, np.ndarray]]] = None,
) -> torch.Tensor:
    """The learned policy's score at ``exit_index``: :func:`exit_features` then
    :func:`controller_probability` (``(B,)`` float32 on the CPU), from SpeechBrain relative
    ``lengths``, computed on the tensors' numpy views without a round trip through PyTorch."""
    feats = controller_features(
        _host(hidden) if weights.reads_states else None,
        _host(log_probs),
        host_frames(log_probs, lengths),
        None if previous is None else _host(previous),
        weights.blank_index,
        states=weights.reads_states,
    )
    return torch.from_numpy(numpy_probability(weights, exit_index, feats, arrays))


def agreement_labels(hyps: Sequence[Sequence[str]]) -> torch.Tensor:
    """Training targets ``(U, K - 1)`` of the ``agreement`` target: 1 where an utterance's exit
    ``k`` gives the same hypothesis text as its last exit (``hyps[u][k]``, as the evaluation
    records them). Needs no reference text."""
    return torch.tensor([[float(h[k] == h[-1]) for k in range(len(h) - 1)] for h in hyps], dtype=torch.float32)


def exit_features(
    hidden: torch.Tensor,
    log_probs: torch.Tensor,
    frames: torch.Tensor,
    previous: Optional[torch.Tensor] = None,
    blank_index: int = 0,
) -> torch.Tensor:
    """The controller's features ``(B, F)`` (float32, on ``log_probs``' device) at one exit:
    :func:`earlyexit_brain.controller_numpy.controller_features` on the tensors' values (the
    module docstring lists the features).

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
    feats = controller_features(
        _host(hidden),
        _host(log_probs),
        _host(torch.as_tensor(frames)),
        None if previous is None else _host(previous),
        blank_index,
    )
    return torch.from_numpy(feats).to(log_probs.device)


def controller_probability(
    weights: ControllerWeights,
    exit_index: int,
    features: torch.Tensor,
    arrays: Optional[List[Dict[str, np.ndarray]]] = None,
) -> torch.Tensor:
    """``P(no extra word error if stopping here)`` ``(B,)`` (float32, on the CPU) at ``exit_index``
    (0-based, not the last): :func:`earlyexit_brain.controller_numpy.controller_probability`;
    ``arrays``: :func:`~earlyexit_brain.controller_numpy.estimator_arrays` of ``weights`` when the
    caller keeps them."""
    return torch.from_numpy(numpy_probability(weights, exit_index, _host(features), arrays))


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


def controller_labels(target: str, errors: torch.Tensor, hyps: Sequence[Sequence[str]]) -> torch.Tensor:
    """The controller's training targets ``(U, K - 1)`` for ``target``: ``errors``
    (:func:`stop_labels`) or ``agreement`` (:func:`agreement_labels`)."""
    if target == "errors":
        return stop_labels(errors)
    if target == "agreement":
        return agreement_labels(hyps)
    raise ValueError(f"controller_target: accepted values are 'agreement' and 'errors', got {target!r}")


def fit_controller(
    features: Sequence[torch.Tensor],
    labels: torch.Tensor,
    blank_index: int,
    hidden_units: int = 0,
    weight_decay: float = 1e-2,
    steps: int = 300,
    seed: int = 0,
    reads_states: bool = True,
    target: str = "errors",
) -> ControllerWeights:
    """Fit one estimator per exit but the last on held-out utterances.

    Arguments
    ---------
    features : list of torch.Tensor
        Per exit, ``(U, 9 + D)`` features of :func:`exit_features` (the last exit's are not used).
    labels : torch.Tensor
        ``(U, K - 1)`` 0/1 targets: where stopping at each exit is safe (:func:`controller_labels`).
    blank_index : int
        Stored with the weights (the features need it).
    hidden_units : int
        0: logistic regression; else one ``tanh`` layer of this many units.
    weight_decay : float
        L2 penalty on the weights (not the biases), on standardised features.
    steps : int
        Full-batch L-BFGS iterations per exit.
    reads_states : bool
        Whether the estimators read the mean encoder states (else the 9 statistics alone).
    target : str
        The name of what ``labels`` hold, recorded with the weights (``agreement`` or ``errors``).
    """
    num_exits = labels.shape[1] + 1
    columns = features[0].shape[1] if reads_states else len(CONTROLLER_STATISTICS)
    gen = torch.Generator().manual_seed(seed)
    exits, report = [], []
    for k in range(num_exits - 1):
        x = features[k][:, :columns].double()
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
                "target_rate": round(float(y.mean()), 4),
                "train_auc": _rounded(auc(train_p, y)),
            }
        )
    training = {
        "target": target,
        "hidden_units": int(hidden_units),
        "weight_decay": float(weight_decay),
        "exits": report,
    }
    return ControllerWeights(
        num_exits=num_exits,
        hidden_size=features[0].shape[1] - len(CONTROLLER_STATISTICS),
        hidden_units=int(hidden_units),
        blank_index=int(blank_index),
        exits=exits,
        training=training,
        reads_states=bool(reads_states),
    )


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
