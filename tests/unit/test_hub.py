"""Publishing (earlyexit_brain/hub, recipes/publish.py), safe loading and the transcribe command.

The experiment is a tiny random model exported by the shared fixtures with a
report written by the report code; the Hub is replaced by a recorder at the
HfApi boundary, and Hub-id loading runs offline from a generated cache.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from huggingface_hub import ModelCard
from recipe_modules import recipe
from signals import SR, tone

from earlyexit_brain import hub
from earlyexit_brain.files import OWNER_MARKER
from earlyexit_brain.inference import EarlyExitASR
from earlyexit_brain.report import build_report, write_report
from earlyexit_brain.safe_load import UnsafeHparamsError, unsafe_tags
from earlyexit_brain.transcribe import main as transcribe_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECRET = "hf_TESTsecretTOKEN0123456789"
HPARAMS = """\
sample_rate: 16000
data_folder: {data}
prepare_corpus: !name:earlyexit_brain.data.synthetic.prepare_synthetic
test_sets: [test, test_unseen_voice]
test_csv:
    test: !ref <data_folder>/test.csv
    test_unseen_voice: !ref <data_folder>/test_unseen_voice.csv
"""


def make_experiment(base, folder, model):
    """An experiment folder as training leaves it: report, hyperparams, manifests, inference/."""
    exp, data = base / "exp", base / "data"
    data.mkdir(parents=True)
    sf.write(str(data / "long.wav"), tone(11.0, seed=3), SR)
    sf.write(str(data / "u1.wav"), tone(1.5, freq=300, seed=4), SR)
    for name in ("test", "test_unseen_voice"):
        (data / f"{name}.csv").write_text(
            "ID,duration,wav,spk_id,wrd\nl,11.0,$data_root/long.wav,s1,THE CAT\nu1,1.5,$data_root/u1.wav,s1,THE MAT\n"
        )
    exp.mkdir()
    (exp / "hyperparams.yaml").write_text(HPARAMS.format(data=data))
    shutil.copytree(folder, exp / "inference")
    results = {
        name: [{"exit": k + 1, "wer": 90.0 - 10 * k + i, "cer": 50.0 - 5 * k, "n": 2} for k in range(3)]
        for i, name in enumerate(("test", "test_unseen_voice"))
    }
    report = build_report(
        model.encoder, model.heads, results, train={"epochs": 1, "seconds": 2.0}, extra={"exit_layers": [2, 4, 6]}
    )
    write_report(report, str(exp))
    return exp


@pytest.fixture
def experiment(tmp_path, folder, model):
    return make_experiment(tmp_path, folder, model)


@pytest.fixture(scope="module")
def built(tmp_path_factory, folder, model):
    base = tmp_path_factory.mktemp("built")
    exp = make_experiment(base, folder, model)
    return exp, hub.build_hub_folder(str(exp), str(base / "hub"), "alice/tiny-ee")


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records what would be sent."""

    instances = []
    existing = set()

    def __init__(self, token=None, **kwargs):
        self.token = token
        self.calls = []
        RecordingApi.instances.append(self)

    def repo_exists(self, repo_id, repo_type=None):
        self.calls.append(("repo_exists", repo_id))
        return repo_id in RecordingApi.existing

    def create_repo(self, repo_id, repo_type=None, private=False, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, repo_type=None, commit_message=None, ignore_patterns=()):
        import fnmatch

        sent = [
            name
            for name in sorted(os.listdir(folder_path))
            if not any(fnmatch.fnmatch(name, pattern) for pattern in ignore_patterns)
        ]
        self.calls.append(("upload_folder", folder_path, repo_id, sent))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


@pytest.fixture
def recorder(monkeypatch):
    import huggingface_hub

    RecordingApi.instances = []
    RecordingApi.existing = set()
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    return RecordingApi


def publish(*args):
    return recipe("publish").main([str(a) for a in args])


