"""Exit-selection policies: per utterance, stop at this exit or go on.

A policy looks at one exit's CTC log-probabilities for a batch and says, per
utterance, whether to stop there::

    stop = policy(exit_index, log_probs, lengths, durations)   # (B,) bool

``exit_index`` is 0-based, ``log_probs`` is ``(B, T, V)``, ``lengths`` are
SpeechBrain relative lengths ``(B,)`` and ``durations`` the audio durations in
seconds ``(B,)`` (only the budget policy needs them). The last exit always
stops. :func:`earlyexit_brain.dynamic.run_dynamic` drives an encoder with a policy.

Policies (formulas in docs/exit_policies.md):

* ``fixed``: always exit ``k``;
* ``entropy``: mean frame entropy of the CTC posterior, stop when ``<= threshold``;
* ``posterior``: the paper's N-best utterance posterior (softmax over the
  N-best scores of a CTC beam search, probability of the best), stop when
  ``>= threshold``;
* ``posterior_greedy``: the cheap greedy form (mean, or geometric mean, over
  frames of the best path's posterior), stop when ``>= threshold``;
* ``budget``: the deepest exit whose measured latency fits a budget in ms;
* ``learned``: the learned exit controller's probability that stopping costs no word error
  (:mod:`earlyexit_brain.controller`), stop when ``>= threshold``; it also reads the exit's
  encoder states and the previous exit's posteriors (``needs_context``);
* ``oracle`` (analysis only): the shallowest exit whose hypothesis equals the
  last exit's, see :func:`oracle_exits`.
"""

import math
from typing import Dict, List, Optional, Sequence

import torch

from .controller import exit_probability
from .controller_numpy import estimator_arrays
from .latency import LatencyTable
from .policy_bundle import ControllerWeights
from .utils import frame_mask

POLICY_NAMES = ("fixed", "entropy", "posterior", "posterior_greedy", "budget", "learned", "oracle")


def check_threshold(name: str, threshold, low: float, high: float):
    """Raise a ValueError naming ``threshold`` unless ``low <= threshold <= high``."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise ValueError(f"threshold: the {name} policy needs a number in [{low}, {high}], got {threshold!r}")
    if not low <= threshold <= high:
        raise ValueError(f"threshold: {threshold} is outside the {name} policy's valid range [{low}, {high}]")
    return float(threshold)


class ExitPolicy:
    """Base class: ``policy(exit_index, log_probs, lengths, durations) -> (B,) bool``."""

    name = "policy"
    #: True for a policy that also reads the exit's encoder states and the previous exit's
    #: log-probabilities: :func:`~earlyexit_brain.dynamic.run_dynamic` then passes them as the
    #: keywords ``hidden`` and ``previous``.
    needs_context = False

    def __call__(
        self,
        exit_index: int,
        log_probs: torch.Tensor,
        lengths: Optional[torch.Tensor],
        durations: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def planned_exits(self, batch: int, durations: Optional[torch.Tensor], num_exits: int) -> Optional[torch.Tensor]:
        """Each utterance's exit ``(B,)`` (0-based) when the policy chooses it before any
        layer runs, without looking at the posteriors; None (the default) when it must
        see each exit's output. :func:`run_dynamic` then computes only the exits that
        some utterance stops at: no norm, head or decision at the others."""
        return None

    def describe(self) -> Dict:
        """JSON-friendly description (name and parameters)."""
        return {"policy": self.name}


class FixedExit(ExitPolicy):
    """Always stop at exit ``exit_index`` (0-based)."""

    name = "fixed"

    def __init__(self, exit_index: int):
        if isinstance(exit_index, bool) or not isinstance(exit_index, int) or exit_index < 0:
            raise ValueError(f"exit: expected a non-negative exit index, got {exit_index!r}")
        self.exit_index = exit_index

    def __call__(self, exit_index, log_probs, lengths, durations=None):
        return torch.full((log_probs.shape[0],), exit_index >= self.exit_index, dtype=torch.bool)

    def planned_exits(self, batch, durations, num_exits):
        return torch.full((batch,), min(self.exit_index, num_exits - 1), dtype=torch.long)

    def describe(self):
        return {"policy": self.name, "exit": self.exit_index + 1}


class ConfidencePolicy(ExitPolicy):
    """A policy that thresholds a per-utterance score computed from one exit.

    Subclasses define :meth:`score` and ``higher_is_confident``; the policy
    stops when ``score >= threshold`` (confidences) or ``score <= threshold``
    (uncertainties such as entropy).
    """

    higher_is_confident = True
    valid_range = (0.0, 1.0)

    def __init__(self, threshold: float):
        self.threshold = check_threshold(self.name, threshold, *self.valid_range)

    def score(self, log_probs: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-utterance score ``(B,)``."""
        raise NotImplementedError

    def stops(self, scores: torch.Tensor, threshold: Optional[float] = None) -> torch.Tensor:
        """Decision for precomputed scores (used by threshold sweeps too)."""
        threshold = self.threshold if threshold is None else threshold
        return scores >= threshold if self.higher_is_confident else scores <= threshold

    def __call__(self, exit_index, log_probs, lengths, durations=None):
        return self.stops(self.score(log_probs, lengths).cpu())

    def describe(self):
        return {"policy": self.name, "threshold": self.threshold}


