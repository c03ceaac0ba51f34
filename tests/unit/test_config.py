"""Configuration errors are caught before any expensive work and name the key."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from earlyexit_brain.brain_options import BrainOptions
from earlyexit_brain.config import ConfigError, check_hparams, check_hparams_file, read_raw_hparams

HPARAMS = [
    "hparams/synthetic/conformer_ctc_ee.yaml",
    "hparams/synthetic/conformer_ctc_single.yaml",
    "hparams/synthetic/smoke.yaml",
]


@pytest.mark.parametrize("path", HPARAMS)
def test_shipped_hparams_are_valid(repo_root, path):
    raw = check_hparams_file(os.path.join(repo_root, path))
    assert raw["test_sets"] == ["test", "test_unseen_voice"]


def load_default(repo_root, overrides=None):
    return read_raw_hparams(os.path.join(repo_root, HPARAMS[0]), overrides)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"exit_layers": [2, 4, 8]}, "exit_layers"),  # out of range
        ({"exit_layers": [4, 2, 6]}, "exit_layers"),  # unsorted
        ({"exit_layers": [2, 2, 6]}, "exit_layers"),  # duplicated
        ({"exit_layers": [0, 6]}, "exit_layers"),
        ({"exit_loss_weights": [1.0, 1.0]}, "exit_loss_weights"),  # 2 weights, 3 exits
        ({"exit_loss_weights": [1, -1, 1]}, "exit_loss_weights"),
        ({"exit_loss_weights": [0, 0, 0]}, "exit_loss_weights"),
        ({"exit_distillation_weight": -0.5}, "exit_distillation_weight"),
        ({"exit_distillation_weight": "yes"}, "exit_distillation_weight"),
        ({"exit_distillation_from_epoch": 0}, "exit_distillation_from_epoch"),
        ({"number_of_epochs": "ten"}, "number_of_epochs"),
        ({"ckpt_interval_minutes": -1}, "ckpt_interval_minutes"),
        ({"ckpt_interval_steps": 2.5}, "ckpt_interval_steps"),
        ({"ckpt_interval_minutes": 5, "ckpt_interval_steps": 10}, "ckpt_interval_steps"),
        ({"nonfinite_patience": -1}, "nonfinite_patience"),
        ({"bad_audio": "ignore"}, "bad_audio"),
        ({"max_audio_seconds": 0}, "max_audio_seconds"),
        ({"policy_sweep": ["entropy", "oracle"]}, "policy_sweep"),
        ({"default_policy": "budget"}, "default_policy"),
        ({"policy_sweep": ["entropy"]}, "default_policy"),  # posterior is not calibrated
        ({"calibration_target": "speed"}, "calibration_target"),
        ({"calibration_value": -1}, "calibration_value"),
        ({"calibration_confidence": 1.0}, "calibration_confidence"),
        ({"calibration_confidence": "high"}, "calibration_confidence"),
        ({"posterior_greedy_form": "median"}, "posterior_greedy_form"),
        ({"latency_durations": [2.0]}, "latency_durations"),
        ({"nbest_beam_size": 1}, "nbest_beam_size"),
        ({"nbest_token_prune_logp": 0}, "nbest_token_prune_logp"),
        ({"nbest_token_prune_logp": "low"}, "nbest_token_prune_logp"),
        ({"number_of_epochs": 0}, "number_of_epochs"),
        ({"lr": "fast"}, "lr"),
        ({"dropout": 1.5}, "dropout"),
        ({"d_model": 100, "nhead": 3}, "nhead"),
        ({"token_type": "words"}, "token_type"),
        ({"dynamic_batching": "maybe"}, "dynamic_batching"),
        ({"kernel_size": 14}, "kernel_size"),
        ({"valid_decoder": "greedy"}, "valid_decoder"),
        ({"test_decoders": []}, "test_decoders"),
        ({"lr_annealing": 0.5}, "lr_annealing"),
    ],
)
def test_bad_values_name_the_key(repo_root, overrides, key):
    raw = load_default(repo_root, overrides)
    with pytest.raises(ConfigError) as err:
        check_hparams(raw)
    assert f"'{key}'" in str(err.value) or f"key {key}" in str(err.value)


def test_weights_matching_exits_are_accepted(repo_root):
    assert check_hparams(load_default(repo_root, {"exit_loss_weights": [0.5, 1, 2]})) == {"exit_layers": [2, 4, 6]}
    assert check_hparams(load_default(repo_root, {"exit_layers": "every_3", "exit_loss_weights": [1, 1]}))


def test_unknown_override_is_an_error(repo_root):
    with pytest.raises(ConfigError, match="numbr_of_epochs"):
        load_default(repo_root, {"numbr_of_epochs": 3})


def test_data_folder_that_is_a_file(repo_root, tmp_path):
    path = tmp_path / "not_a_folder"
    path.write_text("x")
    with pytest.raises(ConfigError, match="'data_folder'"):
        check_hparams(load_default(repo_root, {"data_folder": str(path)}))


def test_missing_data_folder_when_it_must_exist(repo_root, tmp_path):
    raw = load_default(repo_root, {"data_folder": str(tmp_path / "nowhere")})
    raw["data_folder_must_exist"] = True  # real corpora set this key
    with pytest.raises(ConfigError, match="does not exist"):
        check_hparams(raw)


def test_missing_hparams_file():
    with pytest.raises(ConfigError, match="not found"):
        read_raw_hparams("no/such/file.yaml")


@pytest.mark.parametrize("text", ["a: 1\nb: [unclosed\n", "a: 1\n  b: 2\n- c\n"])
def test_malformed_yaml_names_the_file_and_line(tmp_path, text):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        read_raw_hparams(str(path))
    assert str(path) in str(err.value) and "line" in str(err.value)


def test_recipe_fails_fast_naming_the_key(repo_root, tmp_path):
    """The recipe stops before generating any data or building the model."""
    data = tmp_path / "data"
    proc = subprocess.run(
        [
            sys.executable,
            "recipes/train.py",
            HPARAMS[0],
            f"--data_folder={data}",
            f"--output_folder={tmp_path / 'out'}",
            "--exit_layers=[4, 2, 6]",
        ],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "exit_layers" in proc.stderr and "ascending" in proc.stderr
    assert not data.exists() and not (tmp_path / "out").exists()


REAL = [
    "hparams/librispeech/conformer_ctc_ee.yaml",
    "hparams/librispeech/conformer_ctc_single.yaml",
    "hparams/tedlium/conformer_ctc_ee.yaml",
]


@pytest.mark.parametrize("path", REAL)
def test_real_corpus_hparams_are_valid_once_data_folder_is_given(repo_root, tmp_path, path):
    full = os.path.join(repo_root, path)
    with pytest.raises(ConfigError, match="key 'data_folder' must be given on the command line"):
        check_hparams_file(full)
    with pytest.raises(ConfigError, match="'data_folder' does not exist"):
        check_hparams_file(full, {"data_folder": str(tmp_path / "nowhere")})
    raw = check_hparams_file(full, {"data_folder": str(tmp_path)})
    assert raw["token_type"] == "bpe" and raw["output_neurons"] == 256
    assert raw["avg_checkpoints"] <= raw["checkpoints_to_keep"]
    assert raw["corpus_options"]["on_error"] == "fail"


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"avg_checkpoints": 0}, "avg_checkpoints"),
        ({"avg_checkpoints": 11}, "avg_checkpoints"),  # more than checkpoints_to_keep (10)
        ({"on_error": "ignore"}, "on_error"),
        ({"max_utterances": 0}, "max_utterances"),
        ({"train_splits": "train-clean-100"}, "train_splits"),
        ({"attention_type": "fancy"}, "attention_type"),
        ({"abs_pos_encoding": "maybe"}, "abs_pos_encoding"),
        ({"wav_augment": "speed"}, "wav_augment"),
        ({"fea_augment": 3}, "fea_augment"),
        ({"grad_accumulation_factor": 0}, "grad_accumulation_factor"),
        ({"manifest_folder": ""}, "manifest_folder"),
    ],
)
def test_new_keys_name_the_key(repo_root, tmp_path, overrides, key):
    raw = read_raw_hparams(os.path.join(repo_root, REAL[0]), dict(overrides, data_folder=str(tmp_path)))
    with pytest.raises(ConfigError) as err:
        check_hparams(raw)
    assert f"'{key}'" in str(err.value)


def test_corpus_options_are_checked(repo_root, tmp_path):
    raw = read_raw_hparams(os.path.join(repo_root, REAL[2]), {"data_folder": str(tmp_path)})
    raw["corpus_options"]["partition"] = "legacyy"
    with pytest.raises(ConfigError, match="'corpus_options.partition'"):
        check_hparams(raw)
    raw["corpus_options"].update(partition="legacy", splits=["train", "eval"])
    with pytest.raises(ConfigError, match="'corpus_options.splits'"):
        check_hparams(raw)
    raw["corpus_options"].update(splits=["train"], num_workers=0)
    with pytest.raises(ConfigError, match="'corpus_options.num_workers'"):
        check_hparams(raw)


def test_brain_options_check_the_objects_the_hooks_call():
    """The Brain reads its keys once, through BrainOptions: a plain value where an object is
    called is refused naming the key; null takes the default."""
    with pytest.raises(ConfigError, match="'lr_annealing'"):
        BrainOptions.from_hparams(SimpleNamespace(lr_annealing=0.5))
    with pytest.raises(ConfigError, match="'train_clock'"):
        BrainOptions.from_hparams(SimpleNamespace(train_clock=3))
    options = BrainOptions.from_hparams(SimpleNamespace(avg_checkpoints=None, fea_augment=len))
    assert options.avg_checkpoints == 1
    assert options.augmenters == [len]
    assert options.valid_decoder is None and options.test_decoders is None  # the Brain's default decoder
