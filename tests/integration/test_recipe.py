"""End-to-end: recipes/train.py on the smoke configuration."""

import json
import os
import re
import subprocess
import sys

import pytest

SMOKE = "hparams/synthetic/smoke.yaml"


def run_recipe(repo_root, out, data, *extra, timeout=600):
    cmd = [sys.executable, "recipes/train.py", SMOKE, f"--output_folder={out}",
           f"--data_folder={data}", *extra]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def smoke_run(repo_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("smoke")
    out, data = base / "out", base / "data"
    proc = run_recipe(repo_root, out, data)
    return out, data, proc


def train_losses(log_text):
    return [float(m) for m in re.findall(r"^epoch: \d+, .*? - train loss: ([0-9.e+-]+)",
                                          log_text, flags=re.M)]


def test_report_schema(smoke_run):
    out, _, proc = smoke_run
    report = json.loads((out / "report.json").read_text())
    assert report["params_total"] > 0
    assert [e["exit"] for e in report["exits"]] == [1, 2]
    assert [e["layer"] for e in report["exits"]] == [1, 2]
    assert report["exits"][0]["params_to_exit"] < report["exits"][1]["params_to_exit"]
    assert report["exits"][1]["params_to_exit"] <= report["params_total"]
    for e in report["exits"]:
        assert set(e["sets"]) == {"test", "test_unseen_voice"}
        for stats in e["sets"].values():
            assert stats["n"] == 16
            assert 0 <= stats["cer"] and 0 <= stats["wer"]
    assert report["train"]["epochs"] == 6 and report["train"]["seconds"] > 0
    assert 1 <= report["evaluated_epoch"] <= 6
    assert "| exit | layer |" in (out / "report.md").read_text()
    assert "Outputs in" in proc.stdout and "report.json" in proc.stdout
    assert (out / "wer_vs_compute.png").stat().st_size > 1000


def test_loss_went_down_at_every_exit(smoke_run):
    out, _, _ = smoke_run
    log = (out / "train_log.txt").read_text()
    losses = train_losses(log)
    assert len(losses) == 6
    assert losses[-1] < 0.9 * losses[0], losses
    for k in (1, 2):
        per_exit = [float(m) for m in re.findall(rf"train loss_exit{k}: ([0-9.e+-]+)", log)]
        assert per_exit[-1] < per_exit[0], (k, per_exit)


def test_alignment_files_per_exit(smoke_run):
    out, _, _ = smoke_run
    for name in ("test", "test_unseen_voice"):
        for k in (1, 2):
            text = (out / f"wer_{name}_exit{k}.txt").read_text()
            assert "%WER" in text and "ALIGNMENTS" in text


def test_rerun_resumes_without_retraining(repo_root, smoke_run):
    out, data, _ = smoke_run
    before = (out / "train_log.txt").read_text()
    report_before = json.loads((out / "report.json").read_text())
    run_recipe(repo_root, out, data)
    after = (out / "train_log.txt").read_text()
    assert len(train_losses(after)) == len(train_losses(before))  # no epoch trained again
    report_after = json.loads((out / "report.json").read_text())
    assert report_after["exits"] == report_before["exits"]
