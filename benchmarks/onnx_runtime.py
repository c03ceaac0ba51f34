"""The ONNX runtime against PyTorch eager, side by side in one process (issue 29's measurements).

Run from the repository root::

    python -m benchmarks.onnx_runtime [--quick] [--out onnx_bench.json]
        [--experiment results/synthetic/conformer_ctc_ee/1234 --test-csv .../test.csv]

* latency: batch 1, 2 / 10 / 30 s of audio, 2 and 1 threads, the default and the paper-size
  Conformer (random weights, :func:`benchmarks.timing.build_inference_model`; with ``--configs``
  also the Splitformer on either trunk or a base-size wav2vec2), exported with
  :func:`earlyexit_brain.onnx_export.export_onnx_folder`: PyTorch eager
  (``EarlyExitCTCModel.exit_log_probs``), onnxruntime fp32 and int8
  (``EarlyExitONNX.log_probs_at_exit``) to every exit and the front end alone, timed in rotation;
  each exit's ratio to its proportional share ``front + layer / depth * (full - front)``;
* file sizes of the fp32 and int8 graphs;
* peak resident memory of a fresh process that loads the model and transcribes 10 s at the last
  exit: the runtime (torch never imported) against ``EarlyExitASR``;
* with ``--experiment``: greedy transcripts of every exit of a trained model on a test manifest,
  onnxruntime fp32 and int8 against PyTorch (share of identical transcripts, WER each).
"""

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np
import sentencepiece as spm
import soundfile as sf
import torch

from earlyexit_brain.export import export_inference_folder
from earlyexit_brain.files import atomic_write_text
from earlyexit_brain.inference import EarlyExitASR
from earlyexit_brain.onnx_export import export_onnx_folder, torch_exit_log_probs
from earlyexit_brain.runtime import EarlyExitONNX
from earlyexit_brain.runtime.audio import read_audio

