"""The learned exit policy of the ONNX runtime in numpy (earlyexit_brain.runtime.policies): its
features and estimator against the PyTorch controller's (earlyexit_brain.controller). Both now
compute with earlyexit_brain.controller_numpy, so the comparison checks the PyTorch wrapper's
conversions (devices, dtypes, the best-token form of ``previous``); the independent references are
policy_bundle's pure-Python estimator (below) and test_controller.py's hand-computed features. The
exported smoke model with a controller is tested in test_onnx.py, which exports it once."""

import numpy as np
import pytest
import torch
from test_controller import random_weights  # tests/unit/test_controller.py

from earlyexit_brain.controller import controller_probability as torch_probability
from earlyexit_brain.controller import exit_features, exit_probability, host_frames
from earlyexit_brain.policy_bundle import CONTROLLER_STATISTICS, controller_probabilities
from earlyexit_brain.runtime.policies import (
    RUNTIME_POLICIES,
    controller_features,
    controller_probability,
    make_runtime_policy,
)
from earlyexit_brain.utils import valid_frames

S = len(CONTROLLER_STATISTICS)


def random_exit(gen, b, t, v, blank_bias):
    """Peaky log-probabilities ``(B, T, V)`` with many blank frames."""
    logits = 4 * torch.randn(b, t, v, generator=gen)
    logits[..., 0] += blank_bias
    return torch.log_softmax(logits, -1)


# ---------------------------------------------------------------- numpy against PyTorch
@pytest.mark.parametrize("hidden_units", [0, 5])
def test_numpy_features_and_probabilities_equal_pytorch(hidden_units):
    gen = torch.Generator().manual_seed(0)
    b, t, v, d = 4, 13, 6, 7
    lp = random_exit(gen, b, t, v, 2.0)
    hidden = torch.randn(b, t, d, generator=gen)
    frames = torch.tensor([13, 9, 4, 1])
    for i, n in enumerate(frames.tolist()):
        hidden[i, n:] = 100.0  # padding: must not count
    prev_lp = random_exit(gen, b, t + 3, v, 2.0)  # the previous exit's, longer (before a trim)
    prev_lp[0, :t] = lp[0]  # utterance 0: the same best tokens as the previous exit
    weights = random_weights(num_exits=3, hidden_size=d, hidden_units=hidden_units, seed=1, scale=0.3)
    cases = [None, prev_lp, prev_lp.argmax(-1)]  # first exit, log-probabilities, best tokens
    seen = set()
    for previous in cases:
        ref = exit_features(hidden, lp, frames, previous, blank_index=0)
        ours = controller_features(
            hidden.numpy(), lp.numpy(), frames.numpy(), None if previous is None else previous.numpy(), 0
        )
        assert ours.dtype == np.float32 and ours.shape == (b, S + d)
        np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5, atol=1e-5)
        assert np.abs(ours[:, S:]).max() < 10  # the padding's 100s are not averaged in
        seen.update(ours[:, CONTROLLER_STATISTICS.index("same_hypothesis")].tolist())
        for k in range(2):
            p = controller_probability(weights, k, ours)
            assert p.dtype == np.float32 and p.shape == (b,)
            np.testing.assert_allclose(p, torch_probability(weights, k, ref).numpy(), atol=1e-5)
            np.testing.assert_allclose(p, controller_probabilities(weights, k, ours.tolist()), atol=1e-6)
            for i in range(b):  # one decision at a time (the logistic's own batch-1 path)
                one = controller_probability(weights, k, ours[i : i + 1])
                assert one.dtype == np.float32 and one.shape == (1,)
                np.testing.assert_allclose(one, p[i : i + 1], atol=1e-7)
    assert seen == {0.0, 1.0}  # both outcomes of the hypothesis comparison were exercised
    agreement = controller_features(hidden.numpy(), lp.numpy(), frames.numpy(), prev_lp.numpy())[:, S - 3]
    assert agreement[0] == 1.0 and 0.0 < agreement[1] < 1.0  # the same best tokens; a partial agreement


