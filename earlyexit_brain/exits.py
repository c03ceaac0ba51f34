"""Exit-selection policies and truly dynamic early-exit inference.

A policy looks at one exit's CTC log-probabilities for a batch and says, per
utterance, whether to stop there::

    stop = policy(exit_index, log_probs, lengths, durations)   # (B,) bool

``exit_index`` is 0-based, ``log_probs`` is ``(B, T, V)``, ``lengths`` are
SpeechBrain relative lengths ``(B,)`` and ``durations`` the audio durations in
seconds ``(B,)`` (only the budget policy needs them). The last exit always
stops. :func:`run_dynamic` drives an encoder's incremental interface
(``start`` / ``advance`` / ``select``) with a policy: utterances that stop leave
the batch, and layers above the deepest exit still needed are never run.
Policies that choose every exit before any layer runs (``fixed``, ``budget``:
:meth:`ExitPolicy.planned_exits`) skip the heads of the exits nobody stops at.

Policies (formulas in docs/exit_policies.md):

* ``fixed``: always exit ``k``;
* ``entropy``: mean frame entropy of the CTC posterior, stop when ``<= threshold``;
* ``posterior``: the paper's N-best utterance posterior (softmax over the
  N-best scores of a CTC beam search, probability of the best), stop when
  ``>= threshold``;
* ``posterior_greedy``: the cheap greedy form (mean, or geometric mean, over
  frames of the best path's posterior), stop when ``>= threshold``;
* ``budget``: the deepest exit whose measured latency fits a budget in ms;
* ``oracle`` (analysis only): the shallowest exit whose hypothesis equals the
  last exit's, see :func:`oracle_exits`.
"""

import json
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from speechbrain.decoders import ctc_greedy_decode

from .ngram import check_lm_file, is_kenlm_binary
from .files import atomic_write_text
from .utils import padding_mask, tokenizer_pieces, tokens_to_text, valid_frames

POLICY_NAMES = ("fixed", "entropy", "posterior", "posterior_greedy", "budget", "oracle")


