"""Transcribe audio files with an ONNX export, without PyTorch.

Usage::

    python -m earlyexit_brain.runtime ONNX_FOLDER AUDIO [AUDIO ...]
        [--exit K | --policy NAME [--threshold T] | --budget-ms MS] [--threads N] [--precision fp32|int8]

Prints one tab-separated line per file (path, exit and layers, milliseconds, text), as
``python -m earlyexit_brain.transcribe``; a file that cannot be transcribed is reported on
stderr and the others are still transcribed; the exit code is 1 if any file failed, 2 for
a usage or model-loading error.
"""

import argparse
import logging
import sys
import time

from .model import EarlyExitONNX
from .policies import RUNTIME_POLICIES


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m earlyexit_brain.runtime", description="Transcribe audio files with an ONNX export (no PyTorch)."
    )
    parser.add_argument("model", help="onnx folder written by recipes/export.py")
    parser.add_argument("audio", nargs="+", help="audio files (any rate/channels soundfile reads)")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--exit", type=int, default=None, help="fixed exit K (1-based)")
    choice.add_argument(
        "--policy",
        choices=list(RUNTIME_POLICIES),
        default=None,
        help="exit policy (its calibrated threshold unless --threshold)",
    )
    choice.add_argument(
        "--budget-ms", type=float, default=None, help="latency budget in ms: the deepest exit that fits (budget policy)"
    )
    parser.add_argument("--threshold", type=float, default=None, help="threshold for --policy")
    parser.add_argument(
        "--threads", type=int, default=None, help="onnxruntime threads (default: one per physical core)"
    )
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32", help="graphs to run")
    args = parser.parse_args(argv)
    if args.threshold is not None and args.policy is None:
        parser.error("--threshold needs --policy")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        asr = EarlyExitONNX.from_folder(args.model, threads=args.threads, precision=args.precision)
        if args.budget_ms is not None:
            policy = asr.make_policy("budget", threshold=args.budget_ms)
        else:
            policy = asr.make_policy(args.policy, args.threshold, args.exit)
    except (ValueError, OSError) as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    failed = 0
    for path in args.audio:
        start = time.perf_counter()
        try:
            result = asr.transcribe_file(path, policy=policy)
        except ValueError as err:
            failed += 1
            print(f"Error: {err}", file=sys.stderr)
            continue
        ms = 1000.0 * (time.perf_counter() - start)
        print(f"{path}\texit {result.exit} ({result.layers} layers)\t{ms:.0f} ms\t{result.text}", flush=True)
    if failed:
        print(f"{failed} of {len(args.audio)} files failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
