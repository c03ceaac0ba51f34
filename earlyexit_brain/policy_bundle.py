"""The exit-policy settings stored with an exported model, as one type: :class:`PolicyBundle`.

The policy evaluation writes it (``exit_policies.ckpt`` of an inference folder; ``policies.json``
of an ONNX folder) and both ``EarlyExitASR`` and the ONNX runtime read it through this class, so
its fields, defaults and checks are defined here only. Pure Python: the ONNX runtime imports it
without PyTorch.
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional

#: The policies a bundle can hold a calibrated threshold for.
THRESHOLD_POLICIES = ("entropy", "posterior", "posterior_greedy", "budget")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
    """

    default: Optional[Dict[str, Any]] = None
    thresholds: Dict[str, float] = dataclasses.field(default_factory=dict)
    options: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    calibration: Dict[str, Any] = dataclasses.field(default_factory=dict)
    decoding: Dict[str, Any] = dataclasses.field(default_factory=lambda: {"decoder": "ctc_greedy"})

    def __post_init__(self):
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
        try:
            return cls(**data)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    def to_json(self) -> Dict[str, Any]:
        """The JSON document (``from_json(to_json())`` gives the bundle back)."""
        return dataclasses.asdict(self)

    def threshold(self, policy: str) -> Optional[float]:
        """The calibrated threshold of ``policy`` (None when none is stored)."""
        return self.thresholds.get(policy)

    def policy_options(self, policy: str) -> Dict[str, Any]:
        """The stored options of ``policy`` (empty when none are stored)."""
        return dict(self.options.get(policy, {}))
