"""WER-vs-compute evaluation of exit policies, and threshold calibration on dev.

Every utterance is run once at batch 1 (as a device transcribing one request
would), through every exit, recording for each exit the hypothesis (greedy CTC;
an AED model's joint CTC/attention beam search), its word errors, the
cumulative milliseconds from the waveform to that exit (the encoder; the
decoding after it is not included),
and each confidence policy's score and the time it took to compute. A policy
decision for an utterance depends only on that utterance's own per-exit
scores, so the exit any threshold would choose, and the resulting WER, depth
and time, follow exactly from these records: a sweep over thresholds costs no
further passes. (``tests/unit/test_exits.py`` checks that the simulated choice
equals a real dynamic run.)
"""

import logging
import os
import time
import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from speechbrain.utils.edit_distance import wer_details_for_batch
from tqdm import tqdm

from .decoding.attention import AEDSearchOptions
from .models.pipeline import EarlyExitAEDModel
from .latency import timed_exits
from .utils import tokenizer_pieces, tokens_to_text, uses_decoders
from .decoding.ctc import CTC_DECODERS, CTCDecoder, CTCDecodingOptions, make_ctc_beam_searcher
from .policies import (BudgetPolicy, ConfidencePolicy, EntropyPolicy, GreedyPosteriorPolicy, NBestPosteriorPolicy, oracle_exits)
from .latency import LatencyTable
from .decoding.attention import decode_states
from .export import export_inference_folder
from .options import is_int, is_num, option, Options
from .latency import measure_latency_table
from .models.pipeline import EarlyExitCTCModel

logger = logging.getLogger(__name__)

@dataclass
class ExitOutputs:
    """Per-utterance, per-exit records of one evaluation set (``U`` utterances, ``K`` exits)."""

    ids: List[str]
    durations: torch.Tensor               # (U,) seconds
    ref_words: torch.Tensor               # (U,) reference words
    errors: torch.Tensor                  # (U, K) word edits of each exit's hypothesis
    hyps: List[List[str]]                 # [u][k] hypothesis text
    exit_ms: torch.Tensor                 # (U, K) cumulative ms from waveform to exit k
    exit_layers: List[int]
    scores: Dict[str, torch.Tensor] = field(default_factory=dict)     # name -> (U, K)
    policy_ms: Dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (U, K)
    compute_layers: Optional[List[int]] = None  # layers computed to each exit (None: exit_layers)

    @property
    def num_exits(self) -> int:
        return len(self.exit_layers)


def build_scorers(tokenizer, vocab_size: int, blank_index: int = 0, beam_size: int = 10,
                  entropy_normalize: bool = True, greedy_form: str = "mean",
                  token_prune_min_logp: Optional[float] = None) -> Dict[str, ConfidencePolicy]:
    """The confidence policies whose scores are recorded (thresholds set later)."""
    return {
        "entropy": EntropyPolicy(0.5, normalize=entropy_normalize, vocab_size=vocab_size),
        "posterior": NBestPosteriorPolicy(
            0.5, make_ctc_beam_searcher(tokenizer, vocab_size, blank_index, beam_size,
                                        token_prune_min_logp=token_prune_min_logp)),
        "posterior_greedy": GreedyPosteriorPolicy(0.5, form=greedy_form),
    }


