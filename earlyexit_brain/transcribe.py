"""Transcribe audio files with an early-exit model from the command line.

Usage::

    python -m earlyexit_brain.transcribe MODEL AUDIO [AUDIO ...]
        [--exit K | --policy NAME [--threshold T] | --budget-ms MS]
        [--savedir DIR] [--device cpu|cuda] [--trust-remote-code]
        [--threads N] [--precision fp32|int8]

``MODEL`` is an inference folder (``<experiment>/inference``, a published
folder), a Hugging Face Hub id ``OWNER/NAME`` or an ONNX export (``onnx/``
written by recipes/export.py, run by :class:`~earlyexit_brain.runtime.EarlyExitONNX`
with ``--threads`` onnxruntime threads and ``--precision``; greedy CTC decoding,
on the CPU; ``python -m earlyexit_brain.runtime`` is the same command without
PyTorch). Without ``--exit``,
``--policy`` or ``--budget-ms`` the model's stored default policy is used.
Prints one tab-separated line per file: the path, the exit used (and encoder
layers computed), the time in milliseconds and the text. A file that cannot be
transcribed (missing, undecodable, truncated, empty, silent, shorter than
the model's front end takes) is reported on stderr and the others are still
transcribed; the exit code is 1 if any file failed, 2 for a usage or
model-loading error or a ``--device`` this machine cannot use.
"""

import argparse
import logging
import sys
import time

from tqdm import tqdm

from .config import check_device
from .decoding.ctc import CTC_DECODERS
from .inference import EarlyExitASR
from .policies import POLICY_NAMES
from .runtime import EarlyExitONNX, is_onnx_folder


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m earlyexit_brain.transcribe", description="Transcribe audio files with an early-exit model."
    )
    parser.add_argument("model", help="inference folder or Hub id OWNER/NAME")
    parser.add_argument("audio", nargs="+", help="audio files (any rate/channels soundfile reads)")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--exit", type=int, default=None, help="fixed exit K (1-based)")
    choice.add_argument(
        "--policy",
        choices=[p for p in POLICY_NAMES if p != "oracle"],
        default=None,
        help="exit policy (its calibrated threshold unless --threshold)",
    )
    choice.add_argument(
        "--budget-ms", type=float, default=None, help="latency budget in ms: the deepest exit that fits (budget policy)"
    )
    parser.add_argument("--threshold", type=float, default=None, help="threshold for --policy")
    parser.add_argument(
        "--decoder",
        choices=list(CTC_DECODERS),
        default=None,
        help="CTC models: override the decoder stored with the model (ctc_beam uses its n-gram LM when it has one)",
    )
    parser.add_argument("--savedir", default=None, help="where Hub files are linked (default: cache)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="load a hyperparams.yaml that uses code outside the allowlist"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="ONNX folders: onnxruntime threads (default: one per physical core)"
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "int8"],
        default="fp32",
        help="ONNX folders: the graphs to run (int8 when exported with --int8)",
    )
    args = parser.parse_args(argv)
    if args.threshold is not None and args.policy is None:
        parser.error("--threshold needs --policy")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("speechbrain").setLevel(logging.WARNING)  # no per-file fetch messages

    onnx = is_onnx_folder(args.model)
    try:
        if onnx:
            if args.decoder not in (None, "ctc_greedy") or args.device != "cpu":
                raise ValueError("an ONNX folder decodes greedily on the CPU (no --decoder ctc_beam, no --device)")
            asr = EarlyExitONNX.from_folder(args.model, threads=args.threads, precision=args.precision)
        else:
            check_device(args.device)
            asr = EarlyExitASR.from_hparams(
                source=args.model,
                savedir=args.savedir,
                run_opts={"device": args.device},
                trust_remote_code=args.trust_remote_code,
            )
        if args.budget_ms is not None:
            policy = asr.make_policy("budget", threshold=args.budget_ms)
        else:
            policy = asr.make_policy(args.policy, args.threshold, args.exit)
    except (ValueError, OSError, RuntimeError) as err:  # RuntimeError: e.g. torch's device errors
        print(f"Error: {err}", file=sys.stderr)
        return 2
    failed = 0
    bar = tqdm(args.audio, desc="transcribing", unit="file", file=sys.stderr, disable=len(args.audio) < 2)
    for path in bar:
        start = time.perf_counter()
        try:
            result = asr.transcribe_file(path, policy=policy, **({} if onnx else {"decoder": args.decoder}))
        except ValueError as err:
            failed += 1
            tqdm.write(f"Error: {err}", file=sys.stderr)
            continue
        except RuntimeError as err:  # one file's failure inside the model never stops the list
            failed += 1
            tqdm.write(f"Error: {path}: {type(err).__name__}: {err}", file=sys.stderr)
            continue
        ms = 1000.0 * (time.perf_counter() - start)
        tqdm.write(f"{path}\texit {result.exit} ({result.layers} layers)\t{ms:.0f} ms\t{result.text}", file=sys.stdout)
    if failed:
        print(f"{failed} of {len(args.audio)} files failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
