"""Early validation of recipe hyperparameters.

``load_hyperpyyaml`` instantiates models while it reads a file, so a wrong
value would surface as an obscure error deep inside a constructor. Recipes
therefore call :func:`check_hparams_file` first: it resolves references and
command-line overrides *without instantiating anything* and checks every key
the recipes read (type, range, exits against depth, weights against exits,
folders) so a mistake is reported in one message naming the key and the
accepted values, before any expensive work.
"""

import json
import os
import re
from typing import Any, Callable, Dict, Optional, Tuple

import yaml
from hyperpyyaml import resolve_references
from ruamel.yaml.error import YAMLError

from earlyexit_brain.brain_options import BrainOptions
from earlyexit_brain.dataio import DataOptions
from earlyexit_brain.decoding.attention import AEDSearchOptions
from earlyexit_brain.decoding.ctc import CTCDecodingOptions
from earlyexit_brain.evaluation import PolicyEvaluationOptions
from earlyexit_brain.losses import MultiExitLoss
from earlyexit_brain.models.exits import resolve_exit_layers
from earlyexit_brain.models.ssl import SUPPORTED_MODEL_TYPES, check_source
from earlyexit_brain.options import ConfigError
from earlyexit_brain.options import is_int as _is_int
from earlyexit_brain.options import is_num as _is_num

__all__ = ["ConfigError", "check_hparams", "check_hparams_file", "check_device", "read_raw_hparams"]


class _Tagged(str):
    """Placeholder for a ``!new:``/``!name:``/``!apply:`` node (not instantiated)."""


class _RawLoader(yaml.SafeLoader):
    pass


def _tagged(loader, tag_suffix, node):
    return _Tagged(tag_suffix)


_RawLoader.add_multi_constructor("!", _tagged)
_RawLoader.add_multi_constructor("tag:", _tagged)


