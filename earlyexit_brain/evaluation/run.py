"""The policy evaluation a recipe runs after training: options, model, records, calibration, export."""

import dataclasses
import logging
import os
from typing import Dict, List, Optional

import torch

from ..decoding.attention import AEDSearchOptions
from ..decoding.ctc import CTC_DECODERS, CTCDecoder, CTCDecodingOptions
from ..export import export_inference_folder
from ..latency import measure_latency_table
from ..models.pipeline import EarlyExitAEDModel, EarlyExitCTCModel
from ..options import is_int, is_num, option, Options
from ..policy_bundle import PolicyBundle
from ..utils import tokenizer_pieces, uses_decoders
from .calibration import evaluate_policies
from .exit_outputs import build_scorers, collect_exit_outputs

logger = logging.getLogger(__name__)


#: The policies whose threshold is calibrated on dev, and those the sweep can run.
CALIBRATED_POLICIES = ("entropy", "posterior", "posterior_greedy")
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
        The policy ``EarlyExitASR`` uses by default (``default_policy``).
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
    """

    policy_sweep: List[str] = option(
        "policy_sweep",
        list(SWEEPABLE_POLICIES),
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


def run_policy_evaluation(hparams: Dict, tokenizer, valid_data, test_datasets: Dict, tokenizer_path: str) -> Dict:
    """Measure latency, calibrate on dev, sweep the policies on the test sets, export the model.

    ``tokenizer`` is a SentencePieceProcessor. Returns the fields added to
    report.json: ``policies``, ``calibration``, ``depth_matched``,
    ``latency_table`` and ``inference_folder``.
    """

    opts = PolicyEvaluationOptions.from_hparams(hparams)
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
    decoding = report_decoding(hparams)
    decoder = None
    if decoding["decoder"] in CTC_DECODERS and not model.has_decoders:
        decoder = CTCDecoder(decoding["decoder"], tokenizer, vocab, blank, decoding["options"])
    dev = collect_exit_outputs(model, valid_data, tokenizer, scorers, blank, sample_rate, "dev exits", decoder=decoder)
    sets = {
        name: collect_exit_outputs(model, ds, tokenizer, scorers, blank, sample_rate, f"{name} exits", decoder=decoder)
        for name, ds in test_datasets.items()
    }
    result = evaluate_policies(
        dev,
        sets,
        scorers,
        table,
        opts.policy_sweep,
        opts.calibration_target,
        float(opts.calibration_value),
        int(opts.sweep_points),
        opts.calibration_confidence,
    )
    thresholds = {n: c["threshold"] for n, c in result["calibration"]["thresholds"].items()}
    default = opts.default_policy
    stored = PolicyBundle(
        default=(
            {"policy": default, "threshold": thresholds[default]}
            if default in thresholds
            else {"policy": "fixed", "exit": model.num_exits}
        ),
        thresholds=thresholds,
        options={
            "entropy": {"normalize": bool(opts.entropy_normalize)},
            "posterior_greedy": {"form": opts.posterior_greedy_form},
            "posterior": nbest_options(opts),
        },
        calibration=result["calibration"],
        decoding=stored_decoding(decoding, decoder),
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
    result["latency_table"] = table.to_json()
    result["inference_folder"] = folder
    return result
