"""The exit-policy settings stored with an exported model, as one type: :class:`PolicyBundle`.

The policy evaluation writes it (``exit_policies.ckpt`` of an inference folder; ``policies.json``
of an ONNX folder) and both ``EarlyExitASR`` and the ONNX runtime read it through this class, so
its fields, defaults and checks are defined here only. Pure Python: the ONNX runtime imports it
without PyTorch.
"""

import dataclasses
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

#: The policies a bundle can hold a calibrated threshold for.
THRESHOLD_POLICIES = ("entropy", "posterior", "posterior_greedy", "budget", "learned")

#: The learned exit controller's per-utterance statistics of one exit, in this order, followed
#: (for a controller that reads them, ``reads_states``) by the exit's hidden states averaged over
#: the valid frames (``hidden_size`` values). Their
#: definitions: :func:`earlyexit_brain.controller.exit_features` (PyTorch) and
#: ``earlyexit_brain.runtime.policies`` (numpy), which a test holds equal.
CONTROLLER_STATISTICS = (
    "entropy",
    "max_prob",
    "log_max_prob",
    "min_max_prob",
    "blank_rate",
    "token_rate",
    "frame_agreement",
    "same_hypothesis",
    "log_frames",
)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _vector(value, size: int) -> bool:
    return isinstance(value, list) and len(value) == size and all(_number(v) and math.isfinite(v) for v in value)


