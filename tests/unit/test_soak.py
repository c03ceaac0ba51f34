"""benchmarks.soak on the tiny exported model: it transcribes every file and reports RSS."""

import json

from benchmarks import soak


def test_soak_reports_memory_every_tenth(folder, tmp_path, capsys):
    out = tmp_path / "soak.json"
    result = soak.main([folder, "--files", "20", "--seconds", "0.5", "--policy", "entropy", "--out", str(out)])
    assert [s["files"] for s in result["rss"]] == list(range(2, 21, 2))
    assert all(s["rss_mb"] > 0 for s in result["rss"])
    assert sum(result["exit_counts"].values()) == 20
    assert json.loads(out.read_text())["rss_growth_mb"] == result["rss_growth_mb"]
    assert "RSS after warm-up" in capsys.readouterr().out
