"""End-to-end: recipes/train.py on the smoke configuration."""

import json
import re
import shutil
import subprocess
import sys

import pytest
from smoke import exit_results, run_recipe  # tests/integration/smoke.py

from tests.oracles import check_policy_transcription


def train_losses(log_text):
    return [float(m) for m in re.findall(r"^epoch: \d+, .*? - train loss: ([0-9.e+-]+)", log_text, flags=re.M)]


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
        for name, stats in e["sets"].items():
            assert stats["n"] == 16
            # the report's figures are those of the exit's and set's alignment file
            head = (out / f"wer_{name}_exit{e['exit']}.txt").read_text()
            assert float(head.split()[1]) == round(stats["wer"], 2) and "Scored 16 sentences" in head
    assert report["train"]["epochs"] == 6 and report["train"]["seconds"] > 0
    # the best checkpoint on the last exit's dev WER (checkpoint_key) is the one evaluated
    dev_wer = [float(m) for m in re.findall(r"valid WER_exit2: ([0-9.e+-]+)", (out / "train_log.txt").read_text())]
    assert len(dev_wer) == 6 and dev_wer[report["evaluated_epoch"] - 1] == min(dev_wer), dev_wer
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
    assert exit_results(report_after) == exit_results(report_before)


def test_policy_evaluation_in_the_report(smoke_run):
    out, _, proc = smoke_run
    report = json.loads((out / "report.json").read_text())
    names = [p["policy"] for p in report["policies"]]
    assert names[:4] == ["fixed", "fixed", "oracle", "oracle_errors"]
    assert {"entropy", "posterior", "posterior_greedy", "budget"} <= set(names)
    for p in report["policies"]:
        assert set(p["sets"]) == {"test", "test_unseen_voice"}
        for stats in p["sets"].values():
            assert set(stats) == {"wer", "avg_layers", "avg_exit", "seconds"}
            assert stats["avg_layers"] == stats["avg_exit"] and stats["seconds"] > 0  # exit k after layer k
    # a stricter threshold never stops earlier: each policy's average depth is monotonic in its threshold
    for name, deeper_when_higher in (
        ("entropy", False),
        ("posterior", True),
        ("posterior_greedy", True),
        ("budget", True),
        ("learned", True),
    ):
        rows = sorted((p for p in report["policies"] if p["policy"] == name), key=lambda p: p["threshold"])
        for s in ("test", "test_unseen_voice"):
            depths = [p["sets"][s]["avg_layers"] for p in rows]
            # the smoke model's controller (24 held-out utterances) may give every dev utterance one score
            assert len(rows) >= (1 if name == "learned" else 4), (name, s, depths)
            assert depths == sorted(depths, reverse=not deeper_when_higher), (name, s, depths)
    # the fixed-exit points reproduce the per-exit table (same greedy decoding, batch 1)
    for k, entry in enumerate(report["exits"]):
        fixed = report["policies"][k]["sets"]["test"]
        assert fixed["avg_layers"] == entry["layer"]
        assert abs(fixed["wer"] - entry["sets"]["test"]["wer"]) < 15
    # smoke.yaml trains the learned exit controller on the corpus's controller split
    assert set(report["calibration"]["thresholds"]) == {"entropy", "posterior", "posterior_greedy", "learned"}
    controller = report["controller"]
    assert controller["training"]["exits"][0]["utterances"] == 24 and len(controller["training"]["exits"]) == 1
    assert controller["parameters"] > 0 and set(controller["decision_time_share"]) == {
        "dev",
        "test",
        "test_unseen_voice",
    }
    assert len(report["latency_table"]["intercept_ms"]) == 2
    md = (out / "report.md").read_text()
    assert "## Exit policies" in md and "## Learned exit controller" in md
    assert "(calibrated)" in proc.stdout


def test_exported_model_transcribes(smoke_run):
    from earlyexit_brain.inference import EarlyExitASR

    out, data, _ = smoke_run
    asr = EarlyExitASR.from_hparams(source=str(out / "inference"))
    stored = json.loads((out / "inference" / "exit_policies.ckpt").read_text())
    report = json.loads((out / "report.json").read_text())
    # the configured default (posterior), unless the learned policy computes fewer dev layers
    cal = report["calibration"]["thresholds"]
    learned_wins = all(
        (cal["learned"]["dev"]["avg_layers"], cal["learned"]["dev"]["wer"]) < (c["dev"]["avg_layers"], c["dev"]["wer"])
        for name, c in cal.items()
        if name != "learned"
    )
    assert (
        stored["default"]["policy"]
        == ("learned" if learned_wins else "posterior")
        == report["default_policy"]["policy"]
    )
    assert stored["controller"]["num_exits"] == 2
    # the N-best search is configured as calibrated (smoke.yaml's nbest_* keys)
    assert stored["options"]["posterior"] == {"beam_size": 10, "token_prune_min_logp": -3.0}
    assert asr._nbest_searcher().token_prune_min_logp == -3.0
    wavs = sorted((data / "wavs" / "test").glob("*.wav"))[:4]
    for wav in wavs:  # the calibrated posterior policy stops where tests/oracles.py derives it
        check_policy_transcription(asr, str(wav), policy="posterior")
    assert asr.transcribe_file(str(wav), exit=1).layers == 1


