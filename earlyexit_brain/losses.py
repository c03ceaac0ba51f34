"""Every exit's CTC loss from one CTC call.

PyTorch's CUDA CTC copies the lengths between host and device on each call, and
each blocking copy synchronises the stream (11 synchronisations per call and
training step, measured with torch.profiler); its alpha and beta recursions also
run one call after the other. One call over all exits' log-probabilities, stacked along the batch,
makes the loss of E exits cost about what one exit's does (docs/performance.md).
"""

import functools
from typing import List, Optional, Sequence

import torch
from speechbrain.nnet.losses import ctc_loss as sb_ctc_loss


def one_call_blank_index(ctc_cost) -> Optional[int]:
    """The blank index if ``ctc_cost`` is SpeechBrain's ``ctc_loss`` with the mean reduction
    (as the YAMLs' ``!name:speechbrain.nnet.losses.ctc_loss`` gives), else None."""
    if not isinstance(ctc_cost, functools.partial) or ctc_cost.func is not sb_ctc_loss or ctc_cost.args:
        return None
    keywords = dict(ctc_cost.keywords)
    if keywords.pop("reduction", "mean") != "mean" or set(keywords) != {"blank_index"}:
        return None
    return keywords["blank_index"]


def stacked_ctc_losses(log_probs: Sequence[torch.Tensor], targets: torch.Tensor, input_lens: torch.Tensor,
                       target_lens: torch.Tensor, blank_index: int) -> List[torch.Tensor]:
    """Each exit's CTC loss as ``speechbrain.nnet.losses.ctc_loss`` (mean reduction) computes it.

    Arguments
    ---------
    log_probs : list of torch.Tensor
        One ``(B, T, V)`` tensor per exit, all of the same shape.
    targets : torch.Tensor
        ``(B, L)`` padded token ids.
    input_lens, target_lens : torch.Tensor
        ``(B,)`` relative lengths (SpeechBrain convention).
    blank_index : int
        The blank's index.

    Returns
    -------
    list of torch.Tensor
        One scalar loss per exit: the per-utterance losses (infinite ones zeroed)
        divided by the target lengths, averaged over the batch.

    Example
    -------
    >>> lp = [torch.randn(2, 6, 5).log_softmax(-1) for _ in range(3)]
    >>> targets, lens = torch.tensor([[1, 2], [3, 0]]), torch.tensor([1.0, 0.5])
    >>> ref = [sb_ctc_loss(x, targets, lens, lens, blank_index=0) for x in lp]
    >>> new = stacked_ctc_losses(lp, targets, lens, lens, blank_index=0)
    >>> all(torch.allclose(a, b) for a, b in zip(new, ref))
    True
    """
    exits = len(log_probs)
    stacked = torch.stack(list(log_probs))  # (E, B, T, V)
    _, batch, frames, vocab = stacked.shape
    # the integer lengths as SpeechBrain's ctc_loss computes them, but on the CPU: copied once
    # here instead of twice by every CTC call
    in_lens = (input_lens.cpu() * frames).round().int()
    tok_lens = (target_lens.cpu() * targets.shape[1]).round().int()
    losses = torch.nn.functional.ctc_loss(
        stacked.reshape(exits * batch, frames, vocab).transpose(0, 1), targets.repeat(exits, 1),
        in_lens.repeat(exits), tok_lens.repeat(exits), blank_index, reduction="none", zero_infinity=True)
    per_utterance = losses.view(exits, batch) / tok_lens.clamp_min(1).to(losses)
    return [row.mean() for row in per_utterance]


def exit_distillation_loss(log_probs: Sequence[torch.Tensor], frame_weights: torch.Tensor) -> torch.Tensor:
    """Self-distillation of the earlier exits towards the last one.

    ``sum_{k<K} mean_t KL(p_K(.|t) || p_k(.|t))`` over the valid frames, with the last
    exit's posteriors ``p_K`` as a fixed target (no gradient flows into it through this
    term). Every exit must have the last one's frame count.

    Arguments
    ---------
    log_probs : list of torch.Tensor
        One ``(B, T, V)`` log-posterior tensor per exit, the last one the teacher.
    frame_weights : torch.Tensor
        ``(B, T)`` mask of the valid frames (1 valid, 0 padding).

    Returns
    -------
    torch.Tensor
        A scalar: the sum over the earlier exits of the per-frame KL averaged over valid frames.

    Example
    -------
    >>> lp = torch.randn(2, 5, 4).log_softmax(-1)
    >>> float(exit_distillation_loss([lp, lp], torch.ones(2, 5)))
    0.0
    >>> float(exit_distillation_loss([torch.randn(2, 5, 4).log_softmax(-1), lp], torch.ones(2, 5))) > 0
    True
    """
    teacher = log_probs[-1].detach()
    students = torch.stack(list(log_probs[:-1]))  # (E-1, B, T, V)
    kl = (teacher.exp() * (teacher - students)).sum(-1)  # (E-1, B, T)
    return (kl * frame_weights).sum() / frame_weights.sum().clamp_min(1.0)
