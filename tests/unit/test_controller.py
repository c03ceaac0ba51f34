"""The learned exit controller: its features, its estimator, its policy, its storage and bad input."""

import json
import math

import pytest
import torch
from signals import SR  # tests/unit/signals.py
from test_exits import tiny_model  # tests/unit/test_exits.py

from earlyexit_brain.controller import (
    agreement_labels,
    auc,
    controller_labels,
    controller_probability,
    exit_features,
    fit_controller,
    parameter_count,
    stop_labels,
)
from earlyexit_brain.dynamic import run_dynamic
from earlyexit_brain.export import export_inference_folder
from earlyexit_brain.inference import EarlyExitASR
from earlyexit_brain.latency import fit_latency_table
from earlyexit_brain.policies import LearnedPolicy, make_policy
from earlyexit_brain.policy_bundle import (
    CONTROLLER_STATISTICS,
    ControllerWeights,
    PolicyBundle,
    controller_probabilities,
)

S = len(CONTROLLER_STATISTICS)


def random_weights(num_exits=3, hidden_size=4, hidden_units=0, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    f = S + hidden_size

    def vec(n, low=-1.0, high=1.0):
        return (low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)).tolist()

    exits = []
    for _ in range(num_exits - 1):
        est = {
            "mean": vec(f),
            "scale": vec(f, 0.5, 2.0),
            "weight": [scale * v for v in vec(hidden_units or f)],
            "bias": 0.1,
        }
        if hidden_units:
            est["w1"] = [vec(f) for _ in range(hidden_units)]
            est["b1"] = vec(hidden_units)
        exits.append(est)
    return ControllerWeights(
        num_exits=num_exits, hidden_size=hidden_size, hidden_units=hidden_units, blank_index=0, exits=exits
    )


def test_features_on_a_hand_example_ignore_padding():
    # V = 3 (blank 0); utterance 0 has 4 valid frames, utterance 1 has 2 (then padding)
    probs = torch.tensor(
        [
            [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]],
            [[0.1, 0.1, 0.8], [0.9, 0.05, 0.05], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]],
        ]
    ).clamp(min=1e-9)
    lp = probs.log()
    prev = torch.tensor([[0, 1, 0, 2], [2, 2, 1, 1]])  # the previous exit's best tokens
    hidden = torch.arange(2 * 4 * 2, dtype=torch.float32).reshape(2, 4, 2)
    feats = exit_features(hidden, lp, torch.tensor([4, 2]), prev, blank_index=0)
    assert feats.shape == (2, S + 2)
    got = dict(zip(CONTROLLER_STATISTICS, feats[0, :S].tolist()))
    best = [0.7, 0.8, 0.8, 0.6]
    ent = [-sum(p * math.log(p) for p in row) / math.log(3) for row in probs[0].tolist()]
    assert got["entropy"] == pytest.approx(sum(ent) / 4, abs=1e-5)
    assert got["max_prob"] == pytest.approx(sum(best) / 4, abs=1e-6)
    assert got["log_max_prob"] == pytest.approx(sum(math.log(b) for b in best) / 4, abs=1e-6)
    assert got["min_max_prob"] == pytest.approx(0.6, abs=1e-6)
    assert got["blank_rate"] == pytest.approx(0.25)
    assert got["token_rate"] == pytest.approx(2 / 4)  # best tokens 0 1 1 2 -> hypothesis [1, 2]
    assert got["frame_agreement"] == pytest.approx(2 / 3)  # frames 2-4 voiced; frames 2 and 4 agree
    assert got["same_hypothesis"] == 1.0  # previous 0 1 0 2 -> [1, 2] too
    assert got["log_frames"] == pytest.approx(math.log(4))
    assert feats[0, S:].tolist() == pytest.approx([3.0, 4.0])  # mean of rows 0..3 of [[0,1],[2,3],[4,5],[6,7]]
    # utterance 1: only its 2 valid frames count (the padding frames are confident 1s)
    got = dict(zip(CONTROLLER_STATISTICS, feats[1, :S].tolist()))
    assert got["max_prob"] == pytest.approx((0.8 + 0.9) / 2, abs=1e-6)
    assert got["min_max_prob"] == pytest.approx(0.8, abs=1e-6)
    assert got["blank_rate"] == pytest.approx(0.5)
    assert got["frame_agreement"] == pytest.approx(0.5)  # both frames voiced (previous 2, 2); frame 1 agrees
    assert got["same_hypothesis"] == 1.0  # [2] and [2]
    assert feats[1, S:].tolist() == pytest.approx([9.0, 10.0])
    # the first exit compares with itself
    first = exit_features(hidden, lp, torch.tensor([4, 2]), None)
    assert first[:, CONTROLLER_STATISTICS.index("frame_agreement")].tolist() == [1.0, 1.0]
    assert first[:, CONTROLLER_STATISTICS.index("same_hypothesis")].tolist() == [1.0, 1.0]


