"""Peak resident memory of a few training steps, measured alone in a fresh process (CPU, Linux).

The parent runs ``python -m benchmarks.memory MODULE:FUNCTION ARGS --threads N``: in the child,
``FUNCTION(*ARGS)`` makes its inputs and returns a function that builds the model and returns its step;
the child prints the peak resident set size of 3 steps minus its size before the model was built.
"""

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys

import torch

from earlyexit_brain.utils import rss_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_peak_bytes(prepare, args, steps=3):
    """In this process: peak RSS of ``steps`` calls of the step that ``prepare(*args)()`` builds, minus
    the RSS before it was built (``ru_maxrss`` is in KiB on Linux)."""
    build_step = prepare(*args)
    before = rss_bytes()
    step = build_step()
    for _ in range(steps):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def cpu_peak_memory_gb(target, args, what, threads=None, timeout=600):
    """GiB that :func:`child_peak_bytes` measures for ``target`` (``"module:function"``) and ``args``
    (JSON-serialisable) in a fresh process with ``threads`` torch threads (default: this process's).

    None where ``/proc`` is missing, or if the child fails (its error is printed, naming ``what``).
    """
    if rss_bytes() is None:
        return None
    threads = torch.get_num_threads() if threads is None else threads
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", target, json.dumps(args), "--threads", str(threads)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        print(f"{what}: the child process failed:\n{proc.stderr[-2000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**30


def main(argv=None):
    parser = argparse.ArgumentParser(description="The child process of a peak-memory measurement.")
    parser.add_argument("target", help="module:function returning the step builder")
    parser.add_argument("args", help="the function's arguments, a JSON list")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    module, function = args.target.split(":")
    prepare = getattr(importlib.import_module(module), function)
    print(json.dumps({"peak_bytes": child_peak_bytes(prepare, json.loads(args.args))}))


if __name__ == "__main__":
    main()
