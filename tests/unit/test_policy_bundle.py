"""The stored exit-policy bundle is one type: written by the policy evaluation, read the same way by
EarlyExitASR and the ONNX runtime, with clear errors for a document that does not fit."""

import json

import pytest

from earlyexit_brain.policy_bundle import PolicyBundle

STORED = {
    "default": {"policy": "entropy", "threshold": 0.25},
    "thresholds": {"entropy": 0.25, "budget": 12.0},
    "options": {"entropy": {"normalize": True}, "posterior": {"beam_size": 4}},
    "calibration": {"target": "max_wer_increase", "value": 1.0},
    "decoding": {"decoder": "ctc_beam", "beam_size": 4, "lm": False, "alpha": 0.5, "beta": 1.0},
}


def test_round_trip_and_lookups():
    bundle = PolicyBundle.from_json(json.loads(json.dumps(STORED)))
    assert bundle.to_json() == STORED
    assert bundle.threshold("entropy") == 0.25 and bundle.threshold("posterior") is None
    assert bundle.policy_options("posterior") == {"beam_size": 4} and bundle.policy_options("budget") == {}


def test_an_empty_or_older_bundle_means_the_last_exit_and_greedy_decoding():
    for data in (None, {}, {"thresholds": {"entropy": 0.1}, "decoding": None}):
        bundle = PolicyBundle.from_json(data)
        assert bundle.default is None and bundle.decoding == {"decoder": "ctc_greedy"}


@pytest.mark.parametrize(
    "change, key",
    [
        ({"default": {"policy": "fixed"}}, "default"),
        ({"default": {"policy": "entropy", "threshold": "low"}}, "default"),
        ({"thresholds": {"oracle": 0.1}}, "thresholds"),
        ({"thresholds": {"entropy": None}}, "thresholds"),
        ({"options": {"entropy": True}}, "options"),
        ({"decoding": {"beam_size": 3}}, "decoding"),
        ({"extra": 1}, "unknown key"),
    ],
)
def test_a_bundle_that_does_not_fit_names_the_file_and_key(change, key):
    with pytest.raises(ValueError, match=rf"^policies\.json: .*{key}"):
        PolicyBundle.from_json({**STORED, **change}, source="policies.json")


def test_an_exported_folder_holds_a_bundle(folder):
    from earlyexit_brain.inference import EarlyExitASR

    asr = EarlyExitASR.from_hparams(source=folder, savedir=folder)
    assert isinstance(asr.policies, PolicyBundle)
    assert PolicyBundle.from_json(asr.policies.to_json()) == asr.policies
