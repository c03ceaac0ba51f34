"""The policy evaluation a recipe runs after training: options, model, records, calibration, export."""

import dataclasses
import logging
import os
from typing import Dict, List, Optional

import torch

from ..controller import (
    auc,
    controller_labels,
    controller_probability,
    fit_controller,
    parameter_count,
    stop_labels,
)
from ..decoding.attention import AEDSearchOptions
from ..decoding.ctc import CTC_DECODERS, CTCDecoder, CTCDecodingOptions
from ..export import export_inference_folder
from ..latency import measure_latency_table
from ..models.pipeline import EarlyExitAEDModel, EarlyExitCTCModel
from ..options import ConfigError, Options, is_int, is_num, option
from ..policies import LearnedPolicy
from ..policy_bundle import PolicyBundle
from ..utils import tokenizer_pieces, uses_decoders
from .calibration import evaluate_policies
from .exit_outputs import ExitOutputs, build_scorers, collect_exit_outputs

logger = logging.getLogger(__name__)


#: The policies whose threshold is calibrated on dev, and those the sweep can run (``learned``
#: only when the recipe trains the exit controller, ``exit_controller``).
CALIBRATED_POLICIES = ("entropy", "posterior", "posterior_greedy", "learned")
SWEEPABLE_POLICIES = CALIBRATED_POLICIES + ("budget",)


@dataclasses.dataclass(frozen=True)
class PolicyEvaluationOptions(Options):
    """The exit-policy evaluation after training (docs/exit_policies.md); each field's YAML key in brackets.

    Arguments
    ---------
    policy_sweep : list of str
        The policies calibrated and swept (``policy_sweep``).
    sweep_points : int
        Thresholds per policy in the sweep (``sweep_points``).
    calibration_target : str
        ``max_wer_increase`` (the largest dev WER increase over the last exit) or ``avg_layers``
        (an average depth) (``calibration_target``), with the value ``calibration_value``.
    calibration_confidence : float, optional
        Calibrate on a bootstrap upper bound of the WER increase at this confidence
        (``calibration_confidence``; null: on the dev WER itself).
    default_policy : str
        The policy ``EarlyExitASR`` uses by default (``default_policy``), unless the learned policy
        computes fewer layers on dev at its calibrated threshold than every other calibrated policy:
        then the learned policy.
    nbest_beam_size : int
        The N-best posterior policy's beam (``nbest_beam_size``).
    nbest_token_prune_logp : float, optional
        Its token pruning, a negative log-probability (``nbest_token_prune_logp``; null: SpeechBrain's).
    entropy_normalize : bool
        Divide the entropy by log(V) (``entropy_normalize``).
    posterior_greedy_form : str
        ``mean`` or ``geometric`` mean of the greedy path's posteriors (``posterior_greedy_form``).
    latency_durations : list of float
        Audio durations (s) of the latency table (``latency_durations``).
    exit_controller : bool
        Train the learned exit controller on ``controller_csv`` after the recogniser and add the
        ``learned`` policy (``exit_controller``).
    controller_hidden_units : int
        Its hidden layer (``controller_hidden_units``; 0: logistic regression).
    controller_weight_decay : float
        Its L2 penalty (``controller_weight_decay``).
    controller_target : str
        What it learns to predict (``controller_target``): ``agreement``, that the exit's
        hypothesis equals the last exit's, or ``errors``, that it has no more word errors.
    controller_reads_states : bool
        Whether it also reads the exit's mean encoder states (``controller_reads_states``).
    """

    policy_sweep: List[str] = option(
        "policy_sweep",
        [p for p in SWEEPABLE_POLICIES if p != "learned"],
        lambda v: isinstance(v, list) and all(p in SWEEPABLE_POLICIES for p in v),
        "a list of policies among " + ", ".join(repr(p) for p in SWEEPABLE_POLICIES),
    )
    sweep_points: int = option("sweep_points", 9, lambda v: is_int(v) and v >= 2, "an integer >= 2")
    calibration_target: str = option(
        "calibration_target",
        "max_wer_increase",
        lambda v: v in ("max_wer_increase", "avg_layers"),
        "'max_wer_increase' or 'avg_layers'",
    )
    calibration_value: float = option("calibration_value", 1.0, lambda v: is_num(v) and v >= 0, "a number >= 0")
    calibration_confidence: Optional[float] = option(
        "calibration_confidence", None, lambda v: v is None or (is_num(v) and 0 < v < 1), "null or a number in (0, 1)"
    )
    default_policy: str = option(
        "default_policy",
        "posterior",
        lambda v: v in CALIBRATED_POLICIES,
        "one of " + ", ".join(repr(p) for p in CALIBRATED_POLICIES),
    )
    nbest_beam_size: int = option("nbest_beam_size", 10, lambda v: is_int(v) and v >= 2, "an integer >= 2")
    nbest_token_prune_logp: Optional[float] = option(
        "nbest_token_prune_logp",
        None,
        lambda v: v is None or (is_num(v) and v < 0),
        "null or a negative number (a log-probability)",
    )
    entropy_normalize: bool = option("entropy_normalize", True, lambda v: isinstance(v, bool), "true or false")
    posterior_greedy_form: str = option(
        "posterior_greedy_form", "mean", lambda v: v in ("mean", "geometric"), "'mean' or 'geometric'"
    )
    latency_durations: List[float] = option(
        "latency_durations",
        [2.0, 5.0, 10.0, 20.0],
        lambda v: isinstance(v, list) and len(v) >= 2 and all(is_num(d) and d > 0 for d in v),
        "a list of at least two durations in seconds > 0",
    )
    exit_controller: bool = option("exit_controller", False, lambda v: isinstance(v, bool), "true or false")
    controller_hidden_units: int = option(
        "controller_hidden_units", 0, lambda v: is_int(v) and 0 <= v <= 256, "an integer in 0..256"
    )
    controller_weight_decay: float = option(
        "controller_weight_decay", 1.0, lambda v: is_num(v) and v >= 0, "a number >= 0"
    )
    controller_target: str = option(
        "controller_target", "agreement", lambda v: v in ("agreement", "errors"), "'agreement' or 'errors'"
    )
    controller_reads_states: bool = option(
        "controller_reads_states", False, lambda v: isinstance(v, bool), "true or false"
    )