def read_raw_hparams(path: str, overrides: Any = None) -> Dict[str, Any]:
    """Plain values of an HyperPyYAML file after references and overrides.

    Objects (``!new:`` ...) are left as placeholders; nothing is built.

    Raises
    ------
    ConfigError
        When the file is missing or not valid YAML, or an override names a
        key that the file does not have.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"hyperparameter file not found: {path}")
    with open(path) as fin:
        try:
            resolved = resolve_references(fin, overrides or {}, overrides_must_match=True)
        except KeyError as err:
            raise ConfigError(f"{path}: {err.args[0]} (unknown key in the overrides)") from None
        except YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        except ValueError as err:
            match = re.match(r"'(.+)' is a !PLACEHOLDER", str(err))
            if not match:
                raise ConfigError(f"{path}: {err}") from None
            key = match.group(1)
            raise ConfigError(
                f"{path}: key '{key}' must be given on the command line "
                f"(--{key}=...): it is a !PLACEHOLDER, e.g. the corpus folder"
            ) from None
    try:
        return yaml.load(resolved, Loader=_RawLoader) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None


Rule = Tuple[Callable[[Any], bool], str]  # (predicate, accepted values in words)

_FOLDER: Rule = (lambda v: isinstance(v, str) and v.strip() != "", "a folder path")
_SPLIT_LIST: Rule = (lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v), "a list of split names")

#: corpus_options entries checked here (the preparation functions check them again); the
#: real-corpus YAMLs also give some of them as top-level keys (see _RULES).
_CORPUS_RULES: Dict[str, Rule] = {
    "on_error": (lambda v: v in ("fail", "skip"), "'fail' or 'skip'"),
    "max_utterances": (lambda v: v is None or (_is_int(v) and v >= 1), "null or an integer >= 1"),
    "sample_rate": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "num_workers": (lambda v: v is None or (_is_int(v) and v >= 1), "null or an integer >= 1"),
    "partition": (lambda v: v in ("legacy", "speaker-adaptation"), "'legacy' or 'speaker-adaptation'"),
    "splits": (
        lambda v: isinstance(v, list) and len(v) > 0 and all(s in ("train", "dev", "test") for s in v),
        "a non-empty list among 'train', 'dev', 'test'",
    ),
    "manifest_folder": _FOLDER,
}

# key -> (predicate, accepted values in words)
_RULES: Dict[str, Rule] = {
    "number_of_epochs": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "num_layers": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "d_model": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "nhead": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "d_ffn": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "kernel_size": (lambda v: _is_int(v) and v >= 1 and v % 2 == 1, "an odd integer >= 1"),
    "n_mels": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "output_neurons": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
    "blank_index": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "lr": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "weight_decay": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "dropout": (lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "warmup_steps": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "max_grad_norm": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "checkpoints_to_keep": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "ckpt_interval_minutes": (lambda v: _is_num(v) and v >= 0, "a number of minutes >= 0 (0 = off)"),
    "ckpt_interval_steps": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = off)"),
    "nonfinite_patience": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "token_type": (lambda v: v in ("char", "bpe", "unigram"), "'char', 'bpe' or 'unigram'"),
    "max_batch_length_eval": (lambda v: _is_num(v) and v > 0, "a number of seconds > 0"),
    "manifest_folder": _FOLDER,
    "grad_accumulation_factor": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "data_folder_must_exist": (lambda v: isinstance(v, bool), "true or false"),
    "on_error": _CORPUS_RULES["on_error"],
    "max_utterances": _CORPUS_RULES["max_utterances"],
    "partition": _CORPUS_RULES["partition"],
    "abs_pos_encoding": (lambda v: isinstance(v, bool), "true or false"),
    "attention_type": (lambda v: v in ("RelPosMHAXL", "regularMHA"), "'RelPosMHAXL' or 'regularMHA'"),
    "train_splits": _SPLIT_LIST,
    "dev_splits": _SPLIT_LIST,
    "test_splits": _SPLIT_LIST,
    "output_folder": _FOLDER,
    # exit-policy evaluation (recipes/evaluate.py, end of recipes/train.py)
    "policy_evaluation": (lambda v: isinstance(v, bool), "true or false"),
    # decoding (EarlyExitCTCBrain / EarlyExitSeq2SeqBrain)
    "ngram_order": (
        lambda v: v is None or (_is_int(v) and (v == 0 or v >= 2)),
        "null or 0 (no n-gram LM), or an integer >= 2",
    ),
    # attention-decoder exits
    "decoder_layers": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "decoder_d_model": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "decoder_nhead": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "decoder_d_ffn": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "share_embedding": (lambda v: isinstance(v, bool), "true or false"),
}
# the keys of the typed options (data, the loss, CTC decoding, the attention search, the policy evaluation):
# each rule is defined beside its default, in the option class
for _options in (
    DataOptions,
    MultiExitLoss,
    CTCDecodingOptions,
    AEDSearchOptions,
    PolicyEvaluationOptions,
    BrainOptions,
):
    _RULES.update(_options.rules())


def _check_rules(values: Dict[str, Any], rules: Dict[str, Rule], source: str, prefix: str = "") -> None:
    """Raise a ConfigError for the first plain value that breaks its rule (objects are skipped)."""
    for key, (ok, accepted) in rules.items():
        if key in values and not isinstance(values[key], _Tagged) and not ok(values[key]):
            raise ConfigError(f"{source}: key '{prefix}{key}' must be {accepted}, got {values[key]!r}")


def check_hparams(raw: Dict[str, Any], source: str = "hparams") -> Dict[str, Any]:
    """Validate plain hyperparameter values; returns derived facts.

    Returns
    -------
    dict
        ``{"exit_layers": [...]}`` the resolved exit layers.

    Raises
    ------
    ConfigError
        Naming the first offending key and its accepted values.
    """
    _check_rules(raw, _RULES, source)
    if "d_model" in raw and "nhead" in raw and raw["d_model"] % raw["nhead"]:
        raise ConfigError(f"{source}: key 'nhead' must divide d_model={raw['d_model']}, got {raw['nhead']}")
    if (
        _is_num(raw.get("ckpt_interval_minutes"))
        and raw["ckpt_interval_minutes"] > 0
        and _is_int(raw.get("ckpt_interval_steps"))
        and raw["ckpt_interval_steps"] > 0
    ):
        raise ConfigError(
            f"{source}: keys 'ckpt_interval_minutes' and 'ckpt_interval_steps': set "
            f"one of them (the other 0), got {raw['ckpt_interval_minutes']} and "
            f"{raw['ckpt_interval_steps']}"
        )
    _check_ssl(raw, source)
    _check_decoding(raw, source)
    derived: Dict[str, Any] = {}
    if "exit_layers" in raw:
        depth = raw.get("num_layers")
        if not _is_int(depth):
            raise ConfigError(f"{source}: key 'num_layers' is needed to check 'exit_layers'")
        try:
            derived["exit_layers"] = resolve_exit_layers(raw["exit_layers"], depth)
        except ValueError as err:
            raise ConfigError(f"{source}: key {err}") from None
        weights = raw.get("exit_loss_weights")
        if weights is not None:
            n = len(derived["exit_layers"])
            if (
                not isinstance(weights, list)
                or len(weights) != n
                or not all(_is_num(w) and w >= 0 for w in weights)
                or sum(weights) <= 0
            ):
                raise ConfigError(
                    f"{source}: key 'exit_loss_weights' must be null (plain sum) or a list of "
                    f"{n} non-negative numbers, one per exit {derived['exit_layers']}, "
                    f"not all zero; got {weights!r}"
                )
    avg, keep = raw.get("avg_checkpoints"), raw.get("checkpoints_to_keep")
    if _is_int(avg) and _is_int(keep) and avg > keep:
        raise ConfigError(
            f"{source}: key 'avg_checkpoints' ({avg}) cannot exceed "
            f"'checkpoints_to_keep' ({keep}): only kept checkpoints can be averaged"
        )
    _check_corpus_options(raw, source)
    default_policy, sweep = raw.get("default_policy"), raw.get("policy_sweep")
    if isinstance(default_policy, str) and isinstance(sweep, list) and default_policy not in sweep:
        raise ConfigError(
            f"{source}: key 'default_policy' ({default_policy!r}) must be one of the "
            f"policies in 'policy_sweep' {sweep}, which calibrates its threshold"
        )
    data_folder = raw.get("data_folder")
    if isinstance(data_folder, str):
        must_exist = raw.get("data_folder_must_exist", False)
        if os.path.exists(data_folder) and not os.path.isdir(data_folder):
            raise ConfigError(f"{source}: key 'data_folder' is not a folder: {data_folder}")
        if must_exist and not os.path.isdir(data_folder):
            raise ConfigError(f"{source}: key 'data_folder' does not exist: {data_folder}")
        if not must_exist:
            parent = _existing_parent(data_folder)
            if not os.access(parent, os.W_OK):
                raise ConfigError(
                    f"{source}: key 'data_folder' cannot be created (no write access to {parent}): {data_folder}"
                )
    return derived


def _check_decoding(raw: Dict[str, Any], source: str) -> None:
    """Attention decoders: width equal to the encoder's, heads dividing it, bos/eos/blank
    distinct and inside the output layer; ``aed_beam`` only with decoders."""
    dec_d, enc_d = raw.get("decoder_d_model"), raw.get("d_model")
    if _is_int(dec_d) and _is_int(enc_d) and dec_d != enc_d:
        raise ConfigError(
            f"{source}: key 'decoder_d_model' ({dec_d}) must equal the encoder's "
            f"d_model ({enc_d}): each decoder attends to its exit's {enc_d}-d states"
        )
    heads = raw.get("decoder_nhead")
    if _is_int(dec_d) and _is_int(heads) and dec_d % heads:
        raise ConfigError(f"{source}: key 'decoder_nhead' must divide decoder_d_model={dec_d}, got {heads}")
    uses_aed = raw.get("valid_decoder") == "aed_beam" or "aed_beam" in (raw.get("test_decoders") or [])
    if uses_aed and "decoders" not in raw:
        raise ConfigError(
            f"{source}: key 'test_decoders'/'valid_decoder': 'aed_beam' needs attention "
            f"decoders (a 'decoders' module, e.g. hparams/synthetic/conformer_aed_ee.yaml)"
        )
    lm_weight = raw.get("aed_lm_weight")
    if _is_num(lm_weight) and lm_weight > 0:
        if "decoders" not in raw:
            raise ConfigError(
                f"{source}: key 'aed_lm_weight' fuses the n-gram into the attention "
                f"decoders' search; this model has no 'decoders' (set it to 0)"
            )
        if raw.get("ctc_lm_path") is None and not raw.get("ngram_order"):
            raise ConfigError(
                f"{source}: key 'aed_lm_weight' ({lm_weight}) needs a word n-gram: set "
                f"'ctc_lm_path' or 'ngram_order' (or aed_lm_weight: 0)"
            )
    if "decoders" not in raw:
        return
    indices = {k: raw.get(k) for k in ("blank_index", "bos_index", "eos_index")}
    if all(_is_int(v) for v in indices.values()):
        if len(set(indices.values())) < 3:
            raise ConfigError(
                f"{source}: keys 'bos_index', 'eos_index' and 'blank_index' must be "
                f"three different tokens for joint CTC/attention, got {indices}"
            )
        out = raw.get("output_neurons")
        for key, value in indices.items():
            if _is_int(out) and value >= out:
                raise ConfigError(f"{source}: key '{key}' ({value}) must be below output_neurons ({out})")
    reward, norm = raw.get("aed_length_reward"), raw.get("aed_length_normalization")
    if _is_num(reward) and reward > 0 and norm is True:
        raise ConfigError(
            f"{source}: keys 'aed_length_reward' and 'aed_length_normalization': "
            f"set one of them (a reward > 0 or normalization true), not both"
        )


def _check_corpus_options(raw: Dict[str, Any], source: str) -> None:
    options = raw.get("corpus_options")
    if options is None or isinstance(options, _Tagged):
        return
    if not isinstance(options, dict):
        raise ConfigError(f"{source}: key 'corpus_options' must be a mapping of options, got {options!r}")
    _check_rules(options, _CORPUS_RULES, source, prefix="corpus_options.")


def _check_ssl(raw: Dict[str, Any], source: str) -> None:
    """``ssl_source`` (SSL encoders): a local model folder or a Hub id; for a local folder,
    its model type, depth (``num_layers``) and hidden size (``d_model``) are checked too.
    A Hub id is checked when the model loads, still before training starts."""
    if "ssl_source" not in raw or isinstance(raw["ssl_source"], _Tagged):
        return

    try:
        local = check_source(raw["ssl_source"], "'ssl_source'")
    except ValueError as err:
        raise ConfigError(f"{source}: key {err}") from None
    if not local:
        return
    path = os.path.join(raw["ssl_source"], "config.json")
    try:
        with open(path) as fin:
            config = json.load(fin)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{source}: key 'ssl_source': cannot read {path} ({err})") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: key 'ssl_source': {raw['ssl_source']} is a {model_type!r} model, "
            f"which has no wav2vec2-style transformer layers to tap; accepted model "
            f"types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    for key, hf_key in (("num_layers", "num_hidden_layers"), ("d_model", "hidden_size")):
        if key in raw and _is_int(raw[key]) and raw[key] != config.get(hf_key):
            raise ConfigError(
                f"{source}: key '{key}' ({raw[key]}) must equal the {hf_key} of ssl_source ({config.get(hf_key)})"
            )


def _existing_parent(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_hparams_file(path: str, overrides: Optional[Any] = None) -> Dict[str, Any]:
    """Read ``path`` with ``overrides`` (no instantiation) and validate it."""
    raw = read_raw_hparams(path, overrides)
    check_hparams(raw, source=os.path.basename(path))
    return raw


def check_device(device: str) -> str:
    """``device`` when this machine can compute on it, else a :class:`ConfigError` naming ``--device``.

    Called before anything is loaded, so that a missing GPU is one message
    instead of a traceback from the first tensor moved there.
    """
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device: {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {device}: no CUDA GPU is available on this machine; use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device}: no MPS (Apple GPU) backend on this machine; use --device cpu")
    try:  # any other kind (xpu, ...): can a tensor live there?
        torch.empty(0, device=parsed)
    except (RuntimeError, AssertionError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0]
        raise ConfigError(f"--device {device}: cannot be used on this machine ({reason})") from None
    return device
