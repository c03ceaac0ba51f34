"""Exit policies of the ONNX runtime, in numpy: the same rules as :mod:`earlyexit_brain.policies`.

A policy sees one exit's CTC log-probabilities ``(B, T, V)`` for the utterances still
running and their valid frames ``(B,)``, and says which stop there (``(B,)`` bool).
``fixed`` and ``budget`` choose every utterance's exit before any layer runs
(:meth:`RuntimePolicy.planned_exits`). The scores are those of the PyTorch policies
(docs/exit_policies.md); tests check that the two agree:

* ``entropy``: mean frame entropy of the posterior (divided by ``log V`` when
  ``normalize``), stop when ``<= threshold``;
* ``posterior_greedy``: mean (or geometric mean) over the frames of the best token's
  posterior, stop when ``>= threshold``;
* ``budget``: the deepest exit whose latency in the runtime's latency table fits
  ``threshold`` ms (the first exit when none fits);
* ``learned``: the learned exit controller's probability that stopping costs no word error
  (:func:`controller_features`, :func:`controller_probability`, the weights of the policy
  bundle), stop when ``>= threshold``; it also reads the previous exit's log-probabilities
  (:attr:`RuntimePolicy.needs_context`) and, if its controller reads them, the exit's encoder
  states (:attr:`RuntimePolicy.needs_states`).

The N-best ``posterior`` policy needs a CTC beam search, which the runtime does not have.
"""

import math
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..controller_numpy import controller_features, controller_probability, estimator_arrays
from ..policy_bundle import ControllerWeights

#: Policies the runtime runs.
RUNTIME_POLICIES = ("fixed", "entropy", "posterior_greedy", "budget", "learned")


def _mask(frames: np.ndarray, t: int) -> np.ndarray:
    """``(B, t)`` float mask of each utterance's first ``frames`` frames."""
    return (np.arange(t)[None, :] < np.asarray(frames)[:, None]).astype(np.float32)


def entropy_score(log_probs: np.ndarray, frames: np.ndarray, normalize: bool = True) -> np.ndarray:
    """Mean frame entropy ``(B,)`` over the valid frames, divided by ``log V`` when ``normalize``.

    Example
    -------
    >>> lp = np.log(np.full((1, 2, 4), 0.25, dtype=np.float32))
    >>> float(entropy_score(lp, np.array([2]))[0])
    1.0
    """
    mask = _mask(frames, log_probs.shape[1])
    entropy = -(np.exp(log_probs) * log_probs).sum(-1)
    mean = (entropy * mask).sum(1) / mask.sum(1)
    return mean / math.log(log_probs.shape[-1]) if normalize else mean


def greedy_posterior_score(log_probs: np.ndarray, frames: np.ndarray, form: str = "mean") -> np.ndarray:
    """The greedy path's posterior ``(B,)``: mean of ``max_v p_t(v)`` over the valid frames, or
    (``geometric``) ``exp`` of the mean of ``max_v log p_t(v)``."""
    mask = _mask(frames, log_probs.shape[1])
    best = log_probs.max(-1)
    if form == "mean":
        return (np.exp(best) * mask).sum(1) / mask.sum(1)
    return np.exp((best * mask).sum(1) / mask.sum(1))


