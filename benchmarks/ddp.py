"""The ``ddp`` section: training throughput of the smoke recipe with 1 process and with 2 (gloo, CPU).

It runs the repository's recipes/train.py on hparams/synthetic/smoke.yaml, so it runs from a checkout.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_smoke_recipe(procs, out, data, epochs, timeout=900, master_port=29533):
    """recipes/train.py on the smoke configuration with ``procs`` processes (gloo on the CPU).

    ``procs > 1`` launches ``torchrun --nproc_per_node=<procs>`` (as
    ``python -m torch.distributed.run``) on ``master_port``; returns report.json.
    """
    args = [
        "recipes/train.py",
        "hparams/synthetic/smoke.yaml",
        f"--output_folder={out}",
        f"--data_folder={data}",
        f"--number_of_epochs={epochs}",
        "--policy_evaluation=False",
    ]
    env = dict(os.environ)
    if procs == 1:
        cmd = [sys.executable] + args
    else:  # one thread per process so that the processes share the cores
        env["OMP_NUM_THREADS"] = "1"
        cmd = (
            [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", f"--master_port={master_port}"]
            + args
            + ["--distributed_backend=gloo"]
        )
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "report.json")) as fin:
        report = json.load(fin)
    return report


def bench_ddp(epochs, workdir):
    """Training throughput of the smoke recipe with 1 and 2 processes (utterances per second)."""
    data = os.path.join(workdir, "data")
    run_smoke_recipe(1, os.path.join(workdir, "prepare"), data, 1)  # corpus and warm-up
    result = {"config": "hparams/synthetic/smoke.yaml", "epochs": epochs, "runs": []}
    for procs in (1, 2):
        report = run_smoke_recipe(procs, os.path.join(workdir, f"p{procs}"), data, epochs)
        seconds = report["train"]["seconds"]
        result["runs"].append(
            {
                "processes": procs,
                "threads_per_process": 2 if procs == 1 else 1,
                "train_seconds": seconds,
                "utterances_per_second": report["train_utterances"] * epochs / seconds,
            }
        )
    result["speedup"] = result["runs"][1]["utterances_per_second"] / result["runs"][0]["utterances_per_second"]
    return result