#: ``{yaml_key: default}`` of the policy evaluation (written into an experiment's hyperparams.yaml by
#: ``recipes/evaluate.py`` when they are absent).
POLICY_DEFAULTS = PolicyEvaluationOptions.defaults()


def report_decoding(hparams: Dict) -> Dict:
    """The decoder whose hypotheses the report's per-exit and policy WERs use: the
    first of ``test_decoders``, with the CTC beam-search options (for CTC models)."""
    name = (hparams.get("test_decoders") or ["ctc_greedy"])[0]
    return {"decoder": name, "options": CTCDecodingOptions.from_hparams(hparams) if name == "ctc_beam" else None}


def stored_decoding(decoding: Dict, decoder: Optional[CTCDecoder]) -> Dict:
    """What is stored with an exported model (and in report.json ``decoding``): the
    decoder, and for ``ctc_beam`` its beam size and LM weights (``lm``: whether the
    folder has the n-gram, ``ngram_lm.ckpt``)."""
    if decoder is None or decoder.name == "ctc_greedy":
        return {"decoder": decoding["decoder"]}
    o = decoder.options
    return {
        "decoder": "ctc_beam",
        "beam_size": int(o.beam_size),
        "lm": o.lm_path is not None,
        "alpha": float(o.alpha),
        "beta": float(o.beta),
    }


def nbest_options(opts: PolicyEvaluationOptions) -> Dict:
    """The N-best posterior's search options stored with an exported model (a folder
    without ``token_prune_min_logp`` was calibrated with SpeechBrain's default)."""
    options = {"beam_size": int(opts.nbest_beam_size)}
    if opts.nbest_token_prune_logp is not None:
        options["token_prune_min_logp"] = float(opts.nbest_token_prune_logp)
    return options


def build_model(hparams: Dict):
    """An :class:`EarlyExitCTCModel` over a recipe's (trained) modules, or an
    :class:`EarlyExitAEDModel` when the recipe has attention ``decoders``."""
    parts = (hparams["compute_features"], hparams["normalize"], hparams["encoder"], hparams["ctc_heads"])
    if not uses_decoders(hparams):
        return EarlyExitCTCModel(*parts)
    return EarlyExitAEDModel(*parts, hparams["decoders"], **AEDSearchOptions.from_hparams(hparams).searcher_kwargs())


