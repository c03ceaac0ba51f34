"""Early validation of the SSL recipes' keys (no model is built, nothing downloads)."""

import json
import os
import subprocess
import sys

import pytest

from earlyexit_brain.config import ConfigError, check_hparams_file

SYNTH = "hparams/synthetic/wav2vec2_ctc_ee.yaml"
LIBRI = [
    "hparams/librispeech/wav2vec2_ctc_ee.yaml",
    "hparams/librispeech/wavlm_ctc_ee.yaml",
    "hparams/librispeech/hubert_ctc_ee.yaml",
]


def fake_model_folder(folder, model_type="wav2vec2", layers=4, hidden=32):
    """A folder with only a config.json: enough for the checks, which never load weights."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as fout:
        json.dump({"model_type": model_type, "num_hidden_layers": layers, "hidden_size": hidden}, fout)
    return str(folder)


def test_shipped_ssl_hparams_are_valid(repo_root, tmp_path):
    raw = check_hparams_file(os.path.join(repo_root, SYNTH))
    assert raw["ssl_source"] == "facebook/wav2vec2-base" and raw["num_layers"] == 12
    sources = set()
    for path in LIBRI:
        raw = check_hparams_file(os.path.join(repo_root, path), {"data_folder": str(tmp_path)})
        assert raw["exit_layers"] == [2, 4, 6, 8, 10, 12] and raw["ssl_lr"] < raw["lr"]
        sources.add(raw["ssl_source"])
    assert sources == {"facebook/wav2vec2-base", "microsoft/wavlm-base-plus", "facebook/hubert-base-ls960"}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"ssl_source": "not a model"}, "key 'ssl_source'.*neither a local model folder nor"),
        ({"ssl_source": "owner/name/extra"}, "key 'ssl_source'"),
        ({"exit_layers": [2, 14]}, "key exit_layers.*out of range"),
    ],
)
def test_bad_ssl_keys_name_the_key(repo_root, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_hparams_file(os.path.join(repo_root, SYNTH), overrides)


def test_local_folder_is_checked(repo_root, tmp_path):
    path = os.path.join(repo_root, SYNTH)
    good = fake_model_folder(tmp_path / "w2v2")
    check_hparams_file(path, {"ssl_source": good, "num_layers": 4, "d_model": 32, "exit_layers": [2, 4]})
    with pytest.raises(ConfigError, match="key exit_layers.*layer 6 is out of range"):
        check_hparams_file(path, {"ssl_source": good, "num_layers": 4, "d_model": 32, "exit_layers": [2, 6]})
    with pytest.raises(ConfigError, match="key 'num_layers' \\(12\\) must equal the num_hidden_layers"):
        check_hparams_file(path, {"ssl_source": good, "d_model": 32})
    bert = fake_model_folder(tmp_path / "bert", model_type="bert")
    with pytest.raises(ConfigError, match="key 'ssl_source'.*'bert' model.*no wav2vec2-style"):
        check_hparams_file(path, {"ssl_source": bert, "num_layers": 4, "d_model": 32})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="key 'ssl_source'.*no config.json"):
        check_hparams_file(path, {"ssl_source": str(tmp_path / "empty")})


def test_ssl_recipe_fails_fast_naming_the_key(repo_root, tmp_path):
    data = tmp_path / "data"
    proc = subprocess.run(
        [
            sys.executable,
            "recipes/train.py",
            SYNTH,
            f"--data_folder={data}",
            f"--output_folder={tmp_path / 'out'}",
            f"--ssl_source={tmp_path / 'missing folder'}",
        ],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "ssl_source" in proc.stderr
    assert not data.exists() and not (tmp_path / "out").exists()