# ------------------------------------------------------------------ the folder
def test_folder_has_what_the_hub_and_speechbrain_need(built):
    _, out = built
    assert sorted(os.listdir(out)) == sorted(
        list(hub.MODEL_FILES)
        + ["README.md", "config.json", "example.wav", "report.json", "wer_vs_compute.png", OWNER_MARKER]
    )
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["speechbrain"]["interface"] == "EncoderASR"
    assert config["earlyexit_brain"]["interface"] == "earlyexit_brain.inference.EarlyExitASR"
    assert config["earlyexit_brain"]["exit_layers"] == [2, 4, 6]
    # the example is the first test utterance of at most 10 s, as 16-bit mono
    info = sf.info(os.path.join(out, "example.wav"))
    assert info.samplerate == SR and info.channels == 1 and info.subtype == "PCM_16"
    assert abs(info.duration - 1.5) < 0.01


def test_model_card_front_matter_and_model_index(built):
    exp, out = built
    card = ModelCard.load(os.path.join(out, "README.md"))
    data = card.data
    assert data.pipeline_tag == "automatic-speech-recognition"
    assert data.library_name == "speechbrain" and data.license == "apache-2.0"
    assert data.language == "en" and "early-exit" in data.tags and data.metrics == ["wer"]
    assert data.datasets == ["earlyexit_brain-synthetic"]
    report = json.load(open(exp / "report.json"))
    expected = {
        (s, f"WER exit {e['exit']} (layer {e['layer']})"): stats["wer"]
        for e in report["exits"]
        for s, stats in e["sets"].items()
    }
    got = {(r.dataset_split, r.metric_name): r.metric_value for r in data.eval_results}
    assert got == expected and len(got) == 6
    assert all(r.task_type == "automatic-speech-recognition" and r.metric_type == "wer" for r in data.eval_results)
    assert "| exit | layer |" in card.text and "](wer_vs_compute.png)" in card.text
    assert 'EarlyExitASR.from_hparams(source="alice/tiny-ee"' in card.text
    assert "EncoderASR.from_hparams" in card.text
    assert "one\nConformer encoder of" in card.text and "conformer" in data.tags


def test_model_card_names_an_ssl_backbone():
    kind = hub.encoder_kind({"encoder": "new:earlyexit_brain.models.ssl.EarlyExitSSLEncoder"})
    report = {
        "params_total": 10,
        "num_layers": 12,
        "train": {"epochs": 1, "seconds": 1.0},
        "exits": [{"exit": 1, "layer": 2, "params_to_exit": 5, "sets": {"test": {"wer": 50.0, "cer": 20.0, "n": 1}}}],
    }
    card = hub.build_model_card(report, "alice/ssl-ee", ("custom", "custom corpus"), {}, with_plot=False, encoder=kind)
    assert "self-supervised (wav2vec2-family) encoder" in card.text and "wav2vec2" in card.data.tags
    assert "Conformer" not in card.text


def test_validation_loads_both_interfaces(built):
    _, out = built
    texts = hub.validate_hub_folder(out)
    asr = EarlyExitASR.from_hparams(source=out)
    assert texts["earlyexit_brain"] == asr.transcribe_file(os.path.join(out, "example.wav")).text
    # stock EncoderASR transcribes at the default exit (the last one here)
    assert texts["encoder_asr"] == asr.transcribe_file(os.path.join(out, "example.wav"), exit=3).text


def test_example_option_resamples_and_down_mixes(tmp_path, experiment):
    stereo = np.stack([tone(1.0, sr=8000), tone(1.0, sr=8000)], axis=1)
    sf.write(str(tmp_path / "mine.flac"), stereo, 8000)
    out = hub.build_hub_folder(str(experiment), str(tmp_path / "hub"), "alice/x", example=str(tmp_path / "mine.flac"))
    info = sf.info(os.path.join(out, "example.wav"))
    assert info.samplerate == SR and info.channels == 1 and abs(info.duration - 1.0) < 0.01


# --------------------------------------------------------------- publish command
def test_dry_run_makes_no_network_call(tmp_path, experiment, recorder, capsys):
    assert publish(experiment, "--repo-id", "alice/tiny-ee", "--dry-run", "--out", tmp_path / "h") == 0
    assert recorder.instances == []
    out = capsys.readouterr().out
    assert "Validated" in out and "Dry run: nothing uploaded." in out