def features_config(hparams: Dict) -> Dict:
    """Fbank arguments of a recipe, for the exported inference YAML (SSL recipes: the
    waveform front end's own ``config``)."""
    features = hparams["compute_features"]
    if hasattr(features, "config"):
        return {"sample_rate": int(hparams["sample_rate"]), **features.config}
    return {
        "sample_rate": int(hparams["sample_rate"]),
        "n_fft": int(hparams["compute_features"].compute_STFT.n_fft),
        "n_mels": int(hparams["n_mels"]),
        "hop_length": float(hparams["hop_length"]),
        "win_length": float(hparams["win_length"]),
    }


def run_policy_evaluation(
    hparams: Dict, tokenizer, valid_data, test_datasets: Dict, tokenizer_path: str, controller_data=None
) -> Dict:
    """Measure latency, train the exit controller, calibrate on dev, sweep the policies on the test
    sets, export the model.

    ``tokenizer`` is a SentencePieceProcessor; ``controller_data`` the held-out utterances the
    learned exit controller is trained on (``controller_csv``; needed with ``exit_controller``).
    Returns the fields added to report.json: ``policies``, ``calibration``, ``depth_matched``,
    ``latency_table``, ``inference_folder`` and, with the controller, ``controller``.
    """

    opts = PolicyEvaluationOptions.from_hparams(hparams)
    if "learned" in opts.policy_sweep and not opts.exit_controller:
        raise ConfigError("key 'policy_sweep': 'learned' needs exit_controller: True")
    if opts.default_policy == "learned" and not opts.exit_controller:
        raise ConfigError("key 'default_policy': 'learned' needs exit_controller: True")
    if opts.exit_controller and controller_data is None:
        raise ConfigError(
            "key 'exit_controller': the learned exit controller is trained on held-out utterances; "
            "set 'controller_csv' to a manifest of utterances neither trained on nor tested on "
            "(docs/exit_policies.md)"
        )
    model = build_model(hparams).to("cpu").eval()
    fused = model.has_decoders and model.fuses_lm
    if fused:  # the attention search fuses the recipe's word n-gram
        model.use_lm(hparams.get("ctc_lm_path"), tokenizer_pieces(tokenizer))
    blank = int(hparams["blank_index"])
    sample_rate = int(hparams["sample_rate"])
    logger.info("Measuring the per-exit latency table (batch 1, %d threads)", torch.get_num_threads())
    table = measure_latency_table(model, sample_rate, opts.latency_durations)
    vocab = model.heads.heads[0].out_features
    scorers = build_scorers(
        tokenizer,
        vocab,
        blank,
        opts.nbest_beam_size,
        opts.entropy_normalize,
        opts.posterior_greedy_form,
        opts.nbest_token_prune_logp,
    )
    scorers = {n: s for n, s in scorers.items() if n in opts.policy_sweep}
    sweep = list(opts.policy_sweep)
    decoding = report_decoding(hparams)
    decoder = None
    if decoding["decoder"] in CTC_DECODERS and not model.has_decoders:
        decoder = CTCDecoder(decoding["decoder"], tokenizer, vocab, blank, decoding["options"])
    controller = None
    if opts.exit_controller and model.num_exits > 1:
        controller = train_exit_controller(model, controller_data, tokenizer, blank, sample_rate, decoder, opts)
        scorers["learned"] = LearnedPolicy(0.5, controller)
        if "learned" not in sweep:
            sweep.append("learned")
    dev = collect_exit_outputs(
        model,
        valid_data,
        tokenizer,
        scorers,
        blank,
        sample_rate,
        "dev exits",
        decoder=decoder,
        keep_features=controller is not None,
    )
    if controller is not None:
        record_stop_auc(controller, dev, "dev")
    sets = {
        name: collect_exit_outputs(model, ds, tokenizer, scorers, blank, sample_rate, f"{name} exits", decoder=decoder)
        for name, ds in test_datasets.items()
    }
    result = evaluate_policies(
        dev,
        sets,
        scorers,
        table,
        sweep,
        opts.calibration_target,
        float(opts.calibration_value),
        int(opts.sweep_points),
        opts.calibration_confidence,
    )
    thresholds = {n: c["threshold"] for n, c in result["calibration"]["thresholds"].items()}
    default = choose_default_policy(opts.default_policy, result["calibration"]["thresholds"])
    stored = PolicyBundle(
        default=default or {"policy": "fixed", "exit": model.num_exits},
        thresholds=thresholds,
        options={
            "entropy": {"normalize": bool(opts.entropy_normalize)},
            "posterior_greedy": {"form": opts.posterior_greedy_form},
            "posterior": nbest_options(opts),
        },
        calibration=result["calibration"],
        decoding=stored_decoding(decoding, decoder),
        controller=controller,
    )
    lm_path = decoder.options.lm_path if decoder is not None else model.lm["lm_path"] if fused else None
    folder = export_inference_folder(
        os.path.join(hparams["output_folder"], "inference"),
        model,
        features_config(hparams),
        tokenizer_path,
        blank,
        stored.to_json(),
        table,
        lm_path=lm_path,
    )
    result["decoding"] = stored.decoding
    result["default_policy"] = stored.default
    if controller is not None:
        result["controller"] = controller_summary(controller, dev, sets)
    result["latency_table"] = table.to_json()
    result["inference_folder"] = folder
    return result