from .splitformer import build_pair
from .ssl_exit_timing import ssl_model
from .timing import CONFIGS, build_inference_model, stats, time_in_rotation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def char_tokenizer(folder):
    """A character SentencePiece model (fewer pieces than the benchmark heads' 32 outputs)."""
    text = os.path.join(folder, "text.txt")
    with open(text, "w") as fout:
        for i in range(200):
            fout.write(" ".join(LETTERS[(i + j) % 26] * (1 + j % 3) for j in range(12)) + "\n")
    prefix = os.path.join(folder, "chars")
    spm.SentencePieceTrainer.train(
        input=text,
        model_prefix=prefix,
        vocab_size=30,
        model_type="char",
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return prefix + ".model"


#: SSL encoders at their base size (12 layers, d 768, exits every 2 layers), random weights from the
#: transformers configuration: nothing downloads. Not in the default ``--configs``.
SSL_CONFIGS = {"wav2vec2 base (12 layers, d 768)": "wav2vec2"}

#: The Splitformer on the trunk of a :data:`benchmarks.timing.CONFIGS` configuration (its
#: defaults, as :func:`benchmarks.splitformer.build_pair` builds it). Not in the default ``--configs``.
SPLITFORMER_CONFIGS = {f"splitformer, {name}": name for name in CONFIGS}


def export_config(name, workdir, tokenizer):
    """The random-weight model of ``name``, its inference folder and its ONNX folder (fp32 and int8)."""
    features = {"sample_rate": 16000, "n_fft": 400, "n_mels": 80, "hop_length": 10, "win_length": 25}
    if name in SSL_CONFIGS:
        torch.manual_seed(0)
        model, features = ssl_model(SSL_CONFIGS[name], vocab=32).eval(), {"sample_rate": 16000}
    elif name in SPLITFORMER_CONFIGS:
        model = build_pair(SPLITFORMER_CONFIGS[name], CPU)["splitformer"]
    else:
        model = build_inference_model(name, CPU)
    slug = name.split(" (")[0].replace(",", "").replace(" ", "_")
    inference = export_inference_folder(os.path.join(workdir, slug, "inference"), model, features, tokenizer)
    onnx = export_onnx_folder(
        inference, os.path.join(workdir, slug, "onnx"), int8=True, latency_durations=(2.0, 5.0), latency_repeats=1
    )
    return model, inference, onnx


def folder_sizes(onnx):
    """Bytes of the fp32 and int8 graphs."""
    manifest = json.load(open(os.path.join(onnx, "manifest.json")))
    return {
        p: sum(
            os.path.getsize(os.path.join(onnx, n))
            for n in manifest["files"]
            if n.startswith(p + "/") and n.endswith(".onnx")
        )
        for p in ("fp32", "int8")
    }


@torch.no_grad()
def bench_latency(name, model, onnx, threads, seconds, repeats, warmup):
    """Median ms per exit (and the front end) of PyTorch, fp32 and int8 at batch 1, timed in rotation."""
    torch.set_num_threads(threads)
    engines = {p: EarlyExitONNX.from_folder(onnx, threads=threads, precision=p) for p in ("fp32", "int8")}
    wav = (0.05 * np.random.default_rng(0).standard_normal((1, int(seconds * 16000)))).astype(np.float32)
    tw, lens, tl = torch.from_numpy(wav), np.ones(1, np.float32), torch.ones(1)
    variants = {"torch_front": lambda: model.encoder.start(model.features(tw, tl), tl)}
    for p, rt in engines.items():
        variants[f"{p}_front"] = lambda rt=rt: rt._run_front(wav, lens)
    for k in range(model.num_exits):
        variants[f"torch_{k}"] = lambda k=k: model.exit_log_probs(tw, tl, k)
        for p, rt in engines.items():
            variants[f"{p}_{k}"] = lambda k=k, rt=rt: rt.log_probs_at_exit(wav, lens, k)
    times = time_in_rotation(variants, repeats, warmup, CPU)
    med = {key: 1000 * statistics.median(v) for key, v in times.items()}
    depth, last = model.encoder.num_layers, model.num_exits - 1
    rows = []
    for k, layer in enumerate(model.exit_layers):
        row = {"exit": k + 1, "layer": layer}
        for engine in ("torch", "fp32", "int8"):
            front, full = med[f"{engine}_front"], med[f"{engine}_{last}"]
            ideal = front + layer / depth * (full - front)
            row[engine] = {**stats(times[f"{engine}_{k}"]), "ratio_to_share": med[f"{engine}_{k}"] / ideal}
        row["fp32_over_torch"] = med[f"fp32_{k}"] / med[f"torch_{k}"]
        row["int8_over_torch"] = med[f"int8_{k}"] / med[f"torch_{k}"]
        rows.append(row)
    return {
        "config": name,
        "threads": threads,
        "audio_seconds": seconds,
        "batch": 1,
        "repeats": repeats,
        "front_ms": {e: med[f"{e}_front"] for e in ("torch", "fp32", "int8")},
        "first_exit_speedup": {e: med[f"{e}_{last}"] / med[f"{e}_0"] for e in ("torch", "fp32", "int8")},
        "exits": rows,
    }


# ---------------------------------------------------------------- peak memory in a fresh process
#: The child's peak RSS: VmHWM of /proc/self/status (``ru_maxrss`` would carry the parent's peak
#: across fork and exec on Linux).
PEAK = """
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""

CHILD = {
    "runtime": PEAK
    + """
import json, sys
from earlyexit_brain.runtime import EarlyExitONNX
asr = EarlyExitONNX.from_folder(sys.argv[1], threads=int(sys.argv[3]), precision=sys.argv[4])
r = asr.transcribe_file(sys.argv[2], exit=asr.num_exits)
print(json.dumps({"peak_rss_bytes": peak(), "torch_loaded": "torch" in sys.modules, "exit": r.exit}))
""",
    "pytorch": PEAK
    + """
import json, sys
import torch
torch.set_num_threads(int(sys.argv[3]))
from earlyexit_brain.inference import EarlyExitASR
asr = EarlyExitASR.from_hparams(source=sys.argv[1], savedir=sys.argv[1])
r = asr.transcribe_file(sys.argv[2], exit=asr.num_exits, decoder="ctc_greedy")
print(json.dumps({"peak_rss_bytes": peak(), "torch_loaded": True, "exit": r.exit}))
""",
}


def peak_memory(kind, folder, wav_path, threads, precision="fp32"):
    """Peak RSS (bytes) of a fresh process that loads ``folder`` and transcribes ``wav_path``."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD[kind], folder, wav_path, str(threads), precision],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"peak memory ({kind}): the child process failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- accuracy of a trained model
def read_manifest_rows(path):
    with open(path, newline="") as fin:
        return list(csv.DictReader(fin))


def word_errors(ref, hyp):
    """Word edit distance (Levenshtein) and the reference's words."""
    r, h = ref.split(), hyp.split()
    row = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        prev, row[0] = row[0], i
        for j, hw in enumerate(h, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (rw != hw))
    return row[-1], len(r)


def bench_accuracy(experiment, test_csv, onnx=None, limit=None):
    """Greedy transcripts of every exit on ``test_csv``: PyTorch, onnxruntime fp32 and int8."""
    inference = os.path.join(experiment, "inference")
    onnx = onnx or os.path.join(experiment, "onnx")
    asr = EarlyExitASR.from_hparams(source=inference, savedir=inference)
    greedy = asr.ctc_decoder("ctc_greedy")
    engines = {p: EarlyExitONNX.from_folder(onnx, precision=p) for p in ("fp32", "int8")}
    rows = read_manifest_rows(test_csv)[:limit]
    k_exits = asr.num_exits
    errors = {e: [0] * k_exits for e in ("torch", "fp32", "int8")}
    same = {p: [0] * k_exits for p in engines}
    words = 0
    for row in rows:
        wav = read_audio(row["wav"], 16000)[None]
        ref = torch_exit_log_probs(asr.model, wav, np.ones(1, np.float32))
        texts = {"torch": [greedy(torch.from_numpy(lp), torch.ones(1))[0] for lp in ref]}
        for p, rt in engines.items():
            texts[p] = [rt.text(lp[0]) for lp in rt.exit_log_probs(wav)]
        n = None
        for e, hyps in texts.items():
            for k, hyp in enumerate(hyps):
                err, n = word_errors(row["wrd"], hyp)
                errors[e][k] += err
        words += n
        for p in engines:
            for k in range(k_exits):
                same[p][k] += texts[p][k] == texts["torch"][k]
    return {
        "experiment": experiment,
        "test_csv": test_csv,
        "utterances": len(rows),
        "words": words,
        "wer": {e: [round(100.0 * v / words, 2) for v in errs] for e, errs in errors.items()},
        "same_transcript": {p: [round(100.0 * v / len(rows), 2) for v in s] for p, s in same.items()},
    }


# ---------------------------------------------------------------- tables
def markdown(result):
    lines = []
    for lat in result["latency"]:
        lines += [
            f"\n{lat['config']}, {lat['audio_seconds']:g} s, {lat['threads']} thread(s), batch 1 (median ms; "
            f"front end: torch {lat['front_ms']['torch']:.1f}, fp32 {lat['front_ms']['fp32']:.1f}, "
            f"int8 {lat['front_ms']['int8']:.1f})",
            "",
            "| exit | layer | PyTorch | ORT fp32 | ORT int8 | fp32 / PyTorch | int8 / PyTorch | "
            "fp32 / share | int8 / share |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in lat["exits"]:
            lines.append(
                f"| {r['exit']} | {r['layer']} | {r['torch']['median_ms']:.1f} | {r['fp32']['median_ms']:.1f} "
                f"| {r['int8']['median_ms']:.1f} | {r['fp32_over_torch']:.2f} | {r['int8_over_torch']:.2f} "
                f"| {r['fp32']['ratio_to_share']:.2f} | {r['int8']['ratio_to_share']:.2f} |"
            )
        s = lat["first_exit_speedup"]
        lines.append(
            f"\nfull model / first exit: PyTorch {s['torch']:.2f}x, fp32 {s['fp32']:.2f}x, int8 {s['int8']:.2f}x"
        )
    lines += ["\n| model | fp32 graphs MB | int8 graphs MB | int8 / fp32 |", "|---|---|---|---|"]
    for name, size in result["sizes"].items():
        lines.append(
            f"| {name} | {size['fp32'] / 1e6:.2f} | {size['int8'] / 1e6:.2f} | {size['int8'] / size['fp32']:.3f} |"
        )
    lines += [
        "\n| model, 10 s, last exit | runtime fp32 MB | runtime int8 MB | EarlyExitASR MB | fp32 / PyTorch |",
        "|---|---|---|---|---|",
    ]
    for name, mem in result["memory"].items():
        lines.append(
            f"| {name} | {mem['runtime_fp32'] / 2**20:.0f} | {mem['runtime_int8'] / 2**20:.0f} | "
            f"{mem['pytorch'] / 2**20:.0f} | {mem['runtime_fp32'] / mem['pytorch']:.2f} |"
        )
    acc = result.get("accuracy")
    if acc:
        lines += [
            f"\naccuracy: {acc['utterances']} utterances of {acc['test_csv']} ({acc['words']} words), greedy CTC",
            "",
            "| exit | PyTorch WER | fp32 WER | int8 WER | fp32 same transcript % | int8 same % |",
            "|---|---|---|---|---|---|",
        ]
        for k in range(len(acc["wer"]["torch"])):
            lines.append(
                f"| {k + 1} | {acc['wer']['torch'][k]:.2f} | {acc['wer']['fp32'][k]:.2f} | "
                f"{acc['wer']['int8'][k]:.2f} | {acc['same_transcript']['fp32'][k]:.2f} | "
                f"{acc['same_transcript']['int8'][k]:.2f} |"
            )
    return "\n".join(lines) + "\n"


def report(result, text, out=None):
    """Print the tables ``text``; with ``out``, write ``result`` there as JSON and ``text`` beside it (.md)."""
    print(text)
    if out:
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
        atomic_write_text(os.path.splitext(out)[0] + ".md", text)


def add_latency_arguments(parser, repeats: int):
    """The batch-1 timing options this module and :mod:`benchmarks.controller_decision` share."""
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--seconds", type=float, nargs="+", default=[2.0, 10.0, 30.0])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--warmup", type=int, default=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description="ONNX runtime against PyTorch eager (latency, sizes, memory).")
    parser.add_argument("--quick", action="store_true", help="the default model, 2 s, 1 repeat (a smoke run)")
    add_latency_arguments(parser, repeats=5)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=list(CONFIGS),
        choices=list(CONFIGS) + list(SSL_CONFIGS) + list(SPLITFORMER_CONFIGS),
        help="model configurations (default: the two Conformers)",
    )
    parser.add_argument("--experiment", default=None, help="a trained experiment for the accuracy check")
    parser.add_argument("--test-csv", default=None, help="its test manifest")
    parser.add_argument("--onnx", default=None, help="the experiment's onnx folder (default <experiment>/onnx)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many test utterances")
    parser.add_argument("--out", default=None, help="write the result as JSON (and .md beside it)")
    args = parser.parse_args(argv)
    if args.quick:
        args.configs, args.seconds, args.repeats, args.threads = [list(CONFIGS)[0]], [2.0], 1, [1]
    result = {"latency": [], "sizes": {}, "memory": {}, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as workdir:
        tokenizer = char_tokenizer(workdir)
        wav_path = os.path.join(workdir, "ten_seconds.wav")
        sf.write(wav_path, (0.05 * np.random.default_rng(1).standard_normal(160000)).astype(np.float32), 16000)
        for name in args.configs:
            model, inference, onnx = export_config(name, workdir, tokenizer)
            result["sizes"][name] = folder_sizes(onnx)
            for threads in args.threads:
                for seconds in args.seconds:
                    lat = bench_latency(name, model, onnx, threads, seconds, args.repeats, args.warmup)
                    result["latency"].append(lat)
                    print(markdown({"latency": [lat], "sizes": {}, "memory": {}}), flush=True)
            threads = args.threads[0]
            runtime_fp32 = peak_memory("runtime", onnx, wav_path, threads)
            if runtime_fp32["torch_loaded"]:
                raise RuntimeError("the runtime's child process imported torch")
            result["memory"][name] = {
                "threads": threads,
                "runtime_fp32": runtime_fp32["peak_rss_bytes"],
                "runtime_int8": peak_memory("runtime", onnx, wav_path, threads, "int8")["peak_rss_bytes"],
                "pytorch": peak_memory("pytorch", inference, wav_path, threads)["peak_rss_bytes"],
            }
    if args.experiment:
        result["accuracy"] = bench_accuracy(args.experiment, args.test_csv, args.onnx, args.limit)
    report(result, markdown(result), args.out)


if __name__ == "__main__":
    main()