def test_a_padded_batch_gives_each_utterance_its_features_alone():
    # The batch computation (frame weights, masks) against each utterance trimmed to its valid
    # frames and computed alone, unpadded (the decision's batch-1 path, its own code).
    gen = torch.Generator().manual_seed(3)
    b, t, v, d = 5, 17, 5, 6
    lp = random_exit(gen, b, t, v, 1.0)
    hidden = torch.randn(b, t, d, generator=gen)
    prev_lp = random_exit(gen, b, t + 2, v, 1.0)
    prev_lp[1, :t] = lp[1]  # utterance 1 agrees with the previous exit everywhere
    lp[3] = -20.0
    lp[3, :, 0] = 0.0  # utterance 3: blank everywhere, so nothing is voiced unless the previous exit is
    prev_lp[3] = lp[3, :1].expand(t + 2, v)
    frames = np.array([17, 9, 1, 12, 4])
    for previous in (None, prev_lp.numpy(), prev_lp.argmax(-1).numpy()):
        batch = controller_features(hidden.numpy(), lp.numpy(), frames, previous, 0)
        for i, n in enumerate(frames.tolist()):
            prev_i = None if previous is None else previous[i : i + 1, :n]
            alone = controller_features(hidden[i : i + 1, :n].numpy(), lp[i : i + 1, :n].numpy(), [n], prev_i, 0)
            np.testing.assert_allclose(batch[i], alone[0], rtol=1e-5, atol=1e-6, err_msg=f"utterance {i}")
            alone_statistics = controller_features(None, lp[i : i + 1, :n].numpy(), [n], prev_i, 0, states=False)
            np.testing.assert_array_equal(alone_statistics, alone[:, :S])
        statistics = controller_features(None, lp.numpy(), frames, previous, 0, states=False)
        np.testing.assert_array_equal(statistics, batch[:, :S])  # the states' columns left out
        if previous is not None:
            agreement = batch[:, CONTROLLER_STATISTICS.index("frame_agreement")]
            assert agreement[1] == 1.0 and agreement[3] == 1.0  # all agreeing; nothing voiced in either


def test_the_policy_score_reads_lengths_as_speechbrain_does():
    lp = torch.zeros(6, 13, 4)
    lengths = torch.tensor([1.0, 0.5, 0.37, 0.8, 0.04, 0.5 / 13 * 3])  # halves round to even, as torch
    np.testing.assert_array_equal(np.clip(host_frames(lp, lengths), 1, 13), valid_frames(lp, lengths).numpy())
    assert host_frames(lp, None).tolist() == [13] * 6 and host_frames(lp, torch.ones(6)).tolist() == [13] * 6
    gen = torch.Generator().manual_seed(4)
    lp, hidden = random_exit(gen, 3, 13, 4, 1.0), torch.randn(3, 13, 2, generator=gen)
    weights = random_weights(num_exits=2, hidden_size=2, scale=0.5)
    lengths = torch.tensor([1.0, 0.6, 0.3])
    ref = torch_probability(weights, 0, exit_features(hidden, lp, valid_frames(lp, lengths), None, 0))
    torch.testing.assert_close(exit_probability(weights, 0, hidden, lp, lengths), ref)


def test_one_decision_reads_tensors_that_numpy_cannot_share():
    # A dynamic run's decision (batch 1, unpadded) takes tensor.numpy() in one call where it can;
    # a tensor that needs grad, or is bfloat16 (numpy has no such dtype), goes the long way.
    gen = torch.Generator().manual_seed(5)
    lp, prev = random_exit(gen, 1, 11, 5, 1.0), random_exit(gen, 1, 11, 5, 1.0)
    hidden = torch.randn(1, 11, 3, generator=gen)
    weights = random_weights(num_exits=3, hidden_size=3, scale=0.5)
    ref = exit_probability(weights, 1, hidden, lp, torch.ones(1), prev)
    for cast in (lambda x: x.clone().requires_grad_(), lambda x: x.half(), lambda x: x.bfloat16()):
        got = exit_probability(weights, 1, cast(hidden), cast(lp), torch.ones(1), cast(prev))
        torch.testing.assert_close(got, ref, atol=2e-2, rtol=0)
    exact = exit_probability(weights, 1, hidden.clone().requires_grad_(), lp.clone().requires_grad_(), None, prev)
    torch.testing.assert_close(exact, ref)


def test_the_estimator_saturates_without_overflow():
    weights = random_weights(num_exits=2, hidden_size=1, scale=1e4)
    x = np.full((2, S + 1), 1e3, np.float32)
    x[1] *= -1
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        p = controller_probability(weights, 0, x)
    assert np.isfinite(p).all() and ((0 <= p) & (p <= 1)).all()
    np.testing.assert_allclose(p, controller_probabilities(weights, 0, x.tolist()), atol=1e-6)


def test_the_runtime_policy_needs_a_controller():
    assert "learned" in RUNTIME_POLICIES
    with pytest.raises(ValueError, match=r"policy: the learned policy .* this model has none"):
        make_runtime_policy("learned", 0.5, num_exits=3)
    weights = random_weights(num_exits=3, hidden_size=4)
    with pytest.raises(ValueError, match=r"threshold: .* outside the learned policy's valid range"):
        make_runtime_policy("learned", 1.5, num_exits=3, controller=weights)
    with pytest.raises(ValueError, match="trained for 3 exits, the model has 4"):
        make_runtime_policy("learned", 0.5, num_exits=4, controller=weights)
    with pytest.raises(ValueError, match="unknown learned option"):
        make_runtime_policy("learned", 0.5, num_exits=3, controller=weights, form="mean")
    policy = make_runtime_policy("learned", 0.5, num_exits=3, controller=weights)
    assert policy.needs_context and policy.planned_exits(np.ones(2), 3) is None
    assert policy.describe() == {"policy": "learned", "threshold": 0.5}
    assert not make_runtime_policy("entropy", 0.5, num_exits=3).needs_context
