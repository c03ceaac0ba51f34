"""End-to-end: publish the smoke-trained experiment (--dry-run) and load it both ways."""

import json
import os
import subprocess
import sys

from huggingface_hub import ModelCard

from tests.oracles import check_policy_transcription


def test_publish_dry_run_of_the_smoke_experiment(repo_root, smoke_run, tmp_path):
    from speechbrain.inference.ASR import EncoderASR

    from earlyexit_brain.inference import EarlyExitASR

    out, _, _ = smoke_run
    hub = tmp_path / "hub"
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env["HF_HUB_OFFLINE"] = "1"  # a dry run needs neither the network nor a token
    proc = subprocess.run(
        [sys.executable, "recipes/publish.py", str(out), "--repo-id", "alice/smoke-ee", "--dry-run", "--out", str(hub)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "Dry run: nothing uploaded." in proc.stdout
    report = json.loads((out / "report.json").read_text())
    card = ModelCard.load(hub / "README.md")
    got = {(r.dataset_split, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert got == {
        (s, f"WER exit {e['exit']} (layer {e['layer']})"): stats["wer"]
        for e in report["exits"]
        for s, stats in e["sets"].items()
    }
    example = str(hub / "example.wav")
    asr = EarlyExitASR.from_hparams(source=str(hub))
    default_exit = json.loads((hub / "hyperparams.yaml").read_text().split("default_exit: ")[1].split()[0])
    stock = EncoderASR.from_hparams(source=str(hub))
    assert stock.transcribe_file(example) == asr.transcribe_file(example, exit=default_exit).text
    check_policy_transcription(asr, example)  # the calibrated default policy, as tests/oracles.py derives it