@dataclasses.dataclass(frozen=True)
class ControllerWeights:
    """The learned exit controller's parameters (:mod:`earlyexit_brain.controller`), stored as JSON.

    For each exit but the last, a logistic model over the exit's standardised features
    (:data:`CONTROLLER_STATISTICS`, then, with ``reads_states``, the mean hidden state), with an
    optional hidden layer: ``p = sigmoid(w . h + b)``, ``h = tanh(W1 z + b1)`` (or ``h = z`` when
    ``hidden_units`` is 0), ``z = (x - mean) / scale``. ``p`` is the estimated probability that
    stopping at the exit is safe: by the target it was trained on (``training["target"]``), that
    the exit's hypothesis equals the last exit's (``agreement``) or that it has no more word
    errors than the last exit's (``errors``).

    Arguments
    ---------
    num_exits : int
        Exits of the model it was trained for (it decides at the first ``num_exits - 1``).
    hidden_size : int
        Size of the model's encoder states (checked against the model also when it does not
        read them).
    hidden_units : int
        Units of the hidden layer (0: logistic regression on the features).
    blank_index : int
        The CTC blank's id (the blank-rate and token-rate statistics).
    exits : list of dict
        Per decision exit: ``mean``, ``scale`` (features), ``weight``, ``bias`` and, with a hidden
        layer, ``w1`` (``hidden_units`` rows of features) and ``b1``.
    statistics : list of str
        The statistics' names (must be :data:`CONTROLLER_STATISTICS`).
    training : dict
        How it was trained (utterances, labels, per-exit held-out AUC...), for the reports.
    reads_states : bool
        Whether its features include the exit's mean hidden state (controllers stored before
        this field read them).
    """

    num_exits: int
    hidden_size: int
    hidden_units: int
    blank_index: int
    exits: List[Dict[str, Any]]
    statistics: List[str] = dataclasses.field(default_factory=lambda: list(CONTROLLER_STATISTICS))
    training: Dict[str, Any] = dataclasses.field(default_factory=dict)
    reads_states: bool = True

    @property
    def num_features(self) -> int:
        return len(CONTROLLER_STATISTICS) + (self.hidden_size if self.reads_states else 0)

    def __post_init__(self):
        for key in ("num_exits", "hidden_size", "hidden_units", "blank_index"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < (2 if key == "num_exits" else 0):
                raise ValueError(
                    f"controller: {key} must be an integer >= {2 if key == 'num_exits' else 0}, got {value!r}"
                )
        if not isinstance(self.reads_states, bool):
            raise ValueError(f"controller: reads_states must be true or false, got {self.reads_states!r}")
        if list(self.statistics) != list(CONTROLLER_STATISTICS):
            raise ValueError(
                f"controller: statistics {list(self.statistics)} are not this version's {list(CONTROLLER_STATISTICS)}"
            )
        if not isinstance(self.exits, list) or len(self.exits) != self.num_exits - 1:
            raise ValueError(
                f"controller: expected {self.num_exits - 1} exit estimators (one per exit but the last), "
                f"got {len(self.exits) if isinstance(self.exits, list) else self.exits!r}"
            )
        f, h = self.num_features, self.hidden_units
        for k, est in enumerate(self.exits):
            where = f"controller: exit {k + 1}"
            if not isinstance(est, Mapping):
                raise ValueError(f"{where}: expected a mapping, got {type(est).__name__}")
            shapes = {"mean": f, "scale": f, "weight": h or f}
            if h:
                shapes["b1"] = h
            for key, size in shapes.items():
                if not _vector(est.get(key), size):
                    raise ValueError(f"{where}: '{key}' must be a list of {size} finite numbers")
            if any(v <= 0 for v in est["scale"]):
                raise ValueError(f"{where}: 'scale' must be positive")
            if not (_number(est.get("bias")) and math.isfinite(est["bias"])):
                raise ValueError(f"{where}: 'bias' must be a finite number")
            if h and not (
                isinstance(est.get("w1"), list) and len(est["w1"]) == h and all(_vector(r, f) for r in est["w1"])
            ):
                raise ValueError(f"{where}: 'w1' must be {h} rows of {f} finite numbers")

    def check_model(self, num_exits: int, hidden_size: int, source: str) -> None:
        """A ValueError naming ``source`` unless the controller was trained for a model with these
        exits and encoder-state size."""
        if self.num_exits != num_exits or self.hidden_size != hidden_size:
            raise ValueError(
                f"{source}: its learned exit controller was trained for {self.num_exits} exits and "
                f"{self.hidden_size}-dimensional encoder states, but the model has {num_exits} exits and "
                f"{hidden_size}-dimensional states"
            )

    @classmethod
    def from_json(cls, data: Mapping, source: str = "controller") -> "ControllerWeights":
        """The weights of a stored JSON document; a ValueError names ``source`` and the key at fault."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: controller: expected a mapping, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data
        )
        if unknown or missing:
            raise ValueError(f"{source}: controller: unknown key(s) {unknown}, missing key(s) {missing}")
        try:
            return cls(**data)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def logistic(x: float) -> float:
    """``1 / (1 + exp(-x))`` without overflow."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def controller_probabilities(weights: ControllerWeights, exit_index: int, features: Sequence[Sequence[float]]):
    """Pure-Python reference of the controller's output at ``exit_index`` for rows of features
    (the PyTorch and numpy forms are tested against it)."""
    est = weights.exits[exit_index]
    out = []
    for row in features:
        z = [(x - m) / s for x, m, s in zip(row, est["mean"], est["scale"])]
        if weights.hidden_units:
            z = [math.tanh(sum(w * v for w, v in zip(ws, z)) + b) for ws, b in zip(est["w1"], est["b1"])]
        out.append(logistic(sum(w * v for w, v in zip(est["weight"], z)) + est["bias"]))
    return out


@dataclasses.dataclass(frozen=True)
class PolicyBundle:
    """The calibrated exit policies of one model.

    Arguments
    ---------
    default : dict, optional
        The policy used when the caller names none: ``{"policy": name, "threshold": t}`` or
        ``{"policy": "fixed", "exit": k}``; None: the last exit.
    thresholds : dict
        ``{policy: threshold}`` calibrated on dev.
    options : dict
        ``{policy: {option: value}}``: ``entropy`` ``normalize``, ``posterior_greedy`` ``form``,
        ``posterior`` the N-best search's ``beam_size`` and ``token_prune_min_logp``.
    calibration : dict
        How the thresholds were calibrated (target, value, per-policy dev figures), as in report.json.
    decoding : dict
        The decoder the WERs were measured with: ``{"decoder": "ctc_greedy"}``, or ``ctc_beam``
        with ``beam_size``, ``lm`` (whether the folder has the n-gram), ``alpha`` and ``beta``.
    controller : ControllerWeights, optional
        The learned exit controller (the ``learned`` policy); None when the model has none.
    """

    default: Optional[Dict[str, Any]] = None
    thresholds: Dict[str, float] = dataclasses.field(default_factory=dict)
    options: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    calibration: Dict[str, Any] = dataclasses.field(default_factory=dict)
    decoding: Dict[str, Any] = dataclasses.field(default_factory=lambda: {"decoder": "ctc_greedy"})
    controller: Optional[ControllerWeights] = None

    def __post_init__(self):
        if self.controller is not None and not isinstance(self.controller, ControllerWeights):
            raise ValueError(f"controller: expected ControllerWeights, got {type(self.controller).__name__}")
        if self.default is not None:
            if not isinstance(self.default, Mapping) or not isinstance(self.default.get("policy"), str):
                raise ValueError(f"default: must be a mapping with a 'policy' name, got {self.default!r}")
            if self.default["policy"] == "fixed":
                exit_ = self.default.get("exit")
                if not isinstance(exit_, int) or isinstance(exit_, bool) or exit_ < 1:
                    raise ValueError(f"default: the fixed policy needs an exit >= 1, got {self.default!r}")
            elif not _number(self.default.get("threshold")):
                raise ValueError(
                    f"default: the {self.default['policy']} policy needs a numeric threshold, got {self.default!r}"
                )
        if not isinstance(self.thresholds, Mapping):
            raise ValueError(f"thresholds: must be a mapping of policy names to numbers, got {self.thresholds!r}")
        for name, value in self.thresholds.items():
            if name not in THRESHOLD_POLICIES or not _number(value):
                raise ValueError(
                    f"thresholds: {name!r}: {value!r} (policies {', '.join(THRESHOLD_POLICIES)}, numeric thresholds)"
                )
        if not isinstance(self.options, Mapping) or not all(isinstance(v, Mapping) for v in self.options.values()):
            raise ValueError(f"options: must map policy names to option mappings, got {self.options!r}")
        if not isinstance(self.decoding, Mapping) or not isinstance(self.decoding.get("decoder"), str):
            raise ValueError(f"decoding: must be a mapping with a 'decoder' name, got {self.decoding!r}")

    @classmethod
    def from_json(cls, data: Optional[Mapping], source: str = "exit policies") -> "PolicyBundle":
        """The bundle of a stored JSON document (``{}`` or None: no calibrated policy); a document
        that does not fit is a ValueError naming ``source`` and the key."""
        data = dict(data or {})
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; a policy bundle has {sorted(fields)}")
        if data.get("decoding") is None:
            data.pop("decoding", None)  # folders written before the decoder was stored: greedy
        if data.get("controller") is not None:
            data["controller"] = ControllerWeights.from_json(data["controller"], source)
        try:
            return cls(**data)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    def to_json(self) -> Dict[str, Any]:
        """The JSON document (``from_json(to_json())`` gives the bundle back)."""
        data = dataclasses.asdict(self)  # the controller's weights become plain lists too
        if data["controller"] is None:
            del data["controller"]  # a bundle without one reads as it did before the controller existed
        return data

    def threshold(self, policy: str) -> Optional[float]:
        """The calibrated threshold of ``policy`` (None when none is stored)."""
        return self.thresholds.get(policy)

    def policy_options(self, policy: str) -> Dict[str, Any]:
        """The stored options of ``policy`` (empty when none are stored)."""
        return dict(self.options.get(policy, {}))
