"""Running the smoke recipe from the integration tests."""

import json
import subprocess
import sys

SMOKE = "hparams/synthetic/smoke.yaml"
SMOKE_AED = "hparams/synthetic/smoke_aed.yaml"  # the same corpus, attention-decoder exits


def run_recipe(repo_root, out, data, *extra, timeout=600, yaml=SMOKE):
    cmd = [sys.executable, "recipes/train.py", yaml, f"--output_folder={out}", f"--data_folder={data}", *extra]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def exit_results(report):
    """report.json's per-exit entries without the decoding times (which vary run to run)."""
    exits = json.loads(json.dumps(report["exits"]))
    for entry in exits:
        for stats in entry["sets"].values():
            for decoder in stats.get("decoders", {}).values():
                decoder.pop("ms_per_utterance", None)
    return exits