def check_threshold(name: str, threshold, low: float, high: float) -> float:
    """``threshold`` as a float; a ValueError naming ``threshold`` unless it is in ``[low, high]``."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise ValueError(f"threshold: the {name} policy needs a number in [{low}, {high}], got {threshold!r}")
    if not low <= threshold <= high:
        raise ValueError(f"threshold: {threshold} is outside the {name} policy's valid range [{low}, {high}]")
    return float(threshold)


def check_exit(exit, num_exits: int) -> int:
    """A 1-based exit number; the ValueError names ``exit``."""
    if isinstance(exit, bool) or not isinstance(exit, (int, np.integer)):
        raise ValueError(f"exit: expected an exit number (1-based int), got {exit!r}")
    if not 1 <= exit <= num_exits:
        raise ValueError(f"exit: the model has exits 1..{num_exits}, got {exit}")
    return int(exit)


class RuntimeLatencyTable:
    """Per-exit latency ``intercept_ms[k] + ms_per_second[k] * seconds`` (the JSON of
    :class:`earlyexit_brain.latency.LatencyTable`)."""

    def __init__(self, intercept_ms: Sequence[float], ms_per_second: Sequence[float], **_):
        self.intercept_ms = [float(v) for v in intercept_ms]
        self.ms_per_second = [float(v) for v in ms_per_second]

    def predict_ms(self, exit_index: int, seconds) -> np.ndarray:
        return self.intercept_ms[exit_index] + self.ms_per_second[exit_index] * np.asarray(seconds, np.float64)

    @property
    def num_exits(self) -> int:
        return len(self.intercept_ms)


def fit_latency(points: List[Dict]) -> Dict:
    """Least-squares line per exit through ``[{"seconds": s, "ms": [per exit]}, ...]`` (as
    :func:`earlyexit_brain.latency.fit_latency_table`), as the table's JSON."""
    xs = np.array([p["seconds"] for p in points], dtype=np.float64)
    design = np.stack([np.ones_like(xs), xs], 1)
    intercepts, slopes = [], []
    for k in range(len(points[0]["ms"])):
        ys = np.array([p["ms"][k] for p in points], dtype=np.float64)
        coef = np.linalg.lstsq(design, ys, rcond=None)[0]
        intercepts.append(round(float(coef[0]), 4))
        slopes.append(round(float(coef[1]), 4))
    return {"intercept_ms": intercepts, "ms_per_second": slopes, "points": points}


class RuntimePolicy:
    """``policy(exit_index, log_probs, frames) -> (B,) bool``; ``planned_exits`` for the policies
    that choose every exit before any layer runs (None otherwise). A policy with
    :attr:`needs_context` (``learned``) is also called with ``hidden=`` the exit's encoder states
    ``(B, T, D)`` (None unless it :attr:`needs_states`) and ``previous=`` the previous exit's
    log-probabilities of the same utterances (None at the first exit)."""

    def __init__(
        self,
        name: str,
        threshold: Optional[float] = None,
        exit_index: Optional[int] = None,
        table: Optional[RuntimeLatencyTable] = None,
        controller: Optional[ControllerWeights] = None,
        **options,
    ):
        self.name, self.threshold, self.exit_index, self.table = name, threshold, exit_index, table
        self.controller = controller
        self._arrays = estimator_arrays(controller) if controller is not None else None
        self.options = options

    @property
    def needs_context(self) -> bool:
        """Whether the policy also reads the exit's encoder states and the previous exit."""
        return self.name == "learned"

    @property
    def needs_states(self) -> bool:
        """Whether the policy reads the exit's encoder states (a learned controller that reads them)."""
        return self.needs_context and self.controller.reads_states

    def planned_exits(self, durations: np.ndarray, num_exits: int) -> Optional[np.ndarray]:
        if self.name == "fixed":
            return np.full(len(durations), min(self.exit_index, num_exits - 1), dtype=np.int64)
        if self.name == "budget":
            chosen = np.zeros(len(durations), dtype=np.int64)
            for k in range(1, self.table.num_exits):
                chosen[self.table.predict_ms(k, durations) <= self.threshold] = k
            return np.minimum(chosen, num_exits - 1)
        return None

    def score(
        self,
        exit_index: int,
        log_probs: np.ndarray,
        frames: np.ndarray,
        hidden: Optional[np.ndarray] = None,
        previous: Optional[np.ndarray] = None,
    ) -> np.ndarray:
        """The learned controller's probabilities ``(B,)`` at ``exit_index`` (0-based, not the last)."""
        if hidden is None and self.controller.reads_states:
            raise ValueError("this learned controller reads the exit's encoder states (hidden=)")
        if not 0 <= exit_index < len(self.controller.exits):
            raise ValueError(
                f"the learned controller decides at exits 1..{len(self.controller.exits)}, not {exit_index + 1}"
            )
        feats = controller_features(
            hidden, log_probs, frames, previous, self.controller.blank_index, states=self.controller.reads_states
        )
        return controller_probability(self.controller, exit_index, feats, self._arrays)

    def __call__(
        self,
        exit_index: int,
        log_probs: np.ndarray,
        frames: np.ndarray,
        hidden: Optional[np.ndarray] = None,
        previous: Optional[np.ndarray] = None,
    ) -> np.ndarray:
        if self.name == "entropy":
            return entropy_score(log_probs, frames, self.options.get("normalize", True)) <= self.threshold
        if self.name == "learned":
            return self.score(exit_index, log_probs, frames, hidden, previous) >= self.threshold
        return greedy_posterior_score(log_probs, frames, self.options.get("form", "mean")) >= self.threshold

    def describe(self) -> Dict:
        if self.name == "fixed":
            return {"policy": "fixed", "exit": self.exit_index + 1}
        return {"policy": self.name, "threshold": self.threshold, **self.options}


