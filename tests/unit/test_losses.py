"""One CTC call for all exits: the same losses and gradients as one SpeechBrain ctc_loss per exit;
the optional self-distillation term."""

import speechbrain as sb
import torch
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.nnet.losses import ctc_loss

from earlyexit_brain.losses import exit_distillation_loss, stacked_ctc_losses
from tests.factories import make_brain


def test_stacked_losses_and_gradients_equal_per_exit_calls():
    torch.manual_seed(0)
    exits, batch, frames, vocab = 3, 5, 30, 7
    logits = torch.randn(exits, batch, frames, vocab, dtype=torch.float64)
    targets = torch.randint(1, vocab, (batch, 12))
    input_lens = torch.tensor([1.0, 0.8, 0.5, 0.3, 0.1])  # the last (3 frames) cannot fit its targets
    target_lens = torch.tensor([1.0, 0.5, 0.75, 1.0, 1.0])
    results = []
    for stacked in (False, True):
        x = logits.clone().requires_grad_()
        log_probs = list(x.log_softmax(-1))
        if stacked:
            losses = stacked_ctc_losses(log_probs, targets, input_lens, target_lens, blank_index=0)
        else:
            losses = [ctc_loss(lp, targets, input_lens, target_lens, blank_index=0) for lp in log_probs]
        (sum(w * loss for w, loss in zip((1.0, 0.5, 2.0), losses))).backward()
        results.append((torch.stack(losses).detach(), x.grad))
    (ref_loss, ref_grad), (loss, grad) = results
    assert torch.isfinite(ref_loss).all()  # the impossible utterance is zeroed, as zero_infinity does
    assert torch.allclose(loss, ref_loss, rtol=1e-12, atol=0)
    assert torch.allclose(grad, ref_grad, rtol=1e-10, atol=1e-14)


def brain_objective(folder, ctc="one_call", epoch=1, **loss_keys):
    """Loss, per-exit loss sums and parameter gradients of one training batch of the recipe's Brain
    (tests/factories.py; 3 exits weighted 0.5, 1 and 2; in epoch ``epoch``). ``ctc`` is the loss's CTC
    implementation; ``loss_keys`` are recipe keys (``exit_distillation_weight``, ...)."""
    brain = make_brain(
        folder, num_layers=3, exit_layers=[1, 2, 3], exit_loss_weights=[0.5, 1.0, 2.0], loss={"ctc": ctc}, **loss_keys
    )
    assert brain.hparams.loss.ctc == ctc
    brain.hparams.epoch_counter.current = epoch
    brain.on_stage_start(sb.Stage.TRAIN)
    data = PaddedBatch(
        [
            {"id": "a", "sig": torch.randn(8000), "tokens": torch.tensor([1, 2, 3]), "wrd": "A"},
            {"id": "b", "sig": torch.randn(5000), "tokens": torch.tensor([4, 5]), "wrd": "B"},
            {"id": "c", "sig": torch.randn(6500), "tokens": torch.tensor([6]), "wrd": "C"},
        ]
    )
    loss = brain.compute_objectives(brain.compute_forward(data, sb.Stage.TRAIN), data, sb.Stage.TRAIN)
    loss.backward()
    grads = [p.grad.clone() for p in brain.modules.parameters()]
    return loss.detach(), list(brain._exit_loss_sum), grads


def test_brain_objective_is_unchanged_by_the_single_call(tmp_path):
    per_exit = brain_objective(tmp_path, "per_exit")  # one SpeechBrain ctc_loss call per exit
    one_call = brain_objective(tmp_path, "one_call")
    assert torch.allclose(one_call[0], per_exit[0], rtol=1e-6, atol=0)
    assert len(one_call[1]) == 3 and all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(one_call[1], per_exit[1]))
    for g, g0 in zip(one_call[2], per_exit[2]):
        assert torch.allclose(g, g0, rtol=1e-5, atol=1e-7)


def test_distillation_is_the_masked_mean_kl_from_the_last_exit():
    torch.manual_seed(0)
    exits, batch, frames, vocab = 3, 2, 6, 5
    x = torch.randn(exits, batch, frames, vocab, dtype=torch.float64, requires_grad=True)
    log_probs = list(x.log_softmax(-1))
    mask = torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2])
    loss = exit_distillation_loss(log_probs, mask)
    teacher = log_probs[-1].detach()
    expected = 0.0
    for student in log_probs[:-1]:
        for b, valid in enumerate((6, 4)):
            expected += torch.nn.functional.kl_div(
                student[b, :valid], teacher[b, :valid], log_target=True, reduction="sum"
            )
    assert torch.allclose(loss, expected / 10)
    loss.backward()
    assert x.grad[-1].abs().max() == 0  # the last exit is the target: no gradient through this term
    assert x.grad[:-1, 1, 4:].abs().max() == 0  # padding frames do not count
    assert x.grad[:-1, 1, :4].abs().max() > 0


def test_brain_adds_the_weighted_distillation_only_when_asked(tmp_path):
    plain = brain_objective(tmp_path)
    assert torch.equal(brain_objective(tmp_path, exit_distillation_weight=0.0)[0], plain[0])
    half, one = (
        brain_objective(tmp_path, exit_distillation_weight=w, exit_distillation_from_epoch=1) for w in (0.5, 1.0)
    )
    assert one[1] == plain[1]  # the per-exit CTC losses logged are the CTC losses alone
    distill = one[0] - plain[0]
    assert distill > 0
    assert torch.allclose(half[0] - plain[0], distill / 2, rtol=1e-5)
    assert any(not torch.allclose(g, g0) for g, g0 in zip(one[2], plain[2]))


def test_distillation_waits_for_its_first_epoch(tmp_path):
    plain = brain_objective(tmp_path)
    for epoch, applied in ((1, False), (2, True), (3, True)):
        loss = brain_objective(tmp_path, epoch=epoch, exit_distillation_weight=1.0, exit_distillation_from_epoch=2)[0]
        assert (loss > plain[0]) == applied and (loss == plain[0]) != applied
