#!/usr/bin/env bash
# Create .venv (if needed) and install earlyexit_brain with the pinned
# dependencies of requirements.txt. Idempotent: a second run only checks.
# Needs Python >= 3.10 with venv (set PYTHON=python3.11 to choose one).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.earlyexit_brain-installed
want="$(cat requirements.txt setup.py | sha1sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import earlyexit_brain, speechbrain, torch" 2>/dev/null; then
    echo "[setup] .venv is up to date"
    exit 0
fi
# PyPI's torch for x86_64 Linux is the CUDA build: about 6 GB once installed.
# --no-cache-dir keeps pip from also storing the ~3 GB of downloaded wheels.
need_mb=6800
free_mb="$(df -Pm . | awk 'NR==2 {print $4}')"
if [ -n "$free_mb" ] && [ "$free_mb" -lt "$need_mb" ]; then
    echo "[setup] warning: $(pwd) has ${free_mb} MB free; the install needs about ${need_mb} MB" >&2
fi
echo "[setup] installing pinned dependencies (requirements.txt) and earlyexit_brain"
pip_install=(.venv/bin/python -m pip install --disable-pip-version-check --no-cache-dir -q)
"${pip_install[@]}" -r requirements.txt
"${pip_install[@]}" --no-deps -e .
echo "$want" > "$stamp"
echo "[setup] done"