def test_same_hypothesis_compares_collapsed_sequences():
    lp = torch.full((1, 4, 3), -10.0)
    for t, v in enumerate([1, 1, 0, 2]):
        lp[0, t, v] = 0.0
    same = CONTROLLER_STATISTICS.index("same_hypothesis")
    frames = torch.tensor([4])
    hidden = torch.zeros(1, 4, 1)
    assert exit_features(hidden, lp, frames, torch.tensor([[1, 0, 2, 2]]))[0, same] == 1.0
    assert exit_features(hidden, lp, frames, torch.tensor([[1, 0, 1, 2]]))[0, same] == 0.0


@pytest.mark.parametrize("hidden_units", [0, 3])
def test_torch_estimator_equals_the_pure_python_reference(hidden_units):
    weights = random_weights(hidden_units=hidden_units)
    x = torch.randn(5, weights.num_features, generator=torch.Generator().manual_seed(1))
    for k in range(2):
        ref = controller_probabilities(weights, k, x.double().tolist())
        assert controller_probability(weights, k, x).tolist() == pytest.approx(ref, abs=1e-6)
    f = weights.num_features
    expected = 2 * (2 * f + (3 * f + 3 + 3 if hidden_units else f) + 1)
    assert parameter_count(weights) == expected


@pytest.mark.parametrize("hidden_units", [0, 4])
def test_fit_learns_which_utterances_stop_for_free(hidden_units):
    gen = torch.Generator().manual_seed(3)
    n, f = 400, S + 3
    feats = [torch.randn(n, f, generator=gen) for _ in range(3)]
    # exit 1 is free exactly when feature 0 > 0, exit 2 when feature 1 > 0; noise elsewhere
    errors = torch.zeros(n, 3)
    errors[:, 0] = (feats[0][:, 0] <= 0).float() * 2
    errors[:, 1] = (feats[1][:, 1] <= 0).float()
    labels = stop_labels(errors)
    weights = fit_controller(feats, labels, blank_index=0, hidden_units=hidden_units, weight_decay=1e-3)
    assert labels[:, 0].tolist() == (feats[0][:, 0] > 0).float().tolist()
    for k in range(2):
        assert auc(controller_probability(weights, k, feats[k]), labels[:, k]) > 0.95
        assert weights.training["exits"][k]["train_auc"] > 0.95
    fresh = [torch.randn(200, f, generator=gen) for _ in range(3)]
    fresh_labels = (fresh[0][:, 0] > 0).float()
    assert auc(controller_probability(weights, 0, fresh[0]), fresh_labels) > 0.9
    assert weights.reads_states and weights.num_features == f


def test_a_controller_of_the_statistics_alone_ignores_the_states():
    # exit 1 is safe exactly when statistic 0 > 0; the states (the last 3 columns) say nothing
    gen = torch.Generator().manual_seed(7)
    feats = [torch.randn(300, S + 3, generator=gen) for _ in range(2)]
    labels = (feats[0][:, :1] > 0).float()
    weights = fit_controller(feats, labels, blank_index=0, weight_decay=1e-3, reads_states=False, target="agreement")
    assert not weights.reads_states and weights.hidden_size == 3 and weights.num_features == S
    assert weights.training["target"] == "agreement"
    assert parameter_count(weights) == 3 * S + 1
    p = controller_probability(weights, 0, feats[0])
    assert auc(p, labels[:, 0]) > 0.95
    other_states = feats[0].clone()
    other_states[:, S:] = 100.0
    torch.testing.assert_close(controller_probability(weights, 0, other_states), p)  # never read
    torch.testing.assert_close(controller_probability(weights, 0, feats[0][:, :S]), p)  # nor needed
    weights.check_model(2, 3, "exit_policies.ckpt")  # still checked against the model's state size
    with pytest.raises(ValueError, match="trained for 2 exits and 3-dimensional"):
        weights.check_model(2, 4, "exit_policies.ckpt")
    again = ControllerWeights.from_json(json.loads(json.dumps(weights.to_json())))
    assert again == weights
    stored = weights.to_json()
    del stored["reads_states"]  # a controller stored before the field: it read the states
    with pytest.raises(ValueError, match=r"exit 1: 'mean' must be a list of 12 finite numbers"):
        ControllerWeights.from_json(stored)


