"""No command deletes or overwrites a path it did not create (earlyexit_brain.files).

Each writer is given a folder or file of the user's (with content of its own) and must
refuse it by name, leaving every byte in place; a folder it made itself is reused or
replaced as before.
"""

import json
import os
import subprocess
import sys

import pytest
from recipe_modules import recipe
from test_hub import make_experiment

from benchmarks import soak
from benchmarks.__main__ import main as benchmarks_main
from earlyexit_brain import hub
from earlyexit_brain.data.librispeech import prepare_librispeech
from earlyexit_brain.data.synthetic import prepare_synthetic
from earlyexit_brain.data.tedlium import prepare_tedlium
from earlyexit_brain.export import export_inference_folder
from earlyexit_brain.files import OWNER_MARKER, NotOurFolderError, atomic_folder, claim_folder, folder_kind
from tests.real_corpora import make_librispeech, make_tedlium

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def users_folder(path, files=None):
    """A folder of the user's: some files and a wavs/ folder, nothing this package made."""
    files = files or {"notes.txt": "mine\n", "train.csv": "ID,wrd\nx,MY OWN\n", "wavs/keep.wav": "not really audio"}
    for name, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(path, name)) or path, exist_ok=True)
        with open(os.path.join(path, name), "w") as fout:
            fout.write(text)
    return snapshot(path)


def snapshot(path):
    found = {}
    for folder, _, names in os.walk(path):
        for name in names:
            full = os.path.join(folder, name)
            with open(full, "rb") as fin:
                found[os.path.relpath(full, path)] = fin.read()
    return found


# --------------------------------------------------------------- the helper itself
def test_claim_folder_accepts_new_empty_own_and_legacy_folders(tmp_path):
    assert claim_folder(str(tmp_path / "new"), "kind_a", "key") == str(tmp_path / "new")
    assert folder_kind(str(tmp_path / "new")) == "kind_a"
    (tmp_path / "new" / "file").write_text("x")
    claim_folder(str(tmp_path / "new"), "kind_a", "key")  # ours: reused
    (tmp_path / "empty").mkdir()
    claim_folder(str(tmp_path / "empty"), "kind_a", "key")
    users_folder(str(tmp_path / "legacy"), {"stamp.json": "{}"})
    claim_folder(str(tmp_path / "legacy"), "kind_a", "key", legacy=("stamp.json",))
    assert folder_kind(str(tmp_path / "legacy")) == "kind_a"


@pytest.mark.parametrize("setup", ["user", "other_kind", "bad_marker"])
def test_claim_folder_refuses_what_is_not_its_own(tmp_path, setup):
    target = str(tmp_path / "f")
    before = users_folder(target)
    if setup == "other_kind":
        claim_folder(str(tmp_path / "g"), "kind_b", "key")
        os.replace(str(tmp_path / "g" / OWNER_MARKER), os.path.join(target, OWNER_MARKER))
        before = snapshot(target)
    elif setup == "bad_marker":
        (tmp_path / "f" / OWNER_MARKER).write_text("not json")
        before = snapshot(target)
    with pytest.raises(NotOurFolderError, match=r"the_key: .*/f: refusing"):
        claim_folder(target, "kind_a", "the_key")
    assert snapshot(target) == before


def test_atomic_folder_refuses_before_the_block_runs(tmp_path):
    target = str(tmp_path / "out")
    before = users_folder(target)
    ran = []
    with pytest.raises(NotOurFolderError, match="--out"):
        with atomic_folder(target, "hub_folder", "--out"):
            ran.append(True)
    assert not ran and snapshot(target) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary folder left


# ------------------------------------------------------------- the synthetic corpus
@pytest.mark.parametrize(
    "files",
    [
        None,  # manifests and wavs/ of the user's
        {"wavs/train/a.wav": "x"},  # only a wavs/ folder
        {"dev.csv": "ID\n", "test.csv": "ID\n"},  # only manifests
        {"photo.jpg": "jpeg"},  # anything else
    ],
)
def test_the_synthetic_corpus_touches_only_a_folder_it_made(tmp_path, files):
    target = str(tmp_path / "data")
    before = users_folder(target, files)
    with pytest.raises(NotOurFolderError, match=r"data_folder: .*data: refusing"):
        prepare_synthetic(target, num_workers=1, n_train=4)
    assert snapshot(target) == before


def train_smoke(cwd, data_folder, output_folder):
    """``recipes/train.py`` on the smoke configuration with these folders, in a subprocess."""
    return subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "recipes", "train.py"),
            os.path.join(ROOT, "hparams", "synthetic", "smoke.yaml"),
            f"--data_folder={data_folder}",
            f"--output_folder={output_folder}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(cwd),
    )


