"""The benchmarks package writes bench.json and bench.md (compute section: fast, no timing asserted)."""

import json
import subprocess
import sys

import pytest
import torch

from benchmarks import frontend, inference, tables, train_step
from benchmarks.__main__ import main
from benchmarks.timing import CONFIGS, build_inference_model
from earlyexit_brain.brain import EarlyExitCTCBrain
from earlyexit_brain.dynamic import run_model
from earlyexit_brain.losses import MultiExitLoss


def test_compute_section_and_tables(repo_root, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "compute", "--out", str(out)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    paper = next(r for r in result["compute"] if r["config"].startswith("paper"))
    assert [e["layer"] for e in paper["exits"]] == [2, 4, 6, 8, 10, 12]
    params = [e["params"] for e in paper["exits"]]
    gmacs = [e["gmacs"] for e in paper["exits"]]
    assert params == sorted(params) and gmacs == sorted(gmacs)
    assert abs(params[-1] - 31.5e6) / 31.5e6 < 0.02  # the paper's 31.5 M parameters
    table = (tmp_path / "bench.md").read_text()
    assert "multiply-accumulates" in table and "| paper size (12 layers, d 256) | 6 (12) |" in table


def test_cpu_peak_memory_of_a_training_step_in_a_child_process():
    name = next(iter(CONFIGS))
    gb = train_step.cpu_peak_memory_gb(name, "early_exit", 2, 1.0, 32)
    assert gb is not None and 0.001 < gb < 8
    # the default variant's step (one CTC call, fused AdamW) in the child too
    gb = train_step.cpu_peak_memory_gb(name, "single_exit", 2, 1.0, 32, train_step.DEFAULT_VARIANT)
    assert gb is not None and 0.001 < gb < 8


def test_train_step_variants_match_base_and_are_tabulated():
    name = next(iter(CONFIGS))  # the default configuration, tiny batch
    variants = [v for v in train_step.TRAIN_VARIANTS if v not in train_step.CUDA_ONLY_VARIANTS]
    assert {"base", "ctc_stacked", "stacked", "stacked_cudnn"} <= set(variants)
    checks = train_step.check_train_variants(name, variants, batch=2, seconds=0.5)
    for variant, check in checks.items():  # float32 on the CPU: the same loss and gradients
        assert "error" not in check, (variant, check)
        assert check["loss_rel_diff"] < 1e-6 and check["grad_rel_diff"] < 1e-5, (variant, check)
    results = [
        train_step.bench_train_step(name, 2, 0.5, repeats=1, warmup=0, variant=v, memory=False)
        for v in ("base", "ctc_stacked", "stacked")
    ]
    assert all(r["ratio"] > 0 and r["early_exit"]["median_s"] > 0 for r in results)
    profile = train_step.profile_train_step(name, "ctc_stacked", 2, 0.5, 32, torch.device("cpu"), steps=1)
    assert [p["model"] for p in profile] == ["early_exit", "single_exit"] and profile[0]["wall_ms_per_step"] > 0
    failed = {
        "config": name,
        "variant": "graphed",
        "batch": 2,
        "seconds_per_utterance": 0.5,
        "vocab": 32,
        "error": "RuntimeError: no CUDA",
    }
    md = tables.markdown(
        {
            "machine": "test",
            "train_step": results + [failed],
            "train_step_variants": {v: train_step.TRAIN_VARIANTS[v] for v in variants},
            "train_step_checks": [
                {"config": name, "batch": 2, "seconds_per_utterance": 0.5, "vocab": 32, "variants": checks}
            ],
            "train_step_profile": profile,
        }
    )
    assert f"| {name} | ctc_stacked | 2 x 0.5 s, V 32 |" in md
    assert "| graphed | 2 x 0.5 s, V 32 | failed: RuntimeError: no CUDA |" in md
    assert "under torch.profiler" in md and "`stacked_cudnn`:" in md


def test_train_step_times_the_brains_fit_batch_with_the_loss_object(monkeypatch):
    """The timed step is EarlyExitCTCBrain.fit_batch with the YAML's MultiExitLoss, not a copy of either."""
    calls = {"fit_batch": 0, "loss": 0}
    fit_batch, loss_call = EarlyExitCTCBrain.fit_batch, MultiExitLoss.__call__

    def counting_fit_batch(self, batch):
        calls["fit_batch"] += 1
        return fit_batch(self, batch)

    def counting_loss(self, *args, **kwargs):
        calls["loss"] += 1
        return loss_call(self, *args, **kwargs)

    monkeypatch.setattr(EarlyExitCTCBrain, "fit_batch", counting_fit_batch)
    monkeypatch.setattr(MultiExitLoss, "__call__", counting_loss)
    name = next(iter(CONFIGS))
    train_step.bench_train_step(name, 2, 0.5, repeats=2, warmup=1, variant=train_step.DEFAULT_VARIANT, memory=False)
    assert calls == {"fit_batch": 6, "loss": 6}  # 2 models x (1 warm-up + 2 timed steps)
    step = train_step.make_train_step(
        name, "early_exit", train_step.DEFAULT_VARIANT, train_step.make_train_batch(2, 0.5, 32, torch.device("cpu"))
    )
    assert isinstance(step.brain.hparams.loss, MultiExitLoss) and step.brain.hparams.loss.ctc == "one_call"
    assert step.brain.optimizer.defaults["fused"] and step.brain.max_grad_norm == 1.0
    before = [p.detach().clone() for p in step.brain.modules.parameters()]
    assert torch.isfinite(step())
    assert any(not torch.equal(a, b) for a, b in zip(before, step.brain.modules.parameters()))  # a real update


def test_unknown_variant_is_refused():
    with pytest.raises(SystemExit, match="unknown variants"):
        main(["--only", "train-step", "--variants", "base,nope"])


def test_inference_section_times_the_fixed_and_the_scored_policy_paths():
    name = next(iter(CONFIGS))
    res = inference.bench_inference(name, 0.5, repeats=1, warmup=0, device=torch.device("cpu"))
    assert [e["exit"] for e in res["exits"]] == [1, 2, 3]
    for e in res["exits"]:
        assert e["forced_over_fixed"] > 0 and e["scored_over_fixed_pairwise"] > 0
    # the scored policy reaches every exit up to k, and stops at k with the fixed path's output
    model = build_inference_model(name, torch.device("cpu"))
    wav, lens = 0.05 * torch.randn(1, 8000), torch.ones(1)
    seen = []
    policy = inference.ScoredFixedExit(1)
    scorer = policy.scorer
    scorer.score = lambda lp, lengths, score=scorer.score: seen.append(len(seen)) or score(lp, lengths)
    with torch.no_grad():
        out = run_model(model, wav, lens, policy)
        fixed = model.exit_log_probs(wav, lens, 1)
    assert seen == [0, 1] and out.exits.tolist() == [1]
    assert torch.equal(out.log_probs[0], fixed[0])
    table = tables.markdown({"machine": "test", "inference": [res]})
    assert "scored / fixed (pairwise)" in table


def test_gpu_train_step_cases_include_the_paper_batch_and_the_real_corpus_batch():
    cases = train_step.train_cases(False, torch.device("cuda"))
    paper = [c for c in cases if c[0].startswith("paper")]
    # 32 x 3 s (V 32), the paper's 32 x 10 s and 32 x 15 s (~500 s of audio, the real-corpus YAMLs), BPE 256
    assert [(c[1], c[2], c[3]) for c in paper] == [(32, 3.0, 32), (32, 10.0, 256), (32, 15.0, 256)]
    assert all(c[2] == 3.0 for c in train_step.train_cases(False, torch.device("cpu")))


def test_frontend_section_times_both_forwards_of_one_front_end():
    name = next(iter(CONFIGS))
    res = frontend.bench_frontend(name, batch=2, seconds=0.5, repeats=1, warmup=0, device=torch.device("cpu"))
    assert [p["pass"] for p in res["passes"]] == ["train", "inference"]
    for p in res["passes"]:
        assert p["max_abs_diff"] < 1e-4  # the same front end, computed two ways
        assert p["ratio"] > 0 and p["speechbrain"]["median_ms"] > 0 and p["channels_last"]["median_ms"] > 0
    table = tables.markdown({"machine": "test", "frontend": [res]})
    assert "channels-last ms" in table and f"| {name} | train | 2 x 0.5 s |" in table