def test_training_targets():
    errors = torch.tensor([[3.0, 1.0, 1.0], [0.0, 2.0, 1.0], [2.0, 2.0, 2.0]])
    hyps = [["a b", "a c", "a c"], ["a", "a b", "a x"], ["b", "b", "b"]]
    assert controller_labels("errors", errors, hyps).tolist() == [[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]
    # agreement: the same text as the last exit (utterance 2's exit 1 has fewer errors, yet differs)
    assert controller_labels("agreement", errors, hyps).tolist() == [[0.0, 1.0], [0.0, 0.0], [1.0, 1.0]]
    assert agreement_labels(hyps).tolist() == controller_labels("agreement", errors, hyps).tolist()
    with pytest.raises(ValueError, match="controller_target: accepted values are 'agreement' and 'errors'"):
        controller_labels("wer", errors, hyps)


def test_auc_counts_ties_half():
    assert auc(torch.tensor([0.9, 0.1]), torch.tensor([1.0, 0.0])) == 1.0
    assert auc(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])) == 0.5
    assert auc(torch.tensor([0.1, 0.9]), torch.tensor([1.0, 0.0])) == 0.0
    assert auc(torch.tensor([0.1, 0.9]), torch.tensor([1.0, 1.0])) is None


def reference_exits(enc, heads, feats, lengths, weights, threshold):
    """Each utterance's exit by the learned rule, from one full pass of the padded batch."""
    hiddens = enc(feats, lengths)
    lps = [heads.forward_exit(k, h) for k, h in enumerate(hiddens)]
    frames = torch.round(lengths * lps[0].shape[1]).long()
    exits = torch.full((feats.shape[0],), len(hiddens) - 1)
    probs = []
    for k in range(len(hiddens) - 1):
        x = exit_features(hiddens[k], lps[k], frames, lps[k - 1] if k else None)
        p = controller_probability(weights, k, x)
        probs.append(p)
        newly = (p >= threshold) & (exits == len(hiddens) - 1)
        exits[newly] = k
    return exits, probs


@torch.no_grad()
def test_learned_policy_in_dynamic_inference_equals_the_rule_on_the_full_pass():
    enc, heads = tiny_model()
    weights = random_weights(hidden_size=32, seed=2, scale=0.3)
    feats, lengths = torch.randn(6, 41, 20), torch.tensor([1.0, 0.9, 0.8, 0.6, 0.5, 0.4])
    _, probs = reference_exits(enc, heads, feats, lengths, weights, 2.0)
    threshold = float(probs[0].median())  # about half the batch stops at exit 1
    expected, _ = reference_exits(enc, heads, feats, lengths, weights, threshold)
    assert 0 < int((expected == 0).sum()) < 6
    out = run_dynamic(enc, heads, feats, lengths, LearnedPolicy(threshold, weights), trim=False)
    assert out.exits.tolist() == expected.tolist()
    assert out.layers.tolist() == [[2, 4, 6][e] for e in expected.tolist()]


def test_bundle_round_trip_and_bad_weights():
    weights = random_weights(hidden_units=2)
    bundle = PolicyBundle(
        default={"policy": "learned", "threshold": 0.7}, thresholds={"learned": 0.7}, controller=weights
    )
    again = PolicyBundle.from_json(json.loads(json.dumps(bundle.to_json())))
    assert again == bundle and again.controller == weights
    data = bundle.to_json()
    data["controller"]["exits"][1]["weight"] = data["controller"]["exits"][1]["weight"][:-1]
    with pytest.raises(ValueError, match=r"exit_policies.ckpt: controller: exit 2: 'weight'"):
        PolicyBundle.from_json(data, source="exit_policies.ckpt")
    data = bundle.to_json()
    data["controller"]["exits"] = data["controller"]["exits"][:1]
    with pytest.raises(ValueError, match="expected 2 exit estimators"):
        PolicyBundle.from_json(data, source="exit_policies.ckpt")
    data = bundle.to_json()
    data["controller"]["statistics"] = ["entropy"]
    with pytest.raises(ValueError, match="statistics"):
        PolicyBundle.from_json(data, source="exit_policies.ckpt")
    data = bundle.to_json()
    del data["controller"]["exits"]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['exits'\]"):
        PolicyBundle.from_json(data, source="exit_policies.ckpt")
    with pytest.raises(ValueError, match="policies.json: .* trained for 3 exits and 4-dimensional"):
        weights.check_model(4, 4, "policies.json")
    with pytest.raises(ValueError, match="has no learned exit controller"):
        make_policy("learned", threshold=0.5, num_exits=3)