@torch.no_grad()
def collect_exit_outputs(model, dataset, tokenizer, scorers: Dict[str, ConfidencePolicy],
                         blank_index: int = 0, sample_rate: int = 16000,
                         desc: str = "exits", decode_batch: int = 16,
                         decoder: Optional[CTCDecoder] = None) -> ExitOutputs:
    """Run every utterance of ``dataset`` (items with ``id``, ``sig``, ``wrd``) through every exit.

    A CTC model's hypotheses come from ``decoder`` (default: greedy CTC).

    An :class:`EarlyExitAEDModel`'s hypotheses come from each exit's joint
    CTC/attention beam search, run on the batch-1 encoder states in batches of
    ``decode_batch`` utterances (the search is the slow part; batching it
    does not change the timed encoder passes).
    """
    model.eval()
    device = next(model.parameters()).device
    num_exits = model.num_exits
    aed = model.has_decoders
    if decoder is None:
        decoder = CTCDecoder("ctc_greedy", tokenizer, model.heads.heads[0].out_features, blank_index)
    ids, durations, hyps, refs, exit_ms = [], [], [], [], []
    scores = {name: [] for name in scorers}
    policy_ms = {name: [] for name in scorers}
    pending: List = []  # AED: (utterance index, per-exit encoder states) awaiting decoding

    def decode_pending():
        for k in range(num_exits):
            for (u, _), tokens in zip(pending, decode_states(model, k, [h[k][0] for _, h in pending])):
                hyps[u][k] = tokens_to_text(tokenizer, tokens)
        pending.clear()

    for item in tqdm(dataset, desc=desc, dynamic_ncols=True):
        wav = item["sig"].to(device)[None]
        lens = torch.ones(1, device=device)
        times, log_probs, hiddens = timed_exits(model, wav, lens, keep_hidden=True)
        ids.append(item["id"])
        durations.append(wav.shape[1] / sample_rate)
        exit_ms.append(times)
        refs.append(item["wrd"])
        if aed:
            hyps.append([""] * num_exits)
            pending.append((len(hyps) - 1, hiddens))
            if len(pending) == decode_batch:
                decode_pending()
        else:
            hyps.append([decoder(lp, lens)[0] for lp in log_probs])
        for name, scorer in scorers.items():
            row, row_ms = [], []
            for k in range(num_exits):
                if k == num_exits - 1:  # the last exit always stops: no decision
                    row.append(float("nan"))
                    row_ms.append(0.0)
                    continue
                start = time.perf_counter()
                row.append(float(scorer.score(log_probs[k], lens)[0]))
                row_ms.append((time.perf_counter() - start) * 1000.0)
            scores[name].append(row)
            policy_ms[name].append(row_ms)
    if pending:
        decode_pending()
    ref_words = [r.split() for r in refs]
    errors = [[d["num_edits"] for d in wer_details_for_batch(ids, ref_words, [h[k].split() for h in hyps])]
              for k in range(num_exits)]
    return ExitOutputs(
        ids=ids,
        durations=torch.tensor(durations, dtype=torch.float64),
        ref_words=torch.tensor([len(r) for r in ref_words], dtype=torch.float64),
        errors=torch.tensor(errors, dtype=torch.float64).T.contiguous(),
        hyps=hyps,
        exit_ms=torch.tensor(exit_ms, dtype=torch.float64),
        exit_layers=list(model.exit_layers),
        compute_layers=list(model.exit_compute_layers),
        scores={n: torch.tensor(v, dtype=torch.float64) for n, v in scores.items()},
        policy_ms={n: torch.tensor(v, dtype=torch.float64) for n, v in policy_ms.items()},
    )


# ------------------------------------------------------------------ simulation
def first_stop(stop: torch.Tensor) -> torch.Tensor:
    """0-based exit per utterance from a ``(U, K)`` stop matrix (the last exit always stops)."""
    stop = stop.clone()
    stop[:, -1] = True
    return stop.to(torch.int8).argmax(1)


def confidence_exits(outputs: ExitOutputs, scorer: ConfidencePolicy, name: str,
                     threshold: float) -> torch.Tensor:
    """Exits chosen by a confidence policy at ``threshold``."""
    scores = outputs.scores[name]
    return first_stop(scorer.stops(scores.nan_to_num(0.0), threshold))


def summarize(outputs: ExitOutputs, exits: torch.Tensor, overhead: Optional[str] = None) -> Dict:
    """WER, average layers computed (``compute_layers``: a Splitformer's branches included), average
    exit and seconds (encoder to the exit plus policy decisions)."""
    rows = torch.arange(len(exits))
    wer = 100.0 * float(outputs.errors[rows, exits].sum() / outputs.ref_words.sum().clamp(min=1))
    layers = torch.tensor(outputs.compute_layers or outputs.exit_layers, dtype=torch.float64)[exits]
    ms = outputs.exit_ms[rows, exits]
    if overhead is not None:
        taken = torch.arange(outputs.num_exits)[None, :] <= exits[:, None]
        ms = ms + (outputs.policy_ms[overhead] * taken).sum(1)
    return {"wer": round(wer, 2), "avg_layers": round(float(layers.mean()), 3),
            "avg_exit": round(float((exits + 1).double().mean()), 3),
            "seconds": round(float(ms.sum()) / 1000.0, 3)}


