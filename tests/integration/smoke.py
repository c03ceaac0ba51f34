"""Running the smoke recipe from the integration tests."""

import subprocess
import sys

SMOKE = "hparams/synthetic/smoke.yaml"
SMOKE_AED = "hparams/synthetic/smoke_aed.yaml"  # the same corpus, attention-decoder exits


def run_recipe(repo_root, out, data, *extra, timeout=600, yaml=SMOKE):
    cmd = [sys.executable, "recipes/train.py", yaml, f"--output_folder={out}",
           f"--data_folder={data}", *extra]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc
