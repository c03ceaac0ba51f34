"""Loading a model folder without running someone else's code.

A ``hyperparams.yaml`` is code: HyperPyYAML imports and calls whatever its
``!new:``, ``!name:``, ``!apply:`` and ``!module:`` tags name. A model fetched
from the Hub is therefore checked before it is loaded: every such tag must name
an object under one of :data:`ALLOWED_TARGETS` (network layers, feature
extractors, decoders and the loaders this package writes; none of them runs
commands or reads files other than the model's own), and tags that reach
outside the file (``!include:``, ``!applyref:``, Python object tags) are
refused. ``trust_remote_code=True`` skips the check for a source the caller
trusts. Checkpoints are always unpickled with ``weights_only=True``
(:func:`weights_only_loading`), whatever the caller's torch version defaults to.
"""

import contextlib
import os
from typing import List

import yaml

#: Import paths (exact, or a package/module prefix ending with ".") that a
#: model's hyperparams.yaml may build or call without ``trust_remote_code``.
ALLOWED_TARGETS = (
    "earlyexit_brain.models.",
    "earlyexit_brain.inference.JsonRecord",
    "earlyexit_brain.inference.FileRecord",
    "speechbrain.lobes.features.",
    "speechbrain.lobes.models.",
    "speechbrain.nnet.",
    "speechbrain.processing.features.",
    "speechbrain.dataio.preprocess.AudioNormalizer",
    "speechbrain.decoders.",
    "speechbrain.utils.parameter_transfer.Pretrainer",
    "torch.nn.",
    "sentencepiece.SentencePieceProcessor",
)

#: HyperPyYAML tags that only refer to values inside the file.
_PLAIN_TAGS = ("!ref", "!copy", "!tuple", "!PLACEHOLDER")
_TARGET_TAGS = ("!new:", "!name:", "!apply:", "!module:")


class UnsafeHparamsError(ValueError):
    """A hyperparameter file would build or call something outside the allowlist."""


def allowed_target(path: str) -> bool:
    """Whether an import path is on :data:`ALLOWED_TARGETS`."""
    return any(path == entry or (entry.endswith(".") and path.startswith(entry))
               for entry in ALLOWED_TARGETS)


def _walk(node, found: List[str], origin: str, seen: set):
    if id(node) in seen:  # an alias of a node already checked
        return
    seen.add(id(node))
    tag = node.tag or ""
    where = f"{origin}, line {node.start_mark.line + 1}"
    if tag.startswith("!"):
        target_tag = next((t for t in _TARGET_TAGS if tag.startswith(t)), None)
        if target_tag is not None:
            target = tag[len(target_tag):]
            if not allowed_target(target):
                found.append(f"{where}: {tag} ({target} is not on the allowlist)")
        elif tag not in _PLAIN_TAGS:
            found.append(f"{where}: {tag} (reaches outside the file)")
    elif tag.startswith("tag:yaml.org,2002:python/"):
        found.append(f"{where}: {tag} (a Python object tag)")
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            _walk(key, found, origin, seen)
            _walk(value, found, origin, seen)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _walk(item, found, origin, seen)


def unsafe_tags(text: str, origin: str = "hyperparams.yaml") -> List[str]:
    """Every tag in a HyperPyYAML text that is not allowed, with its line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        raise UnsafeHparamsError(f"{origin}: not valid YAML ({err})") from None
    found: List[str] = []
    if root is not None:
        _walk(root, found, origin, set())
    return found


def check_hparams_text(text: str, origin: str = "hyperparams.yaml") -> None:
    """Raise :class:`UnsafeHparamsError` listing every disallowed tag, if any."""
    found = unsafe_tags(text, origin)
    if found:
        raise UnsafeHparamsError(
            f"{origin} builds or calls code outside the allowlist of earlyexit_brain.safe_load:\n  "
            + "\n  ".join(found)
            + "\nLoad it only if you trust its source, with trust_remote_code=True.")


@contextlib.contextmanager
def weights_only_loading():
    """Within the block, every ``torch.load`` unpickles tensors and plain containers only."""
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD",
                                                  "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        for key, value in saved.items():
            if value is not None:
                os.environ[key] = value