def candidate_thresholds(outputs: ExitOutputs, name: str) -> torch.Tensor:
    """Every distinct score at the exits where a decision is made."""
    scores = outputs.scores[name][:, :-1].flatten()
    return torch.unique(scores[~torch.isnan(scores)])


def threshold_points(outputs: ExitOutputs, scorer: ConfidencePolicy, name: str,
                     thresholds: Sequence[float]) -> List:
    """``[(threshold, summary, exits), ...]`` of a confidence policy, decision time included
    in the summary; ``exits`` (each utterance's chosen exit) is kept for the bootstrap."""
    points = []
    for thr in thresholds:
        exits = confidence_exits(outputs, scorer, name, thr)
        points.append((thr, summarize(outputs, exits, overhead=name), exits))
    return points


class WerIncreaseBootstrap:
    """Paired bootstrap over utterances of the WER increase (points) over the last exit.

    The same ``resamples`` draws of the utterances (with replacement, fixed
    ``seed``) serve every threshold, so two thresholds are compared on the same
    resampled dev sets.
    """

    def __init__(self, outputs: ExitOutputs, resamples: int = 1000, seed: int = 0):
        n = len(outputs.ids)
        gen = torch.Generator().manual_seed(seed)
        draws = torch.randint(0, max(n, 1), (resamples, n), generator=gen)  # n = 0: no draws
        self.counts = torch.zeros(resamples, n, dtype=torch.float64)
        self.counts.scatter_add_(1, draws, torch.ones(resamples, n, dtype=torch.float64))
        self.outputs = outputs
        self.words = (self.counts @ outputs.ref_words).clamp(min=1)

    def increases(self, exits: torch.Tensor) -> torch.Tensor:
        """``(resamples,)`` WER increases of the choice ``exits`` over the last exit."""
        out = self.outputs
        diff = out.errors[torch.arange(len(exits)), exits] - out.errors[:, -1]
        return 100.0 * (self.counts @ diff) / self.words

    def quantile(self, exits: torch.Tensor, q: float) -> float:
        return float(torch.quantile(self.increases(exits), q))


