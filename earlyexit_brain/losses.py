"""The multi-exit loss: :class:`MultiExitLoss`, the one object a recipe's YAML names as ``loss``.

Its parts: every exit's CTC loss from one CTC call (:func:`stacked_ctc_losses`: PyTorch's CUDA CTC
synchronises the stream on each call and runs its recursions one call after the other, so one call
over all exits stacked along the batch makes E exits' loss cost about what one exit's does; figures
in docs/performance.md), the attention decoders' cross-entropy, the exit weights and the exit
distillation term (:func:`exit_distillation_loss`).
"""

import dataclasses
from typing import List, NamedTuple, Optional, Sequence, Union

import torch
from speechbrain.nnet.losses import ctc_loss as sb_ctc_loss
from speechbrain.nnet.losses import nll_loss as sb_nll_loss

from .options import Options, is_int, is_num, option
from .utils import frame_mask


def stacked_ctc_losses(
    log_probs: Sequence[torch.Tensor],
    targets: torch.Tensor,
    input_lens: torch.Tensor,
    target_lens: torch.Tensor,
    blank_index: int,
) -> List[torch.Tensor]:
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
        stacked.reshape(exits * batch, frames, vocab).transpose(0, 1),
        targets.repeat(exits, 1),
        in_lens.repeat(exits),
        tok_lens.repeat(exits),
        blank_index,
        reduction="none",
        zero_infinity=True,
    )
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


class ExitLosses(NamedTuple):
    """What :class:`MultiExitLoss` returns.

    ``total`` is the scalar to back-propagate; ``per_exit`` holds each exit's loss before its weight
    (its CTC loss, or ``ctc_weight * CTC + (1 - ctc_weight) * CE`` for attention-decoder exits), in exit
    order; ``distillation`` is the weighted distillation term included in ``total`` (0.0 when off)."""

    total: torch.Tensor
    per_exit: List[torch.Tensor]
    distillation: Union[torch.Tensor, float]


CTC_IMPLEMENTATIONS = ("one_call", "per_exit")


def _exit_weights_ok(value) -> bool:
    return value is None or (
        isinstance(value, list) and len(value) > 0 and all(is_num(w) and w >= 0 for w in value) and sum(value) > 0
    )


