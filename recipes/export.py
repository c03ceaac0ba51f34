#!/usr/bin/env python3
"""Export a trained early-exit model to ONNX, every exit kept (docs/deployment.md).

Usage::

    python recipes/export.py results/synthetic/conformer_ctc_ee/1234 [--out DIR] [--int8]
        [--audio FILE ...] [--tolerance 1e-3] [--opset 18] [--threads N]
        [--latency-seconds 2 5 10] [--latency-repeats 3]

The source is an experiment folder (its ``inference/``) or an inference folder. Writes
``DIR`` (default ``onnx/`` beside the inference folder): the front end, one graph per
encoder segment between consecutive exits, one per exit head, the tokenizer, the
calibrated thresholds, a latency table measured in onnxruntime and ``manifest.json``
(sha256 of every file). ``--int8`` adds dynamically quantised int8 graphs beside the fp32
ones. Before the manifest is written, a few utterances (``--audio``, default generated
tones) go through onnxruntime and PyTorch; the export is refused if any exit's
log-probabilities differ by more than ``--tolerance``. Load the folder with
``earlyexit_brain.runtime.EarlyExitONNX`` or ``python -m earlyexit_brain.transcribe DIR AUDIO``.
"""

import argparse
import logging
import sys

from earlyexit_brain.files import NotOurFolderError
from earlyexit_brain.onnx_export import OPSET, TOLERANCE, export_onnx_folder


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="experiment folder or inference folder")
    parser.add_argument("--out", default=None, help="the onnx folder (default: onnx/ beside inference/)")
    parser.add_argument("--int8", action="store_true", help="also write int8 graphs (dynamic quantisation)")
    parser.add_argument(
        "--audio",
        nargs="+",
        default=[],
        help="audio files to compare onnxruntime and PyTorch on (default: generated tones)",
    )
    parser.add_argument(
        "--tolerance", type=float, default=TOLERANCE, help="largest |log p| difference accepted at any exit (fp32)"
    )
    parser.add_argument("--opset", type=int, default=OPSET, help="ONNX opset")
    parser.add_argument(
        "--threads", type=int, default=None, help="onnxruntime threads for the latency table (default: onnxruntime's)"
    )
    parser.add_argument(
        "--latency-seconds",
        type=float,
        nargs="+",
        default=[2.0, 5.0, 10.0],
        help="audio lengths of the runtime's latency table",
    )
    parser.add_argument("--latency-repeats", type=int, default=3, help="runs per latency point")
    return parser.parse_args(argv)


def main(argv) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = export_onnx_folder(
            args.source,
            args.out,
            int8=args.int8,
            opset=args.opset,
            tolerance=args.tolerance,
            audio=args.audio,
            latency_durations=args.latency_seconds,
            latency_repeats=args.latency_repeats,
            threads=args.threads,
        )
    except (ValueError, OSError, NotOurFolderError) as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