def train_exit_controller(model, dataset, tokenizer, blank: int, sample_rate: int, decoder, opts):
    """Record every exit of the held-out ``dataset`` (hypotheses from the report's decoder, the
    controller's features) and fit the learned exit controller on them, the recogniser frozen."""
    held = collect_exit_outputs(
        model, dataset, tokenizer, {}, blank, sample_rate, "controller exits", decoder=decoder, keep_features=True
    )
    if len(held.ids) < 20:
        raise ValueError(
            f"controller_csv: {len(held.ids)} utterances are too few to train the exit controller (at least 20)"
        )
    logger.info(
        "Training the exit controller on %d held-out utterances (WER per exit: %s)",
        len(held.ids),
        ", ".join(f"{100.0 * float(e.sum() / held.ref_words.sum()):.2f}" for e in held.errors.T),
    )
    weights = fit_controller(
        held.features,
        controller_labels(opts.controller_target, held.errors, held.hyps),
        blank,
        hidden_units=int(opts.controller_hidden_units),
        weight_decay=float(opts.controller_weight_decay),
        reads_states=bool(opts.controller_reads_states),
        target=opts.controller_target,
    )
    weights.training["held_out_wer"] = [
        round(100.0 * float(e.sum() / held.ref_words.sum().clamp(min=1)), 2) for e in held.errors.T
    ]
    record_stop_auc(weights, held, "held_out")
    return weights


def record_stop_auc(weights, out: ExitOutputs, name: str) -> None:
    """Add, per exit, the share of ``out``'s utterances whose stop is free (no more word errors
    than at the last exit) and the AUC of the controller's ranking of them to its training record
    as ``{name}_stop_is_free`` and ``{name}_auc``: whatever its target, this is what a stop costs."""
    labels = stop_labels(out.errors)
    for k, row in enumerate(weights.training["exits"]):
        p = controller_probability(weights, k, out.features[k])
        row[f"{name}_auc"] = None if (a := auc(p, labels[:, k])) is None else round(a, 4)
        row[f"{name}_stop_is_free"] = round(float(labels[:, k].mean()), 4)


def controller_summary(weights, dev: ExitOutputs, sets: Dict[str, ExitOutputs]) -> Dict:
    """report.json's ``controller``: its size, its training record, and the time of its decisions
    against the encoder time to each exit (per set, summed over utterances)."""
    cost = {}
    for name, out in {"dev": dev, **sets}.items():
        if "learned" not in out.policy_ms:
            continue
        segment = torch.diff(out.exit_ms, dim=1, prepend=torch.zeros(len(out.ids), 1, dtype=out.exit_ms.dtype))
        share = out.policy_ms["learned"][:, :-1].sum(0) / segment[:, :-1].sum(0).clamp(min=1e-9)
        cost[name] = [round(float(v), 4) for v in share]
    return {
        "parameters": parameter_count(weights),
        "bytes_float32": 4 * parameter_count(weights),
        "reads_states": weights.reads_states,
        "training": weights.training,
        "decision_time_share": cost,
    }


def choose_default_policy(configured: str, calibrated: Dict[str, Dict]) -> Dict:
    """The stored default policy: the learned policy when it computes fewer layers on dev at its
    calibrated threshold than every other calibrated policy (ties: fewer dev errors), else the
    configured ``default_policy`` (the last exit when that one was not calibrated)."""
    learned = calibrated.get("learned")
    others = [c for n, c in calibrated.items() if n != "learned"]
    if learned is not None and all(
        (learned["dev"]["avg_layers"], learned["dev"]["wer"]) < (c["dev"]["avg_layers"], c["dev"]["wer"])
        for c in others
    ):
        return {"policy": "learned", "threshold": learned["threshold"]}
    if configured in calibrated:
        return {"policy": configured, "threshold": calibrated[configured]["threshold"]}
    return None  # the caller stores the last exit