@dataclasses.dataclass(frozen=True)
class MultiExitLoss(Options):
    """The multi-exit objective, built by the recipe YAML as its ``loss`` key.

    ``L = sum_k w_k * L_k + distillation_weight * D`` where ``L_k`` is exit ``k``'s CTC loss
    (SpeechBrain's ``ctc_loss`` definition: per-utterance losses divided by the target length,
    infinite ones zeroed, averaged over the batch), or for attention-decoder exits
    ``ctc_weight * CTC_k + (1 - ctc_weight) * CE_k`` with ``CE_k`` the decoder's teacher-forced
    cross-entropy (SpeechBrain's ``nll_loss`` with ``label_smoothing``), and ``D`` the exit
    distillation term (:func:`exit_distillation_loss`) from epoch ``distillation_from_epoch`` on.

    Arguments (the recipe YAML key that sets each, by ``!ref``, in brackets)
    ---------
    blank_index : int
        The CTC blank's index (``blank_index``).
    exit_weights : list of float, optional
        One non-negative weight per exit (``exit_loss_weights``); None: the paper's plain sum.
    ctc : str
        ``one_call`` (default): every exit's CTC loss from one ``ctc_loss`` call over the exits stacked
        along the batch (:func:`stacked_ctc_losses`; every exit must have the same frame count, as the
        project's encoders do); ``per_exit``: SpeechBrain's ``ctc_loss`` called once per exit. Both
        compute the same values.
    ctc_weight : float
        Weight of CTC against the decoders' cross-entropy, in [0, 1] (``ctc_weight``); used only when
        the Brain passes decoder outputs (attention-decoder exits).
    label_smoothing : float
        Of the decoders' cross-entropy, in [0, 1) (``label_smoothing``).
    distillation_weight : float
        0 (the paper's loss) or > 0 (``exit_distillation_weight``; null: 0).
    distillation_from_epoch : int
        The first epoch (1-based) with the distillation term (``exit_distillation_from_epoch``; null: 1).

    Example
    -------
    >>> loss = MultiExitLoss(blank_index=0, exit_weights=[1.0, 0.5])
    >>> lp = [torch.randn(2, 6, 5).log_softmax(-1) for _ in range(2)]
    >>> out = loss(lp, torch.ones(2), torch.tensor([[1, 2], [3, 0]]), torch.tensor([1.0, 0.5]))
    >>> bool(torch.allclose(out.total, out.per_exit[0] + 0.5 * out.per_exit[1]))
    True
    """

    blank_index: int = option("blank_index", dataclasses.MISSING, lambda v: is_int(v) and v >= 0, "an integer >= 0")
    exit_weights: Optional[List[float]] = option(
        "exit_loss_weights",
        None,
        _exit_weights_ok,
        "null (the plain sum) or a list of non-negative numbers, one per exit, not all zero",
    )
    ctc: str = option(None, "one_call", lambda v: v in CTC_IMPLEMENTATIONS, "'one_call' or 'per_exit'")
    ctc_weight: float = option("ctc_weight", 1.0, lambda v: is_num(v) and 0 <= v <= 1, "a number in [0, 1]")
    label_smoothing: float = option("label_smoothing", 0.0, lambda v: is_num(v) and 0 <= v < 1, "a number in [0, 1)")
    distillation_weight: float = option(
        "exit_distillation_weight",
        0.0,
        lambda v: is_num(v) and v >= 0,
        "a number >= 0 (0: the paper's loss)",
        null_is_default=True,
    )
    distillation_from_epoch: int = option(
        "exit_distillation_from_epoch", 1, lambda v: is_int(v) and v >= 1, "an epoch number >= 1", null_is_default=True
    )

    def weights(self, exits: int) -> List[float]:
        """The per-exit weights for a model with ``exits`` exits."""
        if self.exit_weights is None:
            return [1.0] * exits
        if len(self.exit_weights) != exits:
            raise ValueError(f"exit_loss_weights: {len(self.exit_weights)} weights for {exits} exits")
        return [float(w) for w in self.exit_weights]

    def ctc_losses(
        self, log_probs: Sequence[torch.Tensor], wav_lens: torch.Tensor, tokens: torch.Tensor, token_lens: torch.Tensor
    ) -> List[torch.Tensor]:
        """Each exit's CTC loss (``ctc`` chooses how it is computed; the values are the same)."""
        if self.ctc == "per_exit":
            return [sb_ctc_loss(lp, tokens, wav_lens, token_lens, blank_index=self.blank_index) for lp in log_probs]
        shapes = {tuple(lp.shape) for lp in log_probs}
        if len(shapes) != 1:
            raise ValueError(
                f"MultiExitLoss: ctc 'one_call' needs every exit's log-probabilities to have one "
                f"shape, got {sorted(shapes)}; use ctc: per_exit"
            )
        return stacked_ctc_losses(log_probs, tokens, wav_lens, token_lens, self.blank_index)

    def distillation(
        self, log_probs: Sequence[torch.Tensor], wav_lens: torch.Tensor, epoch: Optional[int]
    ) -> Union[torch.Tensor, float]:
        """The weighted distillation term at ``epoch`` (1-based; None: always on), 0.0 when off."""
        if (
            self.distillation_weight == 0.0
            or len(log_probs) < 2
            or (epoch is not None and epoch < self.distillation_from_epoch)
        ):
            return 0.0
        return self.distillation_weight * exit_distillation_loss(log_probs, frame_mask(log_probs[-1], wav_lens))

    def __call__(
        self,
        log_probs: Sequence[torch.Tensor],
        wav_lens: torch.Tensor,
        tokens: torch.Tensor,
        token_lens: torch.Tensor,
        epoch: Optional[int] = None,
        decoder_log_probs: Optional[Sequence[torch.Tensor]] = None,
        tokens_eos: Optional[torch.Tensor] = None,
        eos_lens: Optional[torch.Tensor] = None,
    ) -> ExitLosses:
        """The loss of one batch.

        Arguments
        ---------
        log_probs : list of torch.Tensor
            One ``(B, T, V)`` CTC log-probability tensor per exit.
        wav_lens : torch.Tensor
            ``(B,)`` relative lengths of the exits' frames.
        tokens, token_lens : torch.Tensor
            ``(B, L)`` padded CTC targets and their ``(B,)`` relative lengths.
        epoch : int, optional
            The current epoch (1-based), for the distillation schedule.
        decoder_log_probs : list of torch.Tensor, optional
            Attention-decoder exits: one ``(B, L + 1, V)`` teacher-forced log-probability tensor per exit.
        tokens_eos, eos_lens : torch.Tensor, optional
            The decoders' targets (eos appended) and their relative lengths.

        Returns
        -------
        ExitLosses
        """
        losses = self.ctc_losses(log_probs, wav_lens, tokens, token_lens)
        if decoder_log_probs is not None:
            if len(decoder_log_probs) != len(losses):
                raise ValueError(f"MultiExitLoss: {len(decoder_log_probs)} decoder outputs for {len(losses)} exits")
            weight = float(self.ctc_weight)
            losses = [
                weight * c
                + (1.0 - weight)
                * sb_nll_loss(lp, tokens_eos, length=eos_lens, label_smoothing=float(self.label_smoothing))
                for c, lp in zip(losses, decoder_log_probs)
            ]
        weights = self.weights(len(losses))
        total = losses[0] * weights[0]
        for loss, w in zip(losses[1:], weights[1:]):
            total = total + loss * w
        distillation = self.distillation(log_probs, wav_lens, epoch)
        return ExitLosses(total + distillation, losses, distillation)