def test_upload_goes_through_hfapi_and_never_shows_the_token(tmp_path, experiment, recorder, capsys, caplog):
    caplog.set_level("DEBUG")
    assert publish(experiment, "--repo-id", "alice/tiny-ee", "--private", "--out", tmp_path / "h") == 0
    (api,) = recorder.instances
    assert api.token == SECRET
    names = [c[0] for c in api.calls]
    assert names == ["repo_exists", "repo_exists", "create_repo", "upload_folder"]
    assert api.calls[2] == ("create_repo", "alice/tiny-ee", True, False)
    assert api.calls[3][1] == str(tmp_path / "h") and "model.ckpt" in api.calls[3][3]
    assert OWNER_MARKER not in api.calls[3][3]  # the folder's marker is not uploaded
    captured = capsys.readouterr()
    assert "Uploaded to https://huggingface.co/alice/tiny-ee" in captured.out
    assert SECRET not in captured.out + captured.err + caplog.text


def test_validation_failure_refuses_the_upload(tmp_path, experiment, recorder, capsys):
    (experiment / "inference" / "model.ckpt").write_bytes(b"not a checkpoint")
    assert publish(experiment, "--repo-id", "alice/tiny-ee", "--out", tmp_path / "h") == 1
    assert "EarlyExitASR could not load" in capsys.readouterr().err
    assert all(c[0] == "repo_exists" for api in recorder.instances for c in api.calls)


def test_existing_repo_needs_exist_ok(tmp_path, experiment, recorder, capsys):
    recorder.existing.add("alice/tiny-ee")
    assert publish(experiment, "--repo-id", "alice/tiny-ee", "--out", tmp_path / "h") == 1
    assert "already exists" in capsys.readouterr().err and not (tmp_path / "h").exists()
    assert publish(experiment, "--repo-id", "alice/tiny-ee", "--exist-ok", "--out", tmp_path / "h") == 0
    assert recorder.instances[-1].calls[-2] == ("create_repo", "alice/tiny-ee", False, True)


@pytest.mark.parametrize(
    "repo_id", ["tiny-ee", "alice/", "/tiny", "a/b/c", "alice/ti ny", "alice/-x", "alice/x..y", "alice/x--y", "al!ce/x"]
)
def test_bad_repo_ids(tmp_path, experiment, recorder, capsys, repo_id):
    assert publish(experiment, "--repo-id", repo_id, "--out", tmp_path / "h") == 1
    assert "not of the form OWNER/NAME" in capsys.readouterr().err
    assert recorder.instances == []