def make_runtime_policy(
    name: str,
    threshold: Optional[float] = None,
    exit: Optional[int] = None,
    num_exits: int = 1,
    table: Optional[RuntimeLatencyTable] = None,
    vocab_size: Optional[int] = None,
    controller: Optional[ControllerWeights] = None,
    **options,
) -> RuntimePolicy:
    """Build a runtime policy by name (``exit`` 1-based, ``threshold`` in ms for ``budget``,
    ``controller`` the weights of the ``learned`` policy); errors name the argument at fault."""
    if name == "posterior":
        raise ValueError(
            "policy: the N-best 'posterior' policy needs a CTC beam search, which the ONNX "
            "runtime does not have; use 'posterior_greedy', 'entropy', 'budget' or an exit"
        )
    if name not in RUNTIME_POLICIES:
        raise ValueError(f"policy: unknown policy {name!r}; the runtime accepts: {', '.join(RUNTIME_POLICIES)}")
    if name == "fixed":
        if exit is None:
            raise ValueError("exit: the fixed policy needs an exit number")
        return RuntimePolicy(name, exit_index=check_exit(exit, num_exits) - 1)
    if name == "learned" and controller is None:
        raise ValueError(
            "policy: the learned policy needs a learned exit controller, and this model has none "
            "(its policies.json holds no 'controller'; train one with the recipe's exit_controller: True, "
            "see docs/exit_policies.md)"
        )
    if threshold is None:
        raise ValueError(f"threshold: the {name} policy needs a threshold")
    if name == "budget":
        if table is None:
            raise ValueError("the budget policy needs a latency table (latency_table.json in the onnx folder)")
        return RuntimePolicy(name, check_threshold(name, threshold, 1e-9, float("inf")), table=table)
    if name == "learned":
        if not isinstance(controller, ControllerWeights):
            raise ValueError(f"controller: the learned policy needs ControllerWeights, got {type(controller).__name__}")
        if controller.num_exits != num_exits:
            raise ValueError(
                f"controller: the learned exit controller was trained for {controller.num_exits} exits, "
                f"the model has {num_exits}"
            )
        if options:
            raise ValueError(f"options: unknown learned option(s) {sorted(options)}")
        return RuntimePolicy(name, check_threshold(name, threshold, 0.0, 1.0), controller=controller)
    if name == "entropy":
        unknown = set(options) - {"normalize"}
        normalize = bool(options.get("normalize", True))
        high = 1.0 if normalize else (math.log(vocab_size) if vocab_size else float("inf"))
        if unknown:
            raise ValueError(f"options: unknown entropy option(s) {sorted(unknown)}")
        return RuntimePolicy(name, check_threshold(name, threshold, 0.0, high), normalize=normalize)
    form = options.get("form", "mean")
    if form not in ("mean", "geometric") or set(options) - {"form"}:
        raise ValueError(f"form: accepted values are 'mean' and 'geometric', got {form!r}")
    return RuntimePolicy(name, check_threshold(name, threshold, 0.0, 1.0), form=form)