def test_the_synthetic_recipe_refuses_a_users_data_folder(tmp_path):
    target = str(tmp_path / "mine")
    before = users_folder(target)
    proc = train_smoke(tmp_path, data_folder=target, output_folder=tmp_path / "exp")
    assert proc.returncode != 0
    assert f"data_folder: {target}: refusing" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(target) == before


# ------------------------------------------------------------------- experiment folders
def test_training_refuses_a_users_output_folder(tmp_path):
    target = str(tmp_path / "project")
    before = users_folder(target, {"hyperparams.yaml": "mine: 1\n", "log.txt": "my log\n"})
    proc = train_smoke(tmp_path, data_folder=tmp_path / "data", output_folder=target)
    assert proc.returncode != 0
    assert f"output_folder: {target}: refusing" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(target) == before and not (tmp_path / "data").exists()


def test_evaluate_refuses_a_folder_that_is_not_an_experiment(tmp_path):
    target = str(tmp_path / "project")
    before = users_folder(target, {"hyperparams.yaml": "output_folder: elsewhere\n"})
    with pytest.raises(SystemExit, match="not an experiment folder made by recipes/train.py"):
        recipe("evaluate").main([target])
    assert snapshot(target) == before


# ------------------------------------------------------------------ real corpora
def test_real_corpus_preparation_refuses_a_users_manifest_folder(tmp_path):
    libri, ted = str(tmp_path / "LibriSpeech"), str(tmp_path / "TEDLIUM_release-3")
    make_librispeech(libri)
    make_tedlium(ted)
    target = str(tmp_path / "manifests")
    before = users_folder(target, {"train.csv": "ID,wrd\nmine,MINE\n", "dev.csv": "x\n"})
    with pytest.raises(NotOurFolderError, match="manifest_folder"):
        prepare_librispeech(libri, target, train_splits=["train-clean-100"], num_workers=1)
    with pytest.raises(NotOurFolderError, match="manifest_folder"):
        prepare_tedlium(ted, target)
    assert snapshot(target) == before


# ------------------------------------------------------------ inference and Hub folders
def test_export_refuses_a_users_folder(tmp_path, model, tokenizer_path):
    target = str(tmp_path / "inference")
    before = users_folder(target)
    features = dict(sample_rate=16000, n_fft=400, n_mels=40, hop_length=10, win_length=25)
    with pytest.raises(NotOurFolderError, match="inference folder"):
        export_inference_folder(target, model, features, tokenizer_path, 0)
    assert snapshot(target) == before
    own = export_inference_folder(str(tmp_path / "own"), model, features, tokenizer_path, 0)
    export_inference_folder(own, model, features, tokenizer_path, 0)  # its own: replaced
    assert folder_kind(own) == "inference_folder"


@pytest.mark.parametrize("where", ["cwd", "users", "inference"])
def test_publish_replaces_only_a_hub_folder_it_built(tmp_path, folder, model, where, capsys, monkeypatch):
    experiment = make_experiment(tmp_path / "base", folder, model)
    work = tmp_path / "work"
    users_folder(str(work))
    out = {"cwd": ".", "users": str(work), "inference": str(experiment / "inference")}[where]
    target = str(experiment / "inference") if where == "inference" else str(work)
    before = snapshot(target)
    monkeypatch.chdir(work)
    rc = recipe("publish").main([str(experiment), "--repo-id", "alice/x", "--dry-run", "--out", out])
    assert rc == 1
    err = capsys.readouterr().err
    assert "--out: " in err and "refusing" in err
    assert snapshot(target) == before


def test_publish_rebuilds_its_own_hub_folder(tmp_path, folder, model):
    experiment = make_experiment(tmp_path, folder, model)
    out = str(tmp_path / "hub")
    hub.build_hub_folder(str(experiment), out, "alice/tiny-ee")
    (tmp_path / "hub" / "stale.txt").write_text("from an older build")
    hub.build_hub_folder(str(experiment), out, "alice/tiny-ee")
    assert folder_kind(out) == "hub_folder" and not os.path.exists(os.path.join(out, "stale.txt"))


# ------------------------------------------------------------------ result files
@pytest.mark.parametrize(
    "main, args",
    [
        (benchmarks_main, ["--only", "frontend", "--quick"]),
        (soak.main, ["MODEL", "--files", "10"]),
    ],
)
def test_result_files_of_the_tools_overwrite_only_their_own(tmp_path, main, args, folder):
    target = tmp_path / "results.json"
    target.write_text(json.dumps({"my": "data"}))
    args = [folder if a == "MODEL" else a for a in args]
    with pytest.raises(SystemExit) as err:
        main(args + ["--out", str(target)])
    assert err.value.code != 0
    assert json.loads(target.read_text()) == {"my": "data"}
