"""Soak test: transcribe many short files in one process and watch its memory.

Usage::

    python -m benchmarks.soak MODEL [--files 2000] [--seconds 1.5] [--policy posterior] [--out soak.json]

``MODEL`` is an inference folder or a Hub id. The command writes ``--files``
generated utterances (tones with noise, lengths varying around ``--seconds``)
to a temporary folder, transcribes them one by one with
``EarlyExitASR.transcribe_file`` under the given policy (default: the model's
stored default), and records the process's resident set size (RSS) after the
first tenth of the files (warm-up: allocator caches fill) and then every tenth of the run. It prints the
figures and writes them to ``--out``; it asserts nothing: memory is flat when
the end RSS is within noise of the warm-up RSS.
"""

import argparse
import json
import math
import os
import resource
import tempfile
import time

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from earlyexit_brain.files import NotOurFolderError, check_overwritable_file, is_own_json
from earlyexit_brain.inference import EarlyExitASR
from earlyexit_brain.utils import rss_bytes


def rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc; peak RSS elsewhere)."""
    current = rss_bytes()
    if current is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return current / 2**20


def write_files(folder: str, n: int, seconds: float, sample_rate: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        length = int(sample_rate * seconds * rng.uniform(0.6, 1.4))
        t = np.arange(length) / sample_rate
        freq = rng.uniform(120, 400)
        wav = 0.3 * np.sin(2 * math.pi * freq * t) + 0.02 * rng.standard_normal(length)
        path = os.path.join(folder, f"u{i:05d}.wav")
        sf.write(path, wav.astype("float32"), sample_rate, subtype="PCM_16")
        paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description="Transcribe many files in one process; report RSS.")
    parser.add_argument("model", help="inference folder or Hub id")
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=1.5, help="mean utterance length")
    parser.add_argument("--policy", default=None, help="exit policy (default: the stored default)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="soak.json")
    args = parser.parse_args(argv)
    if args.files < 10:
        parser.error("--files must be at least 10")
    try:  # overwrite only a result this command wrote
        check_overwritable_file(args.out, "--out", lambda p: is_own_json(p, "rss_growth_mb"))
    except NotOurFolderError as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)
    asr = EarlyExitASR.from_hparams(source=args.model)
    policy = asr.make_policy(args.policy)
    checkpoints = sorted({args.files * k // 10 for k in range(1, 11)})
    samples, exits = [], []
    with tempfile.TemporaryDirectory() as folder:
        paths = write_files(folder, args.files, args.seconds, int(asr.hparams.sample_rate))
        start = time.perf_counter()
        for i, path in enumerate(tqdm(paths, desc="soak", unit="file"), start=1):
            exits.append(asr.transcribe_file(path, policy=policy).exit)
            if i in checkpoints:
                samples.append(
                    {"files": i, "rss_mb": round(rss_mb(), 1), "seconds": round(time.perf_counter() - start, 1)}
                )
    warm, end = samples[0]["rss_mb"], samples[-1]["rss_mb"]
    result = {
        "model": args.model,
        "files": args.files,
        "mean_seconds": args.seconds,
        "policy": policy.describe(),
        "rss": samples,
        "rss_warm_mb": warm,
        "rss_end_mb": end,
        "rss_growth_mb": round(end - warm, 1),
        "exit_counts": {str(k): exits.count(k) for k in sorted(set(exits))},
    }
    with open(args.out, "w") as fout:  # checked before the run: only a soak result
        json.dump(result, fout, indent=2)
    print("| files | RSS MiB | seconds |")
    print("|---|---|---|")
    for s in samples:
        print(f"| {s['files']} | {s['rss_mb']:.1f} | {s['seconds']:.1f} |")
    print(
        f"RSS after warm-up {warm:.1f} MiB, at the end {end:.1f} MiB "
        f"(growth {end - warm:+.1f} MiB over {args.files - samples[0]['files']} files); "
        f"exits used: {result['exit_counts']}; written to {args.out}"
    )
    return result


if __name__ == "__main__":
    main()
