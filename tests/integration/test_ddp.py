"""The smoke recipe under DDP: 2 processes (gloo on the CPU) train, checkpoint and report."""

import json
import os
import subprocess
import sys

from smoke import SMOKE, exit_results  # tests/integration/smoke.py


def test_two_processes_train_prune_checkpoints_and_report(repo_root, smoke_run, tmp_path, free_port):
    """Two epochs, so that the second epoch's checkpoint replaces the first's: the deletion
    that once hung a 2-process run (docs/reliability.md, row 4c). The timeout turns a hang
    into a failure."""
    _, data, _ = smoke_run
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port}",
        "recipes/train.py",
        SMOKE,
        f"--output_folder={out}",
        f"--data_folder={data}",
        "--number_of_epochs=2",
        "--policy_evaluation=False",
        "--distributed_backend=gloo",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((out / "report.json").read_text())
    assert report["processes"] == 2 and report["train"]["epochs"] == 2
    # every process evaluates the whole test sets with the same weights: the report equals a
    # single-process evaluation of the checkpoint it kept (recipes/evaluate.py)
    assert [stats["n"] for e in report["exits"] for stats in e["sets"].values()] == [16] * 4
    proc = subprocess.run(
        [sys.executable, "recipes/evaluate.py", str(out), "--policy_evaluation=False"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert exit_results(json.loads((out / "report.json").read_text())) == exit_results(report)
    checkpoints = sorted(p.name for p in (out / "save").iterdir() if p.name.startswith(("CKPT", "partial")))
    assert len(checkpoints) == 1 and checkpoints[0].startswith("CKPT+"), checkpoints