class EntropyPolicy(ConfidencePolicy):
    """Stop when the mean frame entropy of the CTC posterior is ``<= threshold``.

    ``H = (1/T) sum_t -sum_v p_t(v) log p_t(v)`` over the ``T`` valid frames,
    divided by ``log V`` when ``normalize`` (then in ``[0, 1]``).
    """

    name = "entropy"
    higher_is_confident = False

    def __init__(self, threshold: float, normalize: bool = True, vocab_size: Optional[int] = None):
        self.normalize = normalize
        if not normalize:
            self.valid_range = (0.0, math.log(vocab_size) if vocab_size else float("inf"))
        super().__init__(threshold)

    def score(self, log_probs, lengths):
        mask = frame_mask(log_probs, lengths)
        entropy = -(log_probs.exp() * log_probs).sum(-1)  # (B, T)
        mean = (entropy * mask).sum(1) / mask.sum(1)
        if self.normalize:
            mean = mean / math.log(log_probs.shape[-1])
        return mean

    def describe(self):
        return {**super().describe(), "normalize": self.normalize}


class GreedyPosteriorPolicy(ConfidencePolicy):
    """Stop when the greedy path's posterior is ``>= threshold``.

    ``mean``: ``(1/T) sum_t max_v p_t(v)``; ``geometric``:
    ``exp((1/T) sum_t max_v log p_t(v))``, both over the valid frames.
    """

    name = "posterior_greedy"

    def __init__(self, threshold: float, form: str = "mean"):
        if form not in ("mean", "geometric"):
            raise ValueError(f"form: accepted values are 'mean' and 'geometric', got {form!r}")
        self.form = form
        super().__init__(threshold)

    def score(self, log_probs, lengths):
        mask = frame_mask(log_probs, lengths)
        best = log_probs.max(-1).values  # (B, T) log max posterior
        if self.form == "mean":
            return (best.exp() * mask).sum(1) / mask.sum(1)
        return torch.exp((best * mask).sum(1) / mask.sum(1))

    def describe(self):
        return {**super().describe(), "form": self.form}


class NBestPosteriorPolicy(ConfidencePolicy):
    """The paper's rule: stop when the N-best posterior of the best hypothesis is ``>= threshold``.

    A CTC beam search at the exit gives N hypotheses with log scores
    ``s_1 >= ... >= s_N``; the confidence is ``exp(s_1) / sum_i exp(s_i)``.
    ``searcher`` is a SpeechBrain CTC beam searcher with ``topk = N`` (see
    :func:`make_ctc_beam_searcher`).
    """

    name = "posterior"

    def __init__(self, threshold: float, searcher):
        self.searcher = searcher
        super().__init__(threshold)

    def score(self, log_probs, lengths):
        lengths = torch.ones(log_probs.shape[0]) if lengths is None else lengths
        nbest = self.searcher(log_probs.detach().float().cpu(), lengths.cpu())
        scores = []
        for hyps in nbest:
            s = torch.tensor([float(h.score) for h in hyps], dtype=torch.float64)
            scores.append(float(torch.softmax(s, 0)[0]) if len(s) else 0.0)
        return torch.tensor(scores, dtype=torch.float32)


class LearnedPolicy(ConfidencePolicy):
    """Stop when the learned exit controller's probability that stopping costs no word error
    (against the last exit) is ``>= threshold`` (:mod:`earlyexit_brain.controller`)."""

    name = "learned"
    needs_context = True

    def __init__(self, threshold: float, weights: ControllerWeights):
        if not isinstance(weights, ControllerWeights):
            raise ValueError(f"the learned policy needs ControllerWeights, got {type(weights).__name__}")
        self.weights = weights
        self._arrays = estimator_arrays(weights)
        super().__init__(threshold)

    def score(self, log_probs, lengths, exit_index=None, hidden=None, previous=None):
        """``(B,)`` probabilities at ``exit_index`` from the exit's ``hidden`` states ``(B, T, D)``
        and the previous exit's log-probabilities (None at the first exit)."""
        if exit_index is None or hidden is None:
            raise ValueError("the learned policy needs the exit index and the exit's encoder states")
        if exit_index >= len(self.weights.exits):
            raise ValueError(
                f"the learned controller decides at exits 1..{len(self.weights.exits)}, not {exit_index + 1}"
            )
        return exit_probability(self.weights, exit_index, hidden, log_probs, lengths, previous, self._arrays)

    def __call__(self, exit_index, log_probs, lengths, durations=None, hidden=None, previous=None):
        return self.stops(self.score(log_probs, lengths, exit_index, hidden, previous))


