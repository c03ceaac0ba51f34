"""Dynamic early-exit inference: utterances leave the batch as a policy stops them.

:func:`run_dynamic` drives an encoder's incremental interface (``start`` /
``advance`` / ``select``) with a policy; layers above the deepest exit still
needed are never run, and with a policy that plans its exits (``fixed``,
``budget``: :meth:`~earlyexit_brain.policies.ExitPolicy.planned_exits`) the heads
of the exits nobody stops at are not computed. :func:`run_model` does the same
from waveforms with an :class:`~earlyexit_brain.models.pipeline.EarlyExitCTCModel`;
:func:`decode_dynamic` decodes an attention-decoder model's result with the
decoder of each utterance's exit only.
"""

from dataclasses import dataclass
from typing import List, Optional

import torch

from .decoding.attention import decode_states
from .models.pipeline import EarlyExitCTCModel
from .policies import ExitPolicy


@dataclass
class DynamicOutput:
    """Result of :func:`run_dynamic` for a batch of ``B`` utterances.

    ``log_probs[b]`` is ``(T_b, V)`` (valid frames only) at the exit where
    utterance ``b`` stopped; ``exits`` ``(B,)`` are 0-based; ``layers`` ``(B,)``
    the encoder layers computed for each utterance (the encoder's ``exit_compute_layers``:
    a Splitformer's branch layers included).
    """

    log_probs: List[torch.Tensor]
    exits: torch.Tensor
    layers: torch.Tensor
    hiddens: Optional[List[torch.Tensor]] = None  # (T_b, D) encoder states at the exit, if kept


def run_dynamic(
    encoder,
    heads,
    feats: torch.Tensor,
    lengths: Optional[torch.Tensor],
    policy: ExitPolicy,
    durations: Optional[torch.Tensor] = None,
    trim: bool = True,
    keep_hidden: bool = False,
) -> DynamicOutput:
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
    context = getattr(policy, "needs_context", False)  # also reads the states and the previous exit
    previous = None  # the previous exit's log-probabilities of the utterances still running
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
                if context:
                    stop = policy(k, log_probs, rel, sub_durations, hidden=hidden, previous=previous).cpu()
                else:
                    stop = policy(k, log_probs, rel, sub_durations).cpu()
            previous = log_probs
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
            if previous is not None:
                previous = previous[keep.to(previous.device)]
    computed = encoder.exit_compute_layers
    layers = torch.tensor([computed[int(k)] for k in exits], dtype=torch.long)
    return DynamicOutput(out_lp, exits, layers, out_hidden if keep_hidden else None)


def run_model(
    model: EarlyExitCTCModel,
    wavs: torch.Tensor,
    wav_lens: torch.Tensor,
    policy: ExitPolicy,
    durations: Optional[torch.Tensor] = None,
    keep_hidden: bool = False,
) -> DynamicOutput:
    """:func:`run_dynamic` from waveforms ``(B, S)`` (relative ``wav_lens``) through ``model``'s
    features, encoder and CTC heads."""
    feats = model.features(wavs, wav_lens)
    return run_dynamic(model.encoder, model.heads, feats, wav_lens, policy, durations, keep_hidden=keep_hidden)


def decode_dynamic(model, out: DynamicOutput) -> List[List[int]]:
    """Decode a :func:`run_dynamic` output made with ``keep_hidden=True`` with an
    :class:`~earlyexit_brain.models.pipeline.EarlyExitAEDModel`: the utterances that stopped
    at the same exit are batched through that exit's decoder only."""
    result: List[List[int]] = [[] for _ in out.exits]
    for k in sorted(set(int(e) for e in out.exits)):
        members = [b for b, e in enumerate(out.exits) if int(e) == k]
        for b, ids in zip(members, decode_states(model, k, [out.hiddens[b] for b in members])):
            result[b] = ids
    return result
