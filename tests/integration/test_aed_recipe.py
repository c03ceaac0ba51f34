"""End-to-end: recipes/train.py and recipes/evaluate.py with attention-decoder exits
(hparams/synthetic/smoke_aed.yaml, on the smoke recipe's corpus)."""

import json
import re
import subprocess
import sys

import pytest
from smoke import SMOKE_AED, run_recipe  # tests/integration/smoke.py

from tests.oracles import check_policy_transcription

DECODERS = {"aed_beam", "ctc_greedy", "ctc_beam"}


@pytest.fixture(scope="module")
def aed_run(repo_root, smoke_run, tmp_path_factory):
    _, data, _ = smoke_run  # reuse the generated corpus
    out = tmp_path_factory.mktemp("aed") / "out"
    proc = run_recipe(repo_root, out, data, yaml=SMOKE_AED)
    return out, data, proc


def test_report_has_every_decoder_at_every_exit(aed_run, smoke_run):
    out, _, proc = aed_run
    report = json.loads((out / "report.json").read_text())
    assert report["test_decoders"] == ["aed_beam", "ctc_greedy", "ctc_beam"]
    for e in report["exits"]:
        for stats in e["sets"].values():
            assert set(stats["decoders"]) == DECODERS
            assert stats["wer"] == stats["decoders"]["aed_beam"]["wer"]
            assert stats["decoders"]["aed_beam"]["ms_per_utterance"] > 0
    # the decoders' parameters count: exit 1 of the AED model uses more than the CTC one's
    ctc_report = json.loads((smoke_run[0] / "report.json").read_text())
    assert report["exits"][0]["params_to_exit"] > ctc_report["exits"][0]["params_to_exit"]
    md = (out / "report.md").read_text()
    assert "joint CTC/attention beam search" in md and "## Decoders" in md
    # the word 2-gram is fused into the joint search (smoke_aed.yaml's aed_lm_weight)
    assert report["ctc_lm"]["aed_weight"] == 0.5 and report["ctc_lm"]["aed_word_bonus"] == 1.0
    assert "2-gram LM fused" in md
    assert "WER_ctc_beam_exit1" in (out / "train_log.txt").read_text()


def test_joint_loss_went_down_at_every_exit(aed_run):
    out, _, _ = aed_run
    log = (out / "train_log.txt").read_text()
    for k in (1, 2):
        per_exit = [float(m) for m in re.findall(rf"train loss_exit{k}: ([0-9.e+-]+)", log)]
        assert len(per_exit) == 6 and per_exit[-1] < 0.9 * per_exit[0], (k, per_exit)


def test_exported_aed_model_transcribes_at_each_exit(aed_run):
    from earlyexit_brain.inference import EarlyExitASR
    from earlyexit_brain.models.pipeline import EarlyExitAEDModel

    out, data, _ = aed_run
    asr = EarlyExitASR.from_hparams(source=str(out / "inference"))
    assert isinstance(asr.model, EarlyExitAEDModel)
    assert asr.model.search_options["lm_weight"] == 0.5  # it fuses the n-gram it ships
    assert (out / "inference" / "ngram_lm.ckpt").is_file() and asr.model.lm["lm_path"]
    wav = sorted((data / "wavs" / "test").glob("*.wav"))[0]
    for exit_ in (1, 2):
        result = asr.transcribe_file(str(wav), exit=exit_)
        assert result.exit == exit_ and result.layers == exit_ and isinstance(result.text, str)
    for wav in sorted((data / "wavs" / "test").glob("*.wav"))[:4]:
        check_policy_transcription(asr, str(wav))  # the calibrated default policy, as tests/oracles.py derives it


def test_evaluate_recipe_on_an_aed_experiment(repo_root, aed_run):
    out, _, _ = aed_run
    before = json.loads((out / "report.json").read_text())
    proc = subprocess.run(
        [sys.executable, "recipes/evaluate.py", str(out)], cwd=repo_root, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    after = json.loads((out / "report.json").read_text())
    assert after["exits"][0]["sets"]["test"]["wer"] == before["exits"][0]["sets"]["test"]["wer"]
    assert "## Decoders" in proc.stdout
