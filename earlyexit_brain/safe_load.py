"""Loading a model folder without running someone else's code (one concept: the checks a model's files
pass before anything in them is built or unpickled).

A ``hyperparams.yaml`` is code: HyperPyYAML imports and calls whatever its
``!new:``, ``!name:``, ``!apply:`` and ``!module:`` tags name, and a ``!ref``
with attribute access (``<a.b>``) becomes a ``getattr`` call. A model fetched
from the Hub is therefore checked before anything in it is built
(:func:`check_hparams_text`):

- every dotted name is resolved the way HyperPyYAML's loader resolves it
  (``pydoc.locate``: import the longest module prefix, then walk attributes),
  importing only modules of the packages in :data:`TRUSTED_PACKAGES` and
  calling nothing; the name is allowed only if the object it resolves to is a
  network layer (a ``torch.nn.Module`` subclass) *defined* in one of
  :data:`LAYER_MODULES`, or one of :data:`ALLOWED_OBJECTS`. How the name is
  spelled does not matter: ``earlyexit_brain.models.ssl.os.system`` resolves
  to ``os.system`` and is refused. Modules, builtins and every other function
  are refused whatever path reaches them;
- some allowed objects take arguments that would reach outside the model's
  folder: a ``Pretrainer`` may name its files only by bare file names inside
  the model folder (``paths``) and may not choose where they are collected
  (``collect_in``); the SSL encoder may not download (``source``); the
  tokenizer may not open a file at construction. :data:`ARGUMENT_RULES`;
- tags that reach outside the file (``!include:``, ``!applyref:``, Python
  object tags, other tags) and ``!ref`` / ``!copy`` with attribute access are
  refused;
- a document whose aliases expand to more than :data:`MAX_EXPANDED_NODES`
  nodes (a "billion laughs" alias bomb) or that refers to itself is refused
  before it is built (:func:`check_alias_expansion`), whatever the trust.

``trust_remote_code=True`` skips the first three checks for a source the
caller trusts. Checkpoints are always unpickled with ``weights_only=True``
(:func:`weights_only_loading`), whatever the caller's torch version or
environment says; a checkpoint that holds anything else is refused with
:class:`UnsafeCheckpointError`, naming the file. docs/publishing.md states the
threat model.
"""

import contextlib
import importlib
import importlib.util
import inspect
import os
import pickle
import re
import sys
from typing import Callable, Dict, List, Optional, Tuple

import yaml

#: Top-level packages whose modules the check may import while it resolves a
#: name (importing them runs only their own, installed code). A name outside
#: them is refused without importing anything.
TRUSTED_PACKAGES = ("earlyexit_brain", "speechbrain", "torch", "sentencepiece")

#: Modules (and their submodules) in which a ``torch.nn.Module`` subclass is
#: allowed: network layers and feature extractors that compute on tensors.
LAYER_MODULES = (
    "earlyexit_brain.models",
    "speechbrain.lobes.features",
    "speechbrain.nnet",
    "speechbrain.processing.features",
    "torch.nn",
)

#: Other objects a model's hyperparams.yaml may build or call, by the name of
#: the module that defines them and their qualified name.
ALLOWED_OBJECTS = (
    "earlyexit_brain.records.JsonRecord",
    "earlyexit_brain.records.FileRecord",
    "speechbrain.dataio.preprocess.AudioNormalizer",
    "speechbrain.decoders.ctc.ctc_greedy_decode",
    "speechbrain.utils.parameter_transfer.Pretrainer",
    "sentencepiece.SentencePieceProcessor",
)

#: Alias expansion bound: far above any model's hyperparams.yaml (the largest
#: this package writes has a few hundred nodes), far below a slow load.
MAX_EXPANDED_NODES = 100_000

#: HyperPyYAML tags that only refer to values inside the file.
_PLAIN_TAGS = ("!ref", "!copy", "!tuple", "!PLACEHOLDER")
_TARGET_TAGS = ("!new:", "!name:", "!apply:", "!module:")
_REFERENCE = re.compile(r"<([^<>]*)>")


class UnsafeHparamsError(ValueError):
    """A hyperparameter file would build or call something outside the allowlist."""


class UnsafeCheckpointError(ValueError, pickle.UnpicklingError):
    """A checkpoint holds pickled objects other than tensors and plain containers."""


