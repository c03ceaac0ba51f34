"""Typed options: each YAML key's default, rule and documentation in one place.

A group of related keys (the loss, CTC decoding, the attention search, the data pipeline) is a
frozen dataclass whose fields are made with :func:`option`: the field's YAML key, its default and
the rule its value must follow. The class checks its values when it is built, reads them from a
recipe's hparams with :meth:`Options.from_hparams` (the defaults for absent keys), and gives
:func:`earlyexit_brain.config.check_hparams` its rules through :meth:`Options.rules`, so a bad value
in a YAML file is reported, with the file and key, before anything is built.
"""

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Callable, Dict, NamedTuple, Optional


class ConfigError(ValueError):
    """A hyperparameter value that breaks its rule; the message names the key."""


class Rule(NamedTuple):
    """A predicate on a plain value and the accepted values in words (for the error message)."""

    check: Callable[[Any], bool]
    accepted: str


def is_int(value) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_num(value) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def option(
    key: Optional[str], default: Any, check: Callable[[Any], bool], accepted: str, null_is_default: bool = False
):
    """A dataclass field for an :class:`Options` class.

    Arguments
    ---------
    key : str, optional
        The recipe YAML key that sets it (None: the field has no top-level key of its own).
    default : object
        Its value when the key is absent (``dataclasses.MISSING``: required).
    check : callable
        ``check(value) -> bool``: whether a value is accepted.
    accepted : str
        The accepted values in words, e.g. ``"an integer >= 1"``.
    null_is_default : bool
        Whether ``null`` in the YAML stands for the default.
    """
    metadata = {"key": key, "rule": Rule(check, accepted), "null_is_default": null_is_default}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    if isinstance(default, list):  # a fresh copy for every instance
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


class Options:
    """Base of the frozen dataclasses of options (see the module docstring)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if "rule" not in f.metadata:
                continue
            value = getattr(self, f.name)
            if value is None and f.metadata["null_is_default"]:
                object.__setattr__(self, f.name, _default(f))
                continue
            check, accepted = f.metadata["rule"]
            if not check(value):
                raise ConfigError(f"key '{f.metadata['key'] or f.name}' must be {accepted}, got {value!r}")

    @classmethod
    def rules(cls) -> Dict[str, Rule]:
        """``{yaml_key: Rule}`` of the fields that have a YAML key; ``null`` is accepted where it
        stands for the default."""
        rules = {}
        for f in dataclasses.fields(cls):
            if f.metadata.get("key"):
                check, accepted = f.metadata["rule"]
                if f.metadata["null_is_default"]:
                    rules[f.metadata["key"]] = Rule(lambda v, c=check: v is None or c(v), f"null or {accepted}")
                else:
                    rules[f.metadata["key"]] = Rule(check, accepted)
        return rules

    @classmethod
    def defaults(cls) -> Dict[str, Any]:
        """``{yaml_key: default}`` of the fields that have a YAML key and a default."""
        return {
            f.metadata["key"]: _default(f)
            for f in dataclasses.fields(cls)
            if f.metadata.get("key") and _default(f) is not dataclasses.MISSING
        }

    @classmethod
    def from_hparams(cls, hparams, **given):
        """The options a recipe's hparams (a dict, or a Brain's ``hparams`` namespace) set; absent
        keys take their defaults; ``given`` (field names) take precedence."""
        values = {}
        for f in dataclasses.fields(cls):
            key = f.metadata.get("key")
            if f.name in given:
                values[f.name] = given[f.name]
            elif key is not None:
                present = key in hparams if isinstance(hparams, Mapping) else hasattr(hparams, key)
                if present:
                    values[f.name] = hparams[key] if isinstance(hparams, Mapping) else getattr(hparams, key)
        missing = [
            f.metadata.get("key") or f.name
            for f in dataclasses.fields(cls)
            if f.name not in values and _default(f) is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(
                f"{cls.__name__}: key{'s' if len(missing) > 1 else ''} "
                f"{', '.join(repr(k) for k in missing)} missing (no default)"
            )
        return cls(**values)

    def as_dict(self) -> Dict[str, Any]:
        """The options as keyword arguments (field names)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def null_or_file(value) -> bool:
    """None or the path of an existing file."""
    return value is None or (isinstance(value, str) and os.path.isfile(value))
