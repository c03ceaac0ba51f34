"""The benchmark harness writes bench.json and bench.md (compute section: fast, no timing asserted)."""

import json
import subprocess
import sys

from recipe_modules import recipe


def test_compute_section_and_tables(repo_root, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "recipes/benchmark.py", "--only", "compute", "--out", str(out)],
                          cwd=repo_root, capture_output=True, text=True, timeout=300)
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
    benchmark = recipe("benchmark")
    name = next(iter(benchmark.CONFIGS))
    gb = benchmark.cpu_peak_memory_gb(name, "early_exit", 2, 1.0, 32)
    assert gb is not None and 0.001 < gb < 8