def frame_mask(log_probs: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """``(B, T)`` float mask of valid frames."""
    frames = valid_frames(log_probs, lengths)
    return (~padding_mask(frames, log_probs.shape[1])).to(log_probs.dtype)


def check_threshold(name: str, threshold, low: float, high: float):
    """Raise a ValueError naming ``threshold`` unless ``low <= threshold <= high``."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise ValueError(f"threshold: the {name} policy needs a number in [{low}, {high}], "
                         f"got {threshold!r}")
    if not low <= threshold <= high:
        raise ValueError(f"threshold: {threshold} is outside the {name} policy's valid range "
                         f"[{low}, {high}]")
    return float(threshold)


class ExitPolicy:
    """Base class: ``policy(exit_index, log_probs, lengths, durations) -> (B,) bool``."""

    name = "policy"

    def __call__(self, exit_index: int, log_probs: torch.Tensor, lengths: Optional[torch.Tensor],
                 durations: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    def planned_exits(self, batch: int, durations: Optional[torch.Tensor],
                      num_exits: int) -> Optional[torch.Tensor]:
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


def ctc_vocab_list(tokenizer, size: int) -> List[str]:
    """SentencePiece pieces as a CTC beam searcher's vocabulary, padded to ``size``."""
    vocab = tokenizer_pieces(tokenizer)
    vocab += [f"<unused{i}>" for i in range(size - len(vocab))]
    return vocab


def check_token_prune(value) -> float:
    """A CTC beam search's ``token_prune_min_logp``: a negative number (a log-probability)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value < 0:
        raise ValueError(f"token_prune_min_logp: must be a negative log-probability, got {value!r}")
    return float(value)


def make_ctc_beam_searcher(tokenizer, vocab_size: int, blank_index: int = 0,
                           beam_size: int = 10, prefix: bool = False, topk: Optional[int] = None,
                           kenlm_model_path: Optional[str] = None,
                           token_prune_min_logp: Optional[float] = None, **lm_weights):
    """SpeechBrain CTC beam searcher returning the ``topk``-best list (default: the whole beam).

    ``kenlm_model_path``: an n-gram LM (KenLM ``.arpa`` or ``.bin``; needs the
    ``kenlm`` module, from the ``camel-kenlm`` wheels, and ``pygtrie``), weighted by
    ``alpha``/``beta`` in ``lm_weights``. ``token_prune_min_logp``: at each frame the
    search extends its hypotheses only with the tokens whose log-probability is above
    it (and the best token); None keeps SpeechBrain's default (-5).
    """
    from speechbrain.decoders.ctc import CTCBeamSearcher, CTCPrefixBeamSearcher

    if not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size: must be an integer >= 1, got {beam_size!r}")
    if kenlm_model_path is not None:
        check_lm_file(kenlm_model_path)
        try:
            import kenlm  # noqa: F401
            import speechbrain.integrations.decoders.kenlm_scorer  # noqa: F401  (needs pygtrie)
        except ImportError as err:
            raise ValueError(f"ctc_lm_path: decoding with an n-gram LM needs the KenLM bindings and "
                             f"pygtrie (pip install camel-kenlm pygtrie; both are in "
                             f"requirements.txt): {err}") from None
        from speechbrain.integrations.decoders.kenlm_scorer import load_unigram_set_from_arpa

        # the known words for partial-word scoring, whatever the file is called
        # (SpeechBrain reads them only from names ending in .arpa)
        if "unigrams" not in lm_weights and not kenlm_model_path.endswith(".arpa") \
                and not is_kenlm_binary(kenlm_model_path):
            lm_weights["unigrams"] = sorted(load_unigram_set_from_arpa(kenlm_model_path))
    if token_prune_min_logp is not None:
        lm_weights["token_prune_min_logp"] = check_token_prune(token_prune_min_logp)
    cls = CTCPrefixBeamSearcher if prefix else CTCBeamSearcher
    return cls(blank_index=blank_index, vocab_list=ctc_vocab_list(tokenizer, vocab_size),
               space_token="▁", beam_size=beam_size, topk=topk or beam_size,
               kenlm_model_path=kenlm_model_path, **lm_weights)


#: The decoders of CTC exits (:class:`CTCDecoder`).
CTC_DECODERS = ("ctc_greedy", "ctc_beam")

#: How a CTC exit's hypotheses are decoded, with their defaults, and the recipe keys
#: that set them.
CTC_BEAM_DEFAULTS = {"beam_size": 10, "lm_path": None, "alpha": 0.5, "beta": 1.0}
_CTC_BEAM_KEYS = {"beam_size": "ctc_beam_size", "lm_path": "ctc_lm_path", "alpha": "ctc_lm_alpha",
                  "beta": "ctc_lm_beta"}


def ctc_beam_options(get) -> Dict:
    """The CTC beam-search options of a recipe (``get``: ``hparams.get`` or the like)."""
    return {option: get(key, CTC_BEAM_DEFAULTS[option]) for option, key in _CTC_BEAM_KEYS.items()}


class CTCDecoder:
    """Texts of a CTC exit's hypotheses: ``ctc_greedy``, or ``ctc_beam`` (SpeechBrain's CTC
    beam search, ``CTCBeamSearcher``, with a KenLM n-gram when ``lm_path`` names one; its
    word-level LM scoring decodes better than the prefix searcher's, 25.2 vs 30.3% WER on
    the synthetic dev set with the same 3-gram)."""

    def __init__(self, name: str, tokenizer, vocab_size: int, blank_index: int = 0, **beam_options):
        if name not in CTC_DECODERS:
            raise ValueError(f"decoder: {name!r} is not a CTC decoder (ctc_greedy or ctc_beam)")
        self.name, self.tokenizer, self.blank_index = name, tokenizer, blank_index
        self.options = {**CTC_BEAM_DEFAULTS, **beam_options}
        self.searcher = None
        if name == "ctc_beam":
            o = self.options
            self.searcher = make_ctc_beam_searcher(
                tokenizer, vocab_size, blank_index, int(o["beam_size"]), prefix=False, topk=1,
                kenlm_model_path=o["lm_path"], alpha=float(o["alpha"]), beta=float(o["beta"]))

    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> List[str]:
        """``(B, T, V)`` log-probabilities and relative lengths -> B texts."""
        if self.searcher is None:
            ids = ctc_greedy_decode(log_probs, lengths, blank_id=self.blank_index)
            return [tokens_to_text(self.tokenizer, h) for h in ids]
        nbest = self.searcher(log_probs.detach().float().cpu(), lengths.detach().float().cpu())
        return [" ".join(hyps[0].text.split()) if hyps else "" for hyps in nbest]


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


@dataclass
class LatencyTable:
    """Measured latency to reach each exit, as a linear function of audio length.

    ``intercept_ms[k] + ms_per_second[k] * seconds`` predicts the time from the
    waveform to exit ``k``'s log-probabilities at batch 1 on the device where
    the table was measured (front end, layers up to the exit, head).
    """

    intercept_ms: List[float]
    ms_per_second: List[float]
    points: List[Dict]
    device: str = "cpu"
    threads: int = 1

    def predict_ms(self, exit_index: int, seconds) -> torch.Tensor:
        """Predicted milliseconds to reach ``exit_index`` for ``seconds`` of audio."""
        seconds = torch.as_tensor(seconds, dtype=torch.float64)
        return self.intercept_ms[exit_index] + self.ms_per_second[exit_index] * seconds

    @property
    def num_exits(self) -> int:
        return len(self.intercept_ms)

    def to_json(self) -> Dict:
        return {"intercept_ms": self.intercept_ms, "ms_per_second": self.ms_per_second,
                "points": self.points, "device": self.device, "threads": self.threads}

    def save(self, path: str):
        atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str) -> "LatencyTable":
        try:
            with open(path) as fin:
                data = json.load(fin)
            return cls(**data)
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"latency table {path}: cannot be read ({err})") from err


def fit_latency_table(points: List[Dict], device: str = "cpu", threads: int = 1) -> LatencyTable:
    """Least-squares line per exit through ``[{"seconds": s, "ms": [per exit]}, ...]``."""
    xs = torch.tensor([p["seconds"] for p in points], dtype=torch.float64)
    design = torch.stack([torch.ones_like(xs), xs], 1)
    intercepts, slopes = [], []
    for k in range(len(points[0]["ms"])):
        ys = torch.tensor([p["ms"][k] for p in points], dtype=torch.float64)
        coef = torch.linalg.lstsq(design, ys[:, None]).solution[:, 0]
        intercepts.append(round(float(coef[0]), 4))
        slopes.append(round(float(coef[1]), 4))
    return LatencyTable(intercepts, slopes, points, device, threads)


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


def make_policy(name: str, threshold: Optional[float] = None, exit: Optional[int] = None,
                num_exits: Optional[int] = None, searcher=None,
                latency_table: Optional[LatencyTable] = None, **options) -> ExitPolicy:
    """Build a policy by name.

    ``exit`` is 1-based (as in reports); ``threshold`` is the policy's
    threshold (ms for ``budget``). Errors name the argument at fault.
    """
    if name not in POLICY_NAMES:
        raise ValueError(f"policy: unknown policy {name!r}; accepted: {', '.join(POLICY_NAMES)}")
    if name == "oracle":
        raise ValueError("policy: 'oracle' needs every exit's hypothesis and the last exit's "
                         "result, so it is for analysis (recipes/evaluate.py) only")
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


@dataclass
class DynamicOutput:
    """Result of :func:`run_dynamic` for a batch of ``B`` utterances.

    ``log_probs[b]`` is ``(T_b, V)`` (valid frames only) at the exit where
    utterance ``b`` stopped; ``exits`` ``(B,)`` are 0-based; ``layers`` ``(B,)``
    the encoder layers computed for each utterance.
    """

    log_probs: List[torch.Tensor]
    exits: torch.Tensor
    layers: torch.Tensor
    hiddens: Optional[List[torch.Tensor]] = None  # (T_b, D) encoder states at the exit, if kept


def run_dynamic(encoder, heads, feats: torch.Tensor, lengths: Optional[torch.Tensor],
                policy: ExitPolicy, durations: Optional[torch.Tensor] = None,
                trim: bool = True, keep_hidden: bool = False) -> DynamicOutput:
    """Early-exit inference: utterances leave the batch as the policy stops them.

    ``encoder`` follows the incremental interface (``start``, ``advance``,
    ``select``, ``exit_layers``); ``heads.forward_exit(k, hidden)`` gives exit
    ``k``'s log-probabilities. Layers above the deepest exit any utterance
    still needs are never run; with a policy that plans its exits (``fixed``,
    ``budget``) the heads of exits nobody stops at are not computed. ``trim``:
    cut the batch's padding to the longest utterance still running (see the
    encoder's ``select``). ``keep_hidden``: also return each utterance's encoder
    states at its exit (for an attention decoder).
    """
    batch = feats.shape[0]
    num_exits = len(encoder.exit_layers)
    state = encoder.start(feats, lengths)
    active = torch.arange(batch)
    out_lp: List[Optional[torch.Tensor]] = [None] * batch
    out_hidden: List[Optional[torch.Tensor]] = [None] * batch
    exits = torch.zeros(batch, dtype=torch.long)
    planner = getattr(policy, "planned_exits", None)  # a plain function decides at every exit
    plan = planner(batch, durations, num_exits) if planner is not None else None
    for k in range(num_exits):
        if plan is not None:
            stop = plan[active] == k
            if not bool(stop.any()):
                continue  # nobody stops here: these layers run with the next exit's, no head
        hidden = encoder.advance(state, k)
        log_probs = heads.forward_exit(k, hidden)
        if plan is None:
            if k == num_exits - 1:
                stop = torch.ones(len(active), dtype=torch.bool)
            else:
                rel = state.frames.to(log_probs.dtype) / log_probs.shape[1]
                sub_durations = durations[active] if durations is not None else None
                stop = policy(k, log_probs, rel, sub_durations).cpu()
        for i in torch.nonzero(stop).flatten().tolist():
            b = int(active[i])
            out_lp[b] = log_probs[i, : int(state.frames[i])]
            if keep_hidden:
                out_hidden[b] = hidden[i, : int(state.frames[i])]
            exits[b] = k
        if bool(stop.all()):
            break
        if bool(stop.any()):  # some utterances leave the batch
            keep = torch.nonzero(~stop).flatten()
            state = encoder.select(state, keep.to(state.x.device), trim=trim)
            active = active[keep]
    layers = torch.tensor([encoder.exit_layers[int(k)] for k in exits], dtype=torch.long)
    return DynamicOutput(out_lp, exits, layers, out_hidden if keep_hidden else None)
