"""Crash and resume: the smoke recipe killed with SIGKILL mid-epoch, then rerun."""

import json
import re
import signal
import subprocess
import sys
import time

from smoke import SMOKE, exit_results, run_recipe  # tests/integration/smoke.py


def epochs_logged(out):
    log = out / "train_log.txt"
    return len(re.findall(r"^epoch: \d+", log.read_text(), flags=re.M)) if log.exists() else 0


def checkpoint_inside_a_new_epoch(out):
    """Whether an intra-epoch checkpoint was saved after the last epoch line was logged
    (so it belongs to the epoch now running, not to the one just finished)."""
    log = out / "train_log.txt"
    if not log.exists():
        return False
    logged = log.stat().st_mtime
    for meta in (out / "save").glob("CKPT+*/CKPT.yaml"):
        try:
            text = meta.read_text()
            stamp = float(re.search(r"^unixtime: ([0-9.]+)", text, flags=re.M).group(1))
        except (OSError, AttributeError):  # being written or removed
            continue
        if "brain_intra_epoch_ckpt" in text and stamp > logged:
            return True
    return False


def kill_when(cmd, cwd, condition, timeout=600):
    """Start ``cmd``; SIGKILL it as soon as ``condition()`` holds; its return code."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while proc.poll() is None and time.time() < deadline:
            if condition():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode


def test_killed_mid_epoch_or_in_evaluation_the_rerun_completes_as_uninterrupted(repo_root, smoke_run, tmp_path):
    reference, data, _ = smoke_run
    out = tmp_path / "killed"
    extra = ["--ckpt_interval_steps=2", "--policy_evaluation=False"]
    cmd = [sys.executable, "recipes/train.py", SMOKE, f"--output_folder={out}", f"--data_folder={data}", *extra]
    # killed in the third epoch, once it has an intra-epoch checkpoint
    code = kill_when(cmd, repo_root, lambda: epochs_logged(out) >= 2 and checkpoint_inside_a_new_epoch(out))
    assert code == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = epochs_logged(out)
    assert 2 <= killed_at < 6
    run_recipe(repo_root, out, data, *extra)
    assert epochs_logged(out) == 6  # resumed inside the epoch: no epoch trained or logged twice
    ref = json.loads((reference / "report.json").read_text())
    got = json.loads((out / "report.json").read_text())
    # same seed, same data order, same random draws from the checkpoint on: identical WERs
    assert exit_results(got) == exit_results(ref)
    ref_log = (reference / "train_log.txt").read_text().splitlines()
    got_log = (out / "train_log.txt").read_text().splitlines()
    last = [line for line in got_log if line.startswith("epoch: 6")]
    assert (
        last
        and last[0].split(" - ", 1)[1]
        == [line for line in ref_log if line.startswith("epoch: 6")][0].split(" - ", 1)[1]
    )

    # killed while evaluating (a rerun of a finished run only evaluates): the report on disk
    # stays the complete previous one, and the next rerun completes
    first = out / "wer_test_exit1.txt"
    stamp = first.stat().st_mtime_ns
    code = kill_when(cmd, repo_root, lambda: first.stat().st_mtime_ns != stamp)
    assert code == -signal.SIGKILL, "the evaluation ended before it could be killed"
    assert exit_results(json.loads((out / "report.json").read_text())) == exit_results(ref)
    run_recipe(repo_root, out, data, *extra)
    assert exit_results(json.loads((out / "report.json").read_text())) == exit_results(ref)
