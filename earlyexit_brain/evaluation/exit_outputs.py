"""Batch-1 records of every exit of every utterance of an evaluation set (:class:`ExitOutputs`).

Every utterance is run once at batch 1 (as a device transcribing one request
would), through every exit, recording for each exit the hypothesis (greedy CTC;
an AED model's joint CTC/attention beam search), its word errors, the
cumulative milliseconds from the waveform to that exit (the encoder; the
decoding after it is not included), and each confidence policy's score and the
time it took to compute.
"""

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from speechbrain.utils.edit_distance import wer_details_for_batch
from tqdm import tqdm

from ..controller import exit_features
from ..decoding.attention import decode_states
from ..decoding.ctc import CTCDecoder, make_ctc_beam_searcher
from ..latency import timed_exits
from ..policies import ConfidencePolicy, EntropyPolicy, GreedyPosteriorPolicy, NBestPosteriorPolicy
from ..utils import tokens_to_text


@dataclass
class ExitOutputs:
    """Per-utterance, per-exit records of one evaluation set (``U`` utterances, ``K`` exits)."""

    ids: List[str]
    durations: torch.Tensor  # (U,) seconds
    ref_words: torch.Tensor  # (U,) reference words
    errors: torch.Tensor  # (U, K) word edits of each exit's hypothesis
    hyps: List[List[str]]  # [u][k] hypothesis text
    exit_ms: torch.Tensor  # (U, K) cumulative ms from waveform to exit k
    exit_layers: List[int]
    scores: Dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (U, K)
    policy_ms: Dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (U, K)
    compute_layers: Optional[List[int]] = None  # layers computed to each exit (None: exit_layers)
    features: Optional[List[torch.Tensor]] = None  # per exit (U, F): the learned controller's inputs

    @property
    def num_exits(self) -> int:
        return len(self.exit_layers)


def build_scorers(
    tokenizer,
    vocab_size: int,
    blank_index: int = 0,
    beam_size: int = 10,
    entropy_normalize: bool = True,
    greedy_form: str = "mean",
    token_prune_min_logp: Optional[float] = None,
) -> Dict[str, ConfidencePolicy]:
    """The confidence policies whose scores are recorded (thresholds set later)."""
    return {
        "entropy": EntropyPolicy(0.5, normalize=entropy_normalize, vocab_size=vocab_size),
        "posterior": NBestPosteriorPolicy(
            0.5,
            make_ctc_beam_searcher(
                tokenizer, vocab_size, blank_index, beam_size, token_prune_min_logp=token_prune_min_logp
            ),
        ),
        "posterior_greedy": GreedyPosteriorPolicy(0.5, form=greedy_form),
    }


@torch.no_grad()
def collect_exit_outputs(
    model,
    dataset,
    tokenizer,
    scorers: Dict[str, ConfidencePolicy],
    blank_index: int = 0,
    sample_rate: int = 16000,
    desc: str = "exits",
    decode_batch: int = 16,
    decoder: Optional[CTCDecoder] = None,
    keep_features: bool = False,
) -> ExitOutputs:
    """Run every utterance of ``dataset`` (items with ``id``, ``sig``, ``wrd``) through every exit.

    A CTC model's hypotheses come from ``decoder`` (default: greedy CTC). A scorer that
    ``needs_context`` (the learned policy) also gets the exit's encoder states and the previous
    exit's log-probabilities. ``keep_features``: also record the learned controller's inputs
    (:func:`earlyexit_brain.controller.exit_features`) at every exit, to train it on.

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
    features: List[List[torch.Tensor]] = [[] for _ in range(num_exits)]

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
        if keep_features:
            frames = torch.tensor([log_probs[0].shape[1]])
            for k in range(num_exits):
                previous = log_probs[k - 1] if k else None
                features[k].append(exit_features(hiddens[k], log_probs[k], frames, previous, blank_index)[0])
        for name, scorer in scorers.items():
            row, row_ms = [], []
            for k in range(num_exits):
                if k == num_exits - 1:  # the last exit always stops: no decision
                    row.append(float("nan"))
                    row_ms.append(0.0)
                    continue
                start = time.perf_counter()
                if getattr(scorer, "needs_context", False):
                    previous = log_probs[k - 1] if k else None
                    score = scorer.score(log_probs[k], lens, exit_index=k, hidden=hiddens[k], previous=previous)
                else:
                    score = scorer.score(log_probs[k], lens)
                row.append(float(score[0]))
                row_ms.append((time.perf_counter() - start) * 1000.0)
            scores[name].append(row)
            policy_ms[name].append(row_ms)
    if pending:
        decode_pending()
    ref_words = [r.split() for r in refs]
    errors = [
        [d["num_edits"] for d in wer_details_for_batch(ids, ref_words, [h[k].split() for h in hyps])]
        for k in range(num_exits)
    ]
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
        features=[torch.stack(f) for f in features] if keep_features and ids else None,
    )