def test_bad_experiment_folders(tmp_path, experiment, recorder, capsys):
    def error(folder):
        assert publish(folder, "--repo-id", "alice/x", "--dry-run", "--out", tmp_path / "h") == 1
        return capsys.readouterr().err

    assert "no such experiment folder" in error(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "is not an experiment folder: report.json is missing" in error(tmp_path / "empty")
    os.remove(experiment / "inference" / "model.ckpt")
    assert "missing model.ckpt" in error(experiment)
    shutil.rmtree(experiment / "inference")
    assert "run: python recipes/evaluate.py" in error(experiment)
    assert not (tmp_path / "h").exists()


def test_no_token_is_a_clear_error(tmp_path, experiment, recorder, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(hub.folder, "hub_token", lambda: None)
    monkeypatch.setattr(recipe("publish"), "hub_token", lambda: None)
    assert publish(experiment, "--repo-id", "alice/x", "--out", tmp_path / "h") == 1
    assert "no Hugging Face token" in capsys.readouterr().err


# ---------------------------------------------------------------- safe loading
def tampered(folder, tmp_path, extra):
    copy = tmp_path / "tampered"
    shutil.copytree(folder, copy)
    with open(copy / "hyperparams.yaml", "a") as fout:
        fout.write(extra)
    return copy


def test_own_inference_yaml_is_on_the_allowlist(folder):
    assert unsafe_tags(open(os.path.join(folder, "hyperparams.yaml")).read()) == []


@pytest.mark.parametrize(
    "extra, words",
    [
        ("pwn: !apply:os.system ['touch {marker}']\n", "!apply:os.system (os.system is not on"),
        ("pwn: !name:speechbrain.utils.superpowers.run_shell\n", "run_shell is not on the allowlist"),
        ("pwn: !new:subprocess.Popen [['touch', '{marker}']]\n", "subprocess.Popen"),
        ("pwn: !include:other.yaml\n", "!include:other.yaml (reaches outside the file)"),
        ("pwn: !!python/object/apply:os.system ['touch {marker}']\n", "a Python object tag"),
    ],
)
def test_disallowed_yaml_is_refused_before_anything_runs(folder, tmp_path, extra, words):
    marker = tmp_path / "ran"
    copy = tampered(folder, tmp_path, extra.format(marker=marker))
    with pytest.raises(UnsafeHparamsError, match="trust_remote_code=True") as err:
        EarlyExitASR.from_hparams(source=str(copy))
    assert words in str(err.value) and "hyperparams.yaml, line " in str(err.value)
    assert not marker.exists()


def test_trust_remote_code_loads_what_the_allowlist_refuses(folder, tmp_path):
    copy = tampered(folder, tmp_path, "extra: !new:collections.OrderedDict\n")
    with pytest.raises(UnsafeHparamsError):
        EarlyExitASR.from_hparams(source=str(copy))
    asr = EarlyExitASR.from_hparams(source=str(copy), trust_remote_code=True)
    assert asr.num_exits == 3


# ------------------------------------------------------- Hub ids and the command
def fake_hub_cache(cache, repo_id, folder):
    """The Hugging Face cache layout of one downloaded revision of ``repo_id``."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


def test_hub_id_loads_offline_from_the_cache(built, tmp_path):
    _, out = built
    fake_hub_cache(tmp_path / "cache", "alice/tiny-ee", out)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"), PYTHONPATH=ROOT)
    example = os.path.join(out, "example.wav")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "earlyexit_brain.transcribe",
            "alice/tiny-ee",
            example,
            "--exit",
            "2",
            "--savedir",
            str(tmp_path / "saved"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    path, exit_used, ms, text = proc.stdout.strip().split("\t")
    assert path == example and exit_used == "exit 2 (4 layers)" and ms.endswith(" ms")
    expected = EarlyExitASR.from_hparams(source=out).transcribe_file(example, exit=2).text
    assert text == expected
    proc = subprocess.run(
        [sys.executable, "-m", "earlyexit_brain.transcribe", "alice/missing", example],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 2 and "alice/missing: cannot fetch the model's files" in proc.stderr


def test_transcribe_command_reports_bad_files_and_goes_on(folder, audio, capsys):
    rc = transcribe_main([folder, audio["a"], audio["garbage"], audio["b"], "--exit", "1"])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert rc == 1 and [line.split("\t")[0] for line in lines] == [audio["a"], audio["b"]]
    assert all(line.split("\t")[1] == "exit 1 (2 layers)" for line in lines)
    assert audio["garbage"] in captured.err and "1 of 3 files failed" in captured.err
    assert transcribe_main([folder, audio["a"], "--budget-ms", "1000"]) == 0
    assert capsys.readouterr().out.split("\t")[1] == "exit 3 (6 layers)"
    assert transcribe_main([folder, audio["a"], "--policy", "entropy", "--threshold", "0.5"]) == 0
    capsys.readouterr()
    assert transcribe_main([folder, audio["a"], "--exit", "1", "--decoder", "ctc_beam"]) == 0
    assert capsys.readouterr().out.split("\t")[1] == "exit 1 (2 layers)"
    assert transcribe_main([folder, audio["a"], "--exit", "9"]) == 2
    assert "exit: the model has exits 1..3, got 9" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        transcribe_main([folder, audio["a"], "--threshold", "0.5"])
    with pytest.raises(SystemExit):
        transcribe_main([folder, audio["a"], "--exit", "1", "--policy", "entropy"])