def calibrate(outputs: ExitOutputs, scorer: ConfidencePolicy, name: str,
              target: str = "max_wer_increase", value: float = 1.0,
              confidence: Optional[float] = None, resamples: int = 1000) -> Dict:
    """Pick a confidence policy's threshold on a dev set.

    ``max_wer_increase``: going from the most conservative threshold towards
    the most aggressive one, the threshold with the fewest average layers before
    the first whose WER is more than ``value`` points above the last exit's (a
    threshold beyond one that breaks the target is not taken even when the dev
    WER dips back within it: such dips are noise on a small dev set, measured in
    docs/performance.md). With ``confidence`` (in (0, 1)), a threshold breaks
    the target when the ``confidence`` quantile of its WER increase under a
    paired bootstrap over the dev utterances exceeds ``value``, rather than the
    increase measured on dev itself: the target then holds on resampled dev sets
    with that probability, at the cost of depth. ``avg_layers`` ignores
    ``confidence`` and takes the
    threshold with the lowest WER whose average depth is at most ``value``
    layers. Ties go to the more conservative threshold (deeper). When no
    threshold meets ``max_wer_increase`` (scores at the top of the range always
    stop), the one with the lowest WER is taken, with a warning.

    The result carries ``dev_increase_interval``: the 5% and 95% bootstrap
    quantiles of the chosen threshold's dev WER increase over the last exit.
    """
    if confidence is not None and not 0.0 < confidence < 1.0:
        raise ValueError(f"calibration_confidence must be null or a number in (0, 1), got {confidence!r}")
    last = summarize(outputs, torch.full((len(outputs.ids),), outputs.num_exits - 1))
    never = scorer.valid_range[1] if scorer.higher_is_confident else scorer.valid_range[0]
    points = threshold_points(outputs, scorer, name, [never] + candidate_thresholds(outputs, name).tolist())
    boot = WerIncreaseBootstrap(outputs, resamples)
    if target == "max_wer_increase":
        ok = []
        for point in sorted(points, key=lambda p: p[0], reverse=scorer.higher_is_confident):
            if confidence is None:
                increase = point[1]["wer"] - last["wer"]
            else:
                increase = boot.quantile(point[2], confidence)
            if increase > value + 1e-9:
                break
            ok.append(point)
        if ok:
            best_thr, best, best_exits = min(ok, key=lambda p: (p[1]["avg_layers"], p[1]["wer"]))
        else:
            # Even the most conservative threshold stops some utterances early: scores at
            # the top of the policy's range (an N-best posterior of exactly 1 when the beam
            # holds one hypothesis) always stop. Take the lowest dev WER, deeper on ties.
            best_thr, best, best_exits = min(points, key=lambda p: (p[1]["wer"], -p[1]["avg_layers"]))
            logger.warning("%s: no threshold keeps the dev WER within %.2f points of the last "
                           "exit (%.2f)%s; using %.4g (dev WER %.2f)", name, value, last["wer"],
                           "" if confidence is None else f" at confidence {confidence}",
                           best_thr, best["wer"])
    elif target == "avg_layers":
        ok = [p for p in points if p[1]["avg_layers"] <= value + 1e-9]
        if ok:
            best_thr, best, best_exits = min(ok, key=lambda p: (p[1]["wer"], -p[1]["avg_layers"]))
        else:  # the target is below the first exit: stop as early as the policy can
            best_thr, best, best_exits = min(points, key=lambda p: (p[1]["avg_layers"], p[1]["wer"]))
    else:
        raise ValueError(f"calibration_target: accepted values are 'max_wer_increase' and "
                         f"'avg_layers', got {target!r}")
    increases = boot.increases(best_exits)
    interval = [round(float(torch.quantile(increases, q)), 2) for q in (0.05, 0.95)]
    return {"threshold": float(best_thr), "dev": best, "dev_last_exit": last,
            "dev_increase_interval": interval}


def sweep_thresholds(outputs: ExitOutputs, name: str, points: int) -> List[float]:
    """``points`` thresholds spread over the dev scores' quantiles."""
    cands = candidate_thresholds(outputs, name)
    if len(cands) == 0:
        return []
    qs = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    return sorted({round(float(v), 6) for v in torch.quantile(cands, qs)})


def budget_sweep(outputs: ExitOutputs, table: LatencyTable, points: int) -> List[float]:
    """Budgets (ms) spanning the predicted cost of the first to the last exit."""
    low = float(table.predict_ms(0, outputs.durations).min())
    high = float(table.predict_ms(table.num_exits - 1, outputs.durations).max())
    return [round(v, 3) for v in torch.linspace(low, high, points).tolist()]


def nearest_depth(outputs: ExitOutputs, scorer: ConfidencePolicy, name: str, avg_layers: float) -> Dict:
    """The point of a policy whose average depth is closest to ``avg_layers`` (then lowest WER)."""
    points = threshold_points(outputs, scorer, name, candidate_thresholds(outputs, name).tolist())
    if not points:
        return {}
    thr, point, _ = min(points, key=lambda p: (abs(p[1]["avg_layers"] - avg_layers), p[1]["wer"]))
    return {"threshold": thr, **point}


