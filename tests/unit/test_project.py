"""Project contracts: the README's two commands, CI, the linter, and the report format."""

import json
import os
import re
import subprocess
import sys

from earlyexit_brain.models.conformer import EarlyExitConformerEncoder
from earlyexit_brain.models.exits import CTCExitHeads
from earlyexit_brain.report import build_report, report_markdown, write_report


def readme_commands(repo_root):
    text = open(os.path.join(repo_root, "README.md")).read()
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)


def test_readme_opens_with_the_two_one_line_commands(repo_root):
    commands = readme_commands(repo_root)
    main, tests = commands[0], commands[1]
    assert "\n" not in main and "\n" not in tests
    assert main.startswith("bash scripts/setup.sh && ")
    assert "recipes/train.py hparams/synthetic/conformer_ctc_ee.yaml" in main
    assert tests.startswith("bash scripts/setup.sh && ") and "pytest" in tests


def test_ci_runs_exactly_the_readme_test_command(repo_root):
    tests = readme_commands(repo_root)[1]
    ci = open(os.path.join(repo_root, ".ci", "run")).read()
    assert tests in ci.splitlines()


def test_pins_live_in_one_place(repo_root):
    pins = open(os.path.join(repo_root, "requirements.txt")).read()
    for pin in ("torch==2.14.1", "torchaudio==2.11.0", "speechbrain==1.1.2"):
        assert pin in pins
    setup_sh = open(os.path.join(repo_root, "scripts", "setup.sh")).read()
    assert "requirements.txt" in setup_sh


#: What ruff checks (pyproject.toml configures it): the package, the recipes, the benchmarks, scripts, tests.
LINTED = ["earlyexit_brain", "recipes", "benchmarks", "scripts", "tests", "setup.py"]


def test_ruff_finds_no_lint_error(repo_root):
    """ruff, pinned in requirements.txt, with the rules of pyproject.toml: a lint error fails the tests."""
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *LINTED],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (
        f"ruff check {' '.join(LINTED)} (pip install -r requirements.txt installs "
        f"it):\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}"
    )


def test_ruff_format_leaves_the_code_unchanged(repo_root):
    """The code is as ``ruff format`` writes it (pyproject.toml's [tool.ruff.format]); run it to fix."""
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "--no-cache", *LINTED],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (
        f"ruff format --check {' '.join(LINTED)}; run `ruff format` on these "
        f"files:\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}"
    )


def tiny_report():
    """A two-exit encoder, its heads and the report of made-up per-exit results."""
    enc = EarlyExitConformerEncoder(20, 4, 16, 2, 32, [2, 4], kernel_size=3)
    heads = CTCExitHeads(16, 10, 2)
    results = {"test": [{"exit": 1, "wer": 30.0, "cer": 10.0, "n": 5}, {"exit": 2, "wer": 20.0, "cer": 5.0, "n": 5}]}
    return enc, heads, build_report(enc, heads, results, {"epochs": 2, "seconds": 12.34})


def test_report_json_and_markdown(tmp_path):
    enc, heads, report = tiny_report()
    assert report["params_total"] == sum(p.numel() for p in enc.parameters()) + sum(
        p.numel() for p in heads.parameters()
    )
    assert [e["layer"] for e in report["exits"]] == [2, 4]
    assert report["exits"][1]["sets"]["test"] == {"wer": 20.0, "cer": 5.0, "n": 5}
    assert report["exits"][0]["params_to_exit"] < report["exits"][1]["params_to_exit"]
    md = report_markdown(report)
    assert "| 2 | 4 |" in md and "20.00" in md
    paths = write_report(report, str(tmp_path))
    assert json.load(open(paths["json"])) == report
    assert os.path.getsize(paths["plot"]) > 1000
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p]


def test_plot_keeps_matplotlib_debug_records_out_of_the_log(tmp_path, caplog):
    """SpeechBrain logs every logger at DEBUG into log.txt: drawing the plot must not add
    matplotlib's font-lookup records there (they were more than half of a run's log)."""
    import logging

    report = tiny_report()[2]
    mpl_logger = logging.getLogger("matplotlib")
    saved = mpl_logger.level
    mpl_logger.setLevel(logging.NOTSET)
    caplog.set_level(logging.DEBUG)
    try:
        write_report(report, str(tmp_path))
        assert logging.getLogger("matplotlib.font_manager").getEffectiveLevel() >= logging.INFO
        assert not [r for r in caplog.records if r.name.startswith("matplotlib") and r.levelno < logging.INFO]
        mpl_logger.setLevel(logging.DEBUG)  # a level the user chose is kept
        write_report(report, str(tmp_path))
        assert mpl_logger.level == logging.DEBUG
    finally:
        mpl_logger.setLevel(saved)


def test_reliability_table_cites_tests_that_exist(repo_root):
    text = open(os.path.join(repo_root, "docs", "reliability.md")).read()
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) >= 15
    cited = 0
    for row in rows:
        current = None
        for path, name in re.findall(r"`(tests/[\w/]+\.py)?::(\w+)`", row):
            current = path or current
            assert current, row
            source = open(os.path.join(repo_root, current)).read()
            assert re.search(rf"^def {name}\(", source, flags=re.M), (current, name)
            cited += 1
    assert cited >= 15