def test_ngram_lm_estimated_used_and_exported(smoke_run):
    """smoke.yaml: ngram_order 2 and test_decoders [ctc_beam, ctc_greedy]: the recipe
    estimates the bigram from train.csv, decodes the report (and the policies) with it,
    and ships it with the exported model, whose default decoding uses it."""
    from earlyexit_brain.decoding.ngram import arpa_text, manifest_sentences
    from earlyexit_brain.inference import EarlyExitASR

    out, data, _ = smoke_run
    lm = out / "save" / "ngram_2.arpa"
    assert lm.read_text() == arpa_text(manifest_sentences(str(data / "train.csv")), 2)
    report = json.loads((out / "report.json").read_text())
    assert report["test_decoders"] == ["ctc_beam", "ctc_greedy"]
    assert report["ctc_lm"] == {"file": "ngram_2.arpa", "order": 2, "alpha": 0.5, "beta": 1.0}
    assert report["decoding"] == {"decoder": "ctc_beam", "beam_size": 10, "lm": True, "alpha": 0.5, "beta": 1.0}
    for entry in report["exits"]:  # the headline figures are the first decoder's
        stats = entry["sets"]["test"]
        assert stats["wer"] == stats["decoders"]["ctc_beam"]["wer"]
    assert "CTC beam search with a word 2-gram LM (ngram_2.arpa" in (out / "report.md").read_text()
    inference = out / "inference"
    assert (inference / "ngram_lm.ckpt").read_text() == lm.read_text()
    asr = EarlyExitASR.from_hparams(source=str(inference))
    decoder = asr.ctc_decoder()
    assert decoder.name == "ctc_beam" and decoder.options.lm_path.endswith("ngram_lm.ckpt")
    assert asr.ctc_decoder("ctc_greedy").searcher is None
    wav = str(sorted((data / "wavs" / "test").glob("*.wav"))[0])
    for name in (None, "ctc_greedy", "ctc_beam"):
        result = asr.transcribe_file(wav, exit=2, decoder=name)
        assert result.layers == 2 and isinstance(result.text, str)
    with pytest.raises(ValueError, match="not a CTC decoder"):
        asr.transcribe_file(wav, exit=2, decoder="aed_beam")


def test_evaluate_recipe_on_the_experiment_folder(repo_root, smoke_run, tmp_path):
    """Evaluated on a copy of the experiment folder: the copy's checkpoints are read and its
    report written, while the original folder is left untouched."""
    out, _, _ = smoke_run
    before = json.loads((out / "report.json").read_text())
    original_log = (out / "train_log.txt").read_text()
    copy = tmp_path / "copied_experiment"
    shutil.copytree(out, copy)
    aside = tmp_path / "original_save"  # the copy must not need the original's checkpoints
    (out / "save").rename(aside)
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "recipes/evaluate.py",
                str(copy),
                "--calibration_target=avg_layers",
                "--calibration_value=1.5",
            ],
            cwd=repo_root,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:  # (without the rewrite, the copy's evaluation writes into the original's save/)
        shutil.rmtree(out / "save", ignore_errors=True)
        aside.rename(out / "save")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "now point into" in proc.stderr
    assert (out / "train_log.txt").read_text() == original_log
    assert json.loads((out / "report.json").read_text()) == before
    after = json.loads((copy / "report.json").read_text())
    assert exit_results(after) == exit_results(before)
    assert after["calibration"]["target"] == "avg_layers"
    for cal in after["calibration"]["thresholds"].values():
        assert cal["dev"]["avg_layers"] <= 1.5
    bad = subprocess.run(
        [sys.executable, "recipes/evaluate.py", str(copy / "save")],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "not an experiment folder" in bad.stderr
    # another output folder is refused before any work (the folder is evaluated in place)
    elsewhere = tmp_path / "elsewhere"
    bad = subprocess.run(
        [sys.executable, "recipes/evaluate.py", str(copy), f"--output_folder={elsewhere}"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "output_folder" in bad.stderr and "cp -r" in bad.stderr
    assert not elsewhere.exists()