def evaluate_policies(dev: ExitOutputs, sets: Dict[str, ExitOutputs],
                      scorers: Dict[str, ConfidencePolicy], latency_table: Optional[LatencyTable],
                      policies: Sequence[str] = ("entropy", "posterior", "posterior_greedy", "budget"),
                      target: str = "max_wer_increase", value: float = 1.0,
                      sweep_points: int = 9, confidence: Optional[float] = None) -> Dict:
    """Calibrate on ``dev``, then sweep every policy on every set.

    Returns ``{"policies": [...], "calibration": {...}, "depth_matched": {...}}``
    where each policy entry is ``{"policy", "threshold", "calibrated", "sets":
    {set: {"wer", "avg_layers", "avg_exit", "seconds"}}}`` (``exit`` for fixed
    exits; ``threshold`` is ms for ``budget`` and None for ``fixed``/``oracle``).
    """
    entries: List[Dict] = []

    def add(policy, threshold, exits_for, calibrated=False, overhead=None, **extra):
        entry = {"policy": policy, "threshold": threshold, "calibrated": calibrated, **extra,
                 "sets": {}}
        for set_name, out in sets.items():
            entry["sets"][set_name] = summarize(out, exits_for(out), overhead=overhead)
        entries.append(entry)

    for k in range(dev.num_exits):
        add("fixed", None, lambda out, k=k: torch.full((len(out.ids),), k), exit=k + 1)
    add("oracle", None, lambda out: torch.tensor(oracle_exits(out.hyps)))

    calibration = {"target": target, "value": value,
                   "confidence": confidence if target == "max_wer_increase" else None,
                   "thresholds": {}}
    for name in policies:
        if name == "budget":
            if latency_table is None:
                continue
            for budget in budget_sweep(dev, latency_table, sweep_points):
                policy = BudgetPolicy(max(budget, 1e-6), latency_table)
                add("budget", budget, lambda out, p=policy: p.chosen_exits(out.durations))
            continue
        if name not in scorers:
            raise ValueError(f"policy_sweep: unknown policy {name!r}; accepted: "
                             f"{', '.join(list(scorers) + ['budget'])}")
        scorer = scorers[name]
        cal = calibrate(dev, scorer, name, target, value, confidence)
        calibration["thresholds"][name] = cal
        thresholds = {t for t in sweep_thresholds(dev, name, sweep_points)
                      if abs(t - cal["threshold"]) > 1e-5} | {cal["threshold"]}
        for thr in sorted(thresholds):
            add(name, thr, lambda out, t=thr, s=scorer, n=name: confidence_exits(out, s, n, t),
                calibrated=thr == cal["threshold"], overhead=name)

    depth_matched = {}
    if "posterior" in calibration["thresholds"]:
        ref_thr = calibration["thresholds"]["posterior"]["threshold"]
        for set_name, out in sets.items():
            ref = summarize(out, confidence_exits(out, scorers["posterior"], "posterior", ref_thr),
                            overhead="posterior")
            row = {"posterior": {"threshold": ref_thr, **ref}}
            for name in calibration["thresholds"]:
                if name != "posterior":
                    row[name] = nearest_depth(out, scorers[name], name, ref["avg_layers"])
            depth_matched[set_name] = row
    return {"policies": entries, "calibration": calibration, "depth_matched": depth_matched}


# ------------------------------------------------------------ orchestration
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
        "policy_sweep", list(SWEEPABLE_POLICIES),
        lambda v: isinstance(v, list) and all(p in SWEEPABLE_POLICIES for p in v),
        "a list of policies among " + ", ".join(repr(p) for p in SWEEPABLE_POLICIES))
    sweep_points: int = option("sweep_points", 9, lambda v: is_int(v) and v >= 2, "an integer >= 2")
    calibration_target: str = option("calibration_target", "max_wer_increase",
                                     lambda v: v in ("max_wer_increase", "avg_layers"),
                                     "'max_wer_increase' or 'avg_layers'")
    calibration_value: float = option("calibration_value", 1.0, lambda v: is_num(v) and v >= 0, "a number >= 0")
    calibration_confidence: Optional[float] = option(
        "calibration_confidence", None, lambda v: v is None or (is_num(v) and 0 < v < 1), "null or a number in (0, 1)")
    default_policy: str = option("default_policy", "posterior", lambda v: v in CALIBRATED_POLICIES,
                                 "one of " + ", ".join(repr(p) for p in CALIBRATED_POLICIES))
    nbest_beam_size: int = option("nbest_beam_size", 10, lambda v: is_int(v) and v >= 2, "an integer >= 2")
    nbest_token_prune_logp: Optional[float] = option(
        "nbest_token_prune_logp", None, lambda v: v is None or (is_num(v) and v < 0),
        "null or a negative number (a log-probability)")
    entropy_normalize: bool = option("entropy_normalize", True, lambda v: isinstance(v, bool), "true or false")
    posterior_greedy_form: str = option("posterior_greedy_form", "mean", lambda v: v in ("mean", "geometric"),
                                        "'mean' or 'geometric'")
    latency_durations: List[float] = option(
        "latency_durations", [2.0, 5.0, 10.0, 20.0],
        lambda v: isinstance(v, list) and len(v) >= 2 and all(is_num(d) and d > 0 for d in v),
        "a list of at least two durations in seconds > 0")


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
    return {"decoder": "ctc_beam", "beam_size": int(o.beam_size), "lm": o.lm_path is not None,
            "alpha": float(o.alpha), "beta": float(o.beta)}


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
    parts = (hparams["compute_features"], hparams["normalize"], hparams["encoder"],
             hparams["ctc_heads"])
    if not uses_decoders(hparams):
        return EarlyExitCTCModel(*parts)
    return EarlyExitAEDModel(*parts, hparams["decoders"], **AEDSearchOptions.from_hparams(hparams).searcher_kwargs())