def _in_module(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def resolve_name(path: str):
    """What HyperPyYAML's loader would find at the dotted ``path``, without calling it.

    Mirrors ``pydoc.locate`` (import the longest importable module prefix, then
    ``getattr`` the rest), but imports only modules of :data:`TRUSTED_PACKAGES`.
    Returns ``(object, None)`` or ``(None, reason)``.
    """
    parts = [part for part in path.split(".") if part]
    if not parts:
        return None, "an empty name"
    if parts[0] not in TRUSTED_PACKAGES:
        return None, (f"it is outside the packages {', '.join(TRUSTED_PACKAGES)} (a builtin or another package)")
    obj, n = None, 0
    while n < len(parts):
        name = ".".join(parts[: n + 1])
        if name in sys.modules:
            obj, n = sys.modules[name], n + 1
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            break
        try:
            obj, n = importlib.import_module(name), n + 1
        except Exception as err:  # an installed module that fails to import
            return None, f"importing {name} failed ({type(err).__name__})"
    if obj is None:
        return None, "no such module"
    for part in parts[n:]:
        try:
            obj = getattr(obj, part)
        except Exception:
            return None, f"no such object ({part} not found)"
    return obj, None


def _definition(obj) -> Optional[Tuple[str, str]]:
    """``(module, qualname)`` where ``obj`` is defined, if it is really found there."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return None
    found = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return (module, qualname) if found is obj else None


def allowed_object(obj) -> Tuple[bool, str]:
    """Whether a resolved object may be built or called by a model file, and why not."""
    if inspect.ismodule(obj):
        return False, f"it is the module {obj.__name__}"
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        return (
            False,
            f"it is {type(obj).__name__} {getattr(obj, '__qualname__', obj)!r}, "
            f"not a class or Python function of the allowlist",
        )
    where = _definition(obj)
    if where is None:
        return False, "it is not found where it claims to be defined"
    full = ".".join(where)
    if full in ALLOWED_OBJECTS:
        return True, full
    if inspect.isclass(obj) and _in_module(where[0], LAYER_MODULES):
        import torch

        if issubclass(obj, torch.nn.Module):
            return True, full
    return False, f"it is {full}"


def _is_bare_file_name(value) -> bool:
    return (
        isinstance(value, str)
        and value not in ("", ".", "..")
        and not re.search(r"[/\\:]", value)
        and not os.path.isabs(value)
    )


def _pretrainer_rule(node) -> List[str]:
    if not isinstance(node, yaml.MappingNode):
        return ["give the Pretrainer's arguments by name (loadables, paths)"]
    problems = []
    for key, value in node.value:
        if key.value == "collect_in":
            problems.append(
                "collect_in: a model file may not choose where its files are collected "
                "(the loader collects them in its savedir)"
            )
        elif key.value == "paths":
            if not isinstance(value, yaml.MappingNode):
                problems.append("paths: must map each loadable to a file name")
                continue
            for name, path in value.value:
                plain = isinstance(path, yaml.ScalarNode) and path.tag == "tag:yaml.org,2002:str"
                if not plain or not _is_bare_file_name(path.value):
                    problems.append(
                        f"paths.{name.value}: {path.value!r} is not a file name inside "
                        f"the model's folder (no directories, absolute paths, URLs or "
                        f"references)"
                    )
    return problems


def _no_download_rule(node) -> List[str]:
    pairs = node.value if isinstance(node, yaml.MappingNode) else []
    if isinstance(node, yaml.SequenceNode) and node.value:
        return ["give the SSL encoder's arguments by name (hf_config, exit_layers)"]
    return [
        f"source: {value.value!r}: a model file may not download or open another model "
        f"(an exported folder carries hf_config)"
        for key, value in pairs
        if key.value == "source" and value.tag != "tag:yaml.org,2002:null"
    ]


def _no_arguments_rule(node) -> List[str]:
    empty = (isinstance(node, yaml.ScalarNode) and node.value == "") or (
        isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and not node.value
    )
    return (
        []
        if empty
        else [
            "takes no arguments in a model file (it would open a file of its "
            "choosing; the Pretrainer loads tokenizer.ckpt)"
        ]
    )


#: Argument checks for allowed objects whose arguments could reach outside the
#: model's folder; each returns the problems of the tag's node.
ARGUMENT_RULES: Dict[str, Callable] = {
    "speechbrain.utils.parameter_transfer.Pretrainer": _pretrainer_rule,
    "earlyexit_brain.models.ssl.EarlyExitSSLEncoder": _no_download_rule,
    "sentencepiece.SentencePieceProcessor": _no_arguments_rule,
}


def _check_target(tag: str, target_tag: str, node) -> List[str]:
    target = tag[len(target_tag) :]
    if target_tag == "!module:":
        return [f"{tag} (a module is never allowed)"]
    obj, reason = resolve_name(target)
    if obj is None:
        return [f"{tag} ({target} is not on the allowlist: {reason})"]
    ok, detail = allowed_object(obj)
    if not ok:
        return [f"{tag} ({target} is not on the allowlist: {detail})"]
    if target_tag == "!apply:" and not inspect.isfunction(obj):
        return [f"{tag} (only functions of the allowlist may be applied)"]
    return [f"{tag}: {problem}" for problem in ARGUMENT_RULES.get(detail, lambda n: [])(node)]


def _check_references(tag: str, node) -> List[str]:
    if not isinstance(node, yaml.ScalarNode):
        return []
    return [
        f"{tag} <{ref}> (attribute access in a reference calls getattr on a built object)"
        for ref in _REFERENCE.findall(node.value)
        if "." in ref
    ]


def _walk(node, found: List[str], origin: str, seen: set):
    if id(node) in seen:  # an alias of a node already checked
        return
    seen.add(id(node))
    tag = node.tag or ""
    where = f"{origin}, line {node.start_mark.line + 1}"
    problems: List[str] = []
    if tag.startswith("!"):
        target_tag = next((t for t in _TARGET_TAGS if tag.startswith(t)), None)
        if target_tag is not None:
            problems = _check_target(tag, target_tag, node)
        elif tag in ("!ref", "!copy"):
            problems = _check_references(tag, node)
        elif tag not in _PLAIN_TAGS:
            problems = [f"{tag} (reaches outside the file)"]
    elif tag.startswith("tag:yaml.org,2002:python/"):
        problems = [f"{tag} (a Python object tag)"]
    found.extend(f"{where}: {problem}" for problem in problems)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            _walk(key, found, origin, seen)
            _walk(value, found, origin, seen)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _walk(item, found, origin, seen)


def _compose(text: str, origin: str):
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        raise UnsafeHparamsError(f"{origin}: not valid YAML ({err})") from None


def expanded_size(root, limit: int = MAX_EXPANDED_NODES) -> int:
    """Nodes of the document once every alias is expanded, counted without expanding
    (each shared node once); stops counting above ``limit``. A node that contains
    itself through an alias raises :class:`UnsafeHparamsError`."""
    sizes: Dict[int, int] = {}
    active = set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise UnsafeHparamsError(
                "an alias refers to a node that contains it (a recursive document, which never finishes expanding)"
            )
        active.add(key)
        children = []
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        total = 1
        for child in children:
            total = min(total + size(child), limit + 1)
        active.discard(key)
        sizes[key] = total
        return total

    return 0 if root is None else size(root)


def check_alias_expansion(text: str, origin: str = "hyperparams.yaml", limit: int = MAX_EXPANDED_NODES) -> None:
    """Refuse a document whose aliases expand beyond ``limit`` nodes, or that contains itself."""
    root = _compose(text, origin)
    try:
        total = expanded_size(root, limit)
    except UnsafeHparamsError as err:
        raise UnsafeHparamsError(f"{origin}: {err}") from None
    if total > limit:
        raise UnsafeHparamsError(
            f"{origin}: its aliases expand to more than {limit} nodes (an alias bomb); refused before anything is built"
        )


def unsafe_tags(text: str, origin: str = "hyperparams.yaml") -> List[str]:
    """Every tag or reference in a HyperPyYAML text that is not allowed, with its line."""
    root = _compose(text, origin)
    found: List[str] = []
    if root is not None:
        _walk(root, found, origin, set())
    return found


def check_hparams_text(text: str, origin: str = "hyperparams.yaml") -> None:
    """Raise :class:`UnsafeHparamsError` for an alias bomb or listing every disallowed tag."""
    check_alias_expansion(text, origin)
    found = unsafe_tags(text, origin)
    if found:
        raise UnsafeHparamsError(
            f"{origin} builds or calls code outside the allowlist of earlyexit_brain.safe_load:\n  "
            + "\n  ".join(found)
            + "\nLoad it only if you trust its source, with trust_remote_code=True."
        )


def _load_path(args, kwargs) -> str:
    target = kwargs.get("f", args[0] if args else None)
    return os.fspath(target) if isinstance(target, (str, os.PathLike)) else repr(target)


@contextlib.contextmanager
def weights_only_loading():
    """Within the block, every ``torch.load`` unpickles tensors and plain containers only.

    ``torch.load`` is called with ``weights_only=True`` whatever its caller asks
    (and ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` is set for any other loader of torch's);
    a file that holds other objects raises :class:`UnsafeCheckpointError` naming
    it. The patch is process-wide for the duration of the block.
    """
    import torch

    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(*args, **kwargs)
        except pickle.UnpicklingError:
            raise UnsafeCheckpointError(
                f"{_load_path(args, kwargs)}: refused: this checkpoint holds pickled Python objects "
                f"other than tensors and plain containers, which can run code when loaded, and "
                f"earlyexit_brain never unpickles them. Get the model from a source that "
                f"publishes weights only."
            ) from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original
        os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        for key, value in saved.items():
            if value is not None:
                os.environ[key] = value