@pytest.fixture(scope="module")
def controller_folder(model, tokenizer_path, tmp_path_factory):
    weights = random_weights(num_exits=3, hidden_size=32, seed=5, scale=0.2)
    policies = {"thresholds": {"entropy": 0.99, "learned": 0.5}, "controller": weights.to_json()}
    table = fit_latency_table([{"seconds": 1.0, "ms": [1.0, 2.0, 3.0]}, {"seconds": 2.0, "ms": [2.0, 4.0, 6.0]}])
    features = {"sample_rate": SR, "n_fft": 400, "n_mels": 20, "hop_length": 10, "win_length": 25}
    out = tmp_path_factory.mktemp("ctl") / "inference"
    return export_inference_folder(str(out), model, features, tokenizer_path, 0, policies, table), weights


def test_asr_transcribes_with_the_stored_controller(controller_folder, audio):
    folder, weights = controller_folder
    asr = EarlyExitASR.from_hparams(source=folder)
    assert asr.policies.controller == weights
    assert asr.transcribe_file(audio["a"], policy="learned", threshold=0.0).exit == 1
    assert asr.transcribe_file(audio["a"], policy="learned", threshold=1.0).exit == 3
    result = asr.transcribe_file(audio["a"], policy="learned")  # the stored threshold
    assert result.exit in (1, 2, 3) and result.text is not None


def test_asr_refuses_a_controller_of_another_model(controller_folder, tmp_path):
    import shutil

    folder, _ = controller_folder
    copy = shutil.copytree(folder, tmp_path / "copy")
    path = copy / "exit_policies.ckpt"
    data = json.loads(path.read_text())
    data["controller"] = random_weights(num_exits=3, hidden_size=16).to_json()
    path.write_text(json.dumps(data))
    with pytest.raises(
        ValueError, match=r"exit_policies.ckpt: its learned exit controller was trained for 3 exits and 16"
    ):
        EarlyExitASR.from_hparams(source=str(copy))
    path.write_text('{"controller": {"num_exits": 3, "hidden_')
    with pytest.raises(ValueError, match="exit_policies.ckpt"):
        EarlyExitASR.from_hparams(source=str(copy))


def test_asr_without_controller_refuses_the_learned_policy(asr, audio):
    with pytest.raises(ValueError, match="no learned exit controller"):
        asr.transcribe_file(audio["a"], policy="learned", threshold=0.5)


def test_report_shows_the_controller_size_ranking_and_decision_cost():
    from types import SimpleNamespace

    from earlyexit_brain.evaluation.run import controller_summary, record_stop_auc
    from earlyexit_brain.report import controller_markdown

    gen = torch.Generator().manual_seed(4)
    feats = [torch.randn(60, S + 2, generator=gen) for _ in range(3)]
    errors = torch.stack([(feats[0][:, 0] <= 0).float(), torch.zeros(60), torch.zeros(60)], 1)
    weights = fit_controller(feats, stop_labels(errors), blank_index=0)
    weights.training["held_out_wer"] = [30.0, 20.0, 10.0]
    record_stop_auc(weights, SimpleNamespace(errors=errors, features=feats), "held_out")
    # the encoder takes 10 ms to exit 1 and 10 ms more to exit 2; the controller 0.1 and 0.3 ms
    timing = SimpleNamespace(
        ids=list(range(60)),
        exit_ms=torch.tensor([[10.0, 20.0, 30.0]]).repeat(60, 1),
        policy_ms={"learned": torch.tensor([[0.1, 0.3, 0.0]]).repeat(60, 1)},
    )
    summary = controller_summary(weights, timing, {"test": timing})
    assert summary["parameters"] == parameter_count(weights) == 2 * (3 * (S + 2) + 1)
    assert summary["decision_time_share"] == {"dev": [0.01, 0.03], "test": [0.01, 0.03]}
    md = "\n".join(controller_markdown(summary))
    assert "## Learned exit controller" in md and f"{summary['parameters']:,} parameters" in md
    assert "trained on 60 held-out utterances (WER per exit: 30.00, 20.00, 10.00)" in md
    row = weights.training["exits"][0]
    assert f"| 1 | {row['held_out_stop_is_free']:.3f} | {row['held_out_auc']:.3f} | - | - | 1.00% | 1.00% |" in md
    assert "per exit on the 9 statistics and the mean encoder state" in md and "target 'errors'" in md
    assert "| 2 | 1.000 | - | - | - | 3.00% | 3.00% |" in md  # every stop free: no AUC