def features_config(hparams: Dict) -> Dict:
    """Fbank arguments of a recipe, for the exported inference YAML (SSL recipes: the
    waveform front end's own ``config``)."""
    features = hparams["compute_features"]
    if hasattr(features, "config"):
        return {"sample_rate": int(hparams["sample_rate"]), **features.config}
    return {"sample_rate": int(hparams["sample_rate"]),
            "n_fft": int(hparams["compute_features"].compute_STFT.n_fft),
            "n_mels": int(hparams["n_mels"]), "hop_length": float(hparams["hop_length"]),
            "win_length": float(hparams["win_length"])}


def run_policy_evaluation(hparams: Dict, tokenizer, valid_data, test_datasets: Dict,
                          tokenizer_path: str) -> Dict:
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
    scorers = build_scorers(tokenizer, vocab, blank, opts.nbest_beam_size,
                            opts.entropy_normalize, opts.posterior_greedy_form,
                            opts.nbest_token_prune_logp)
    scorers = {n: s for n, s in scorers.items() if n in opts.policy_sweep}
    decoding = report_decoding(hparams)
    decoder = None
    if decoding["decoder"] in CTC_DECODERS and not model.has_decoders:
        decoder = CTCDecoder(decoding["decoder"], tokenizer, vocab, blank, decoding["options"])
    dev = collect_exit_outputs(model, valid_data, tokenizer, scorers, blank, sample_rate, "dev exits",
                               decoder=decoder)
    sets = {name: collect_exit_outputs(model, ds, tokenizer, scorers, blank, sample_rate,
                                       f"{name} exits", decoder=decoder)
            for name, ds in test_datasets.items()}
    result = evaluate_policies(dev, sets, scorers, table, opts.policy_sweep,
                               opts.calibration_target, float(opts.calibration_value),
                               int(opts.sweep_points), opts.calibration_confidence)
    thresholds = {n: c["threshold"] for n, c in result["calibration"]["thresholds"].items()}
    default = opts.default_policy
    stored = {
        "default": ({"policy": default, "threshold": thresholds[default]} if default in thresholds
                    else {"policy": "fixed", "exit": model.num_exits}),
        "thresholds": thresholds,
        "options": {"entropy": {"normalize": bool(opts.entropy_normalize)},
                    "posterior_greedy": {"form": opts.posterior_greedy_form},
                    "posterior": nbest_options(opts)},
        "calibration": result["calibration"],
        "decoding": stored_decoding(decoding, decoder),
    }
    lm_path = (decoder.options.lm_path if decoder is not None
               else model.lm["lm_path"] if fused else None)
    folder = export_inference_folder(os.path.join(hparams["output_folder"], "inference"), model,
                                     features_config(hparams), tokenizer_path, blank, stored, table,
                                     lm_path=lm_path)
    result["decoding"] = stored["decoding"]
    result["latency_table"] = table.to_json()
    result["inference_folder"] = folder
    return result