class BudgetPolicy(ExitPolicy):
    """Stop at the deepest exit whose predicted latency fits ``budget_ms``.

    The prediction comes from a :class:`LatencyTable` measured on the device;
    when even the first exit does not fit, the first exit is used.
    """

    name = "budget"

    def __init__(self, budget_ms: float, table: LatencyTable):
        self.budget_ms = check_threshold(self.name, budget_ms, 1e-9, float("inf"))
        self.table = table

    def chosen_exits(self, durations: Optional[torch.Tensor]) -> torch.Tensor:
        """Exit (0-based) chosen for each duration in seconds."""
        if durations is None:
            raise ValueError("the budget policy needs the utterance durations in seconds")
        chosen = torch.zeros(len(durations), dtype=torch.long)
        for k in range(1, self.table.num_exits):
            fits = self.table.predict_ms(k, durations.cpu()) <= self.budget_ms
            chosen[fits] = k
        return chosen

    def __call__(self, exit_index, log_probs, lengths, durations=None):
        return self.chosen_exits(durations) <= exit_index

    def planned_exits(self, batch, durations, num_exits):
        return self.chosen_exits(durations).clamp(max=num_exits - 1)

    def describe(self):
        return {"policy": self.name, "threshold": self.budget_ms}


def oracle_exits(hypotheses: Sequence[Sequence]) -> List[int]:
    """Oracle (analysis only): per utterance, the shallowest exit whose hypothesis equals the last's.

    ``hypotheses[u][k]`` is utterance ``u``'s hypothesis at exit ``k`` (any
    comparable value, e.g. a list of words). Returns 0-based exits.

    Example
    -------
    >>> oracle_exits([["A", "B", "B"], ["A", "A", "A"], ["A", "B", "C"]])
    [1, 0, 2]
    """
    exits = []
    for hyps in hypotheses:
        last = hyps[-1]
        exits.append(next(k for k, h in enumerate(hyps) if h == last))
    return exits


def error_oracle_exits(errors) -> List[int]:
    """Error-aware oracle (analysis only): per utterance, the shallowest exit whose word errors
    are no more than the last exit's (``errors[u][k] <= errors[u][-1]``).

    ``errors[u][k]`` is utterance ``u``'s word edits at exit ``k`` (a ``(U, K)``
    tensor or nested sequences). Unlike :func:`oracle_exits` (agreement with the
    last exit's text), an earlier exit with a different hypothesis but no more
    errors is taken, so its WER is at most the last exit's. Returns 0-based exits.

    Example
    -------
    >>> error_oracle_exits([[2, 1, 1], [0, 0, 0], [3, 2, 1], [1, 4, 2]])
    [1, 0, 2, 0]
    """
    exits = []
    for row in errors:
        row = [float(e) for e in row]
        exits.append(next(k for k, e in enumerate(row) if e <= row[-1]))
    return exits


def make_policy(
    name: str,
    threshold: Optional[float] = None,
    exit: Optional[int] = None,
    num_exits: Optional[int] = None,
    searcher=None,
    latency_table: Optional[LatencyTable] = None,
    controller: Optional[ControllerWeights] = None,
    **options,
) -> ExitPolicy:
    """Build a policy by name.

    ``exit`` is 1-based (as in reports); ``threshold`` is the policy's
    threshold (ms for ``budget``); ``controller`` the weights of the ``learned`` policy.
    Errors name the argument at fault.
    """
    if name not in POLICY_NAMES:
        raise ValueError(f"policy: unknown policy {name!r}; accepted: {', '.join(POLICY_NAMES)}")
    if name == "oracle":
        raise ValueError(
            "policy: 'oracle' needs every exit's hypothesis and the last exit's "
            "result, so it is for analysis (recipes/evaluate.py) only"
        )
    if name == "fixed":
        if exit is None:
            raise ValueError("exit: the fixed policy needs an exit number")
        return FixedExit(check_exit(exit, num_exits) - 1)
    if threshold is None:
        raise ValueError(f"threshold: the {name} policy needs a threshold")
    if name == "entropy":
        return EntropyPolicy(threshold, **options)
    if name == "posterior_greedy":
        return GreedyPosteriorPolicy(threshold, **options)
    if name == "posterior":
        if searcher is None:
            raise ValueError("the posterior policy needs a CTC beam searcher")
        return NBestPosteriorPolicy(threshold, searcher)
    if name == "learned":
        if controller is None:
            raise ValueError(
                "policy: this model has no learned exit controller (train one with the recipe's "
                "exit_controller: True, see docs/exit_policies.md)"
            )
        return LearnedPolicy(threshold, controller)
    if latency_table is None:
        raise ValueError("the budget policy needs a latency table (latency_table.json)")
    return BudgetPolicy(threshold, latency_table)


def check_exit(exit, num_exits: Optional[int]) -> int:
    """Validate a 1-based exit number; the ValueError names ``exit``."""
    if isinstance(exit, bool) or not isinstance(exit, int):
        raise ValueError(f"exit: expected an exit number (1-based int), got {exit!r}")
    if exit < 1 or (num_exits is not None and exit > num_exits):
        raise ValueError(f"exit: the model has exits 1..{num_exits}, got {exit}")
    return exit
