#!/usr/bin/env python3
"""Side-by-side benchmarks (ratios measured in one run, never timed assertions).

Currently measured:

- ``train-step``: one training step (features -> encoder -> CTC heads -> loss,
  backward, optimiser step) of the early-exit model against the single-exit
  model with the same encoder, on the same batch, alternating the two models
  so that machine noise hits both alike. Reports the median, min and max of
  each and the ratio of medians, for the default synthetic configuration and
  for the paper-size encoder (12 layers, d_model 256, exits every 2 layers), and
  each model's peak memory (GPU: peak allocated; CPU: peak resident memory of 3 steps
  in a fresh process, minus its memory before the model was built).
- ``inference``: batch-1 latency from the waveform to each exit (2, 10 and 30 s of audio)
  against the proportional ideal computed from the same run (front end + k/N
  of the encoder's time), the speed-up of each exit over the full model, and
  the overhead of dynamic inference with a policy forced to exit k over the
  fixed-exit-k path. All variants are timed in rotation, so noise hits them alike.

Usage::

    python recipes/benchmark.py [--quick] [--out bench.json] [--threads 2]
                                [--only train-step|inference|throughput|compute|ddp]
                                [--device cuda] [--bf16]

- ``throughput``: audio seconds per second at every exit for a batch of 16.
- ``compute``: parameters and multiply-accumulates to every exit
  (torch.utils.flop_counter), to compare measured time with the compute bound.
- ``ddp``: training throughput of the smoke recipe with 1 process (2 threads) and
  2 processes (1 thread each, gloo), CPU only; on 2 cores expect little gain.
  ``--quick`` skips it unless ``--only ddp`` asks for it.

``bench.json`` holds every figure; ``bench.md`` beside it the tables.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from earlyexit_brain.exits import FixedExit  # noqa: E402
from earlyexit_brain.models.conformer import CTCExitHeads, EarlyExitConformerEncoder  # noqa: E402
from earlyexit_brain.models.pipeline import EarlyExitCTCModel  # noqa: E402
from earlyexit_brain.utils import rss_bytes  # noqa: E402

SECTIONS = ("train-step", "inference", "throughput", "compute", "ddp")

CONFIGS = {
    # name: (encoder kwargs, early-exit layers, single-exit layers)
    "default (6 layers, d 144)": (dict(num_layers=6, d_model=144, nhead=4, d_ffn=576,
                                       kernel_size=15), [2, 4, 6], [6]),
    "paper size (12 layers, d 256)": (dict(num_layers=12, d_model=256, nhead=8, d_ffn=2048,
                                           kernel_size=31), [2, 4, 6, 8, 10, 12], [12]),
}


def build(enc_kwargs, exit_layers, vocab, seed=0, device=torch.device("cpu")):
    torch.manual_seed(seed)
    enc = EarlyExitConformerEncoder(input_size=80, exit_layers=exit_layers, **enc_kwargs).to(device)
    heads = CTCExitHeads(enc_kwargs["d_model"], vocab, len(exit_layers)).to(device)
    params = list(enc.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    return enc, heads, opt


def train_step(model, feats, lens, tokens, token_lens):
    enc, heads, opt = model
    log_probs = heads(enc(feats, lens))
    losses = [torch.nn.functional.ctc_loss(
        lp.transpose(0, 1), tokens, (lens * lp.shape[1]).round().int(), token_lens,
        blank=0, zero_infinity=True) for lp in log_probs]
    loss = sum(losses)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def bench_train_step(name, batch, seconds, repeats, warmup, vocab=32, device=torch.device("cpu")):
    enc_kwargs, ee_layers, single_layers = CONFIGS[name]
    models = {"early_exit": build(enc_kwargs, ee_layers, vocab, device=device),
              "single_exit": build(enc_kwargs, single_layers, vocab, device=device)}
    frames = int(seconds * 100)
    torch.manual_seed(1)
    feats = torch.randn(batch, frames, 80, device=device)
    lens = torch.ones(batch, device=device)
    tokens = torch.randint(1, vocab, (batch, int(seconds * 12)), device=device)
    token_lens = torch.full((batch,), tokens.shape[1], dtype=torch.long, device=device)
    times = {k: [] for k in models}
    for i in range(warmup + repeats):
        for key in (("early_exit", "single_exit") if i % 2 == 0 else ("single_exit", "early_exit")):
            t = timed(lambda: train_step(models[key], feats, lens, tokens, token_lens), device)
            if i >= warmup:
                times[key].append(t)
    result = {"config": name, "batch": batch, "seconds_per_utterance": seconds,
              "threads": torch.get_num_threads(), "repeats": repeats, "device": str(device)}
    if device.type == "cpu":
        for key in models:  # each model alone in a fresh process
            result[f"peak_memory_gb_{key}"] = cpu_peak_memory_gb(name, key, batch, seconds, vocab)
    if device.type == "cuda":
        for key in models:  # one more step each, peak memory measured alone
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            train_step(models[key], feats, lens, tokens, token_lens)
            torch.cuda.synchronize()
            result[f"peak_memory_gb_{key}"] = torch.cuda.max_memory_allocated() / 2**30
    for key, values in times.items():
        result[key] = {"median_s": statistics.median(values), "min_s": min(values),
                       "max_s": max(values)}
    result["ratio"] = result["early_exit"]["median_s"] / result["single_exit"]["median_s"]
    pair = [a / b for a, b in zip(times["early_exit"], times["single_exit"])]
    result["ratio_pairwise_median"] = statistics.median(pair)
    return result


def memory_child(name, key, batch, seconds, vocab):
    """In a fresh process: peak RSS of 3 training steps minus the RSS before the model exists."""
    import resource

    enc_kwargs, ee_layers, single_layers = CONFIGS[name]
    frames = int(seconds * 100)
    torch.manual_seed(1)
    feats = torch.randn(batch, frames, 80)
    tokens = torch.randint(1, vocab, (batch, int(seconds * 12)))
    token_lens = torch.full((batch,), tokens.shape[1], dtype=torch.long)
    before = rss_bytes()
    model = build(enc_kwargs, ee_layers if key == "early_exit" else single_layers, vocab)
    for _ in range(3):
        train_step(model, feats, torch.ones(batch), tokens, token_lens)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"peak_bytes": peak - before}))


def cpu_peak_memory_gb(name, key, batch, seconds, vocab):
    """Peak resident memory of ``key``'s training steps, measured alone in a child process.

    Linux only (``/proc``, ``ru_maxrss`` in KiB); None elsewhere or if the child fails.
    """
    import subprocess

    if rss_bytes() is None:
        return None
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child",
                           json.dumps([name, key, batch, seconds, vocab]),
                           "--threads", str(torch.get_num_threads())],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        print(f"peak memory of {name} {key}: the child process failed:\n{proc.stderr[-2000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"] / 2 ** 30


def stats(values):
    return {"median_ms": 1000 * statistics.median(values), "min_ms": 1000 * min(values),
            "max_ms": 1000 * max(values)}


def build_inference_model(name, device, vocab=32, seconds=2.0):
    """Random-weight EarlyExitCTCModel of a configuration, in eval mode on ``device``."""
    from speechbrain.lobes.features import Fbank
    from speechbrain.processing.features import InputNormalization

    enc_kwargs, ee_layers, _ = CONFIGS[name]
    torch.manual_seed(0)
    enc = EarlyExitConformerEncoder(input_size=80, exit_layers=ee_layers, dropout=0.0, **enc_kwargs)
    heads = CTCExitHeads(enc_kwargs["d_model"], vocab, len(ee_layers))
    normalize = InputNormalization(norm_type="global")
    fbank = Fbank(n_mels=80)
    with torch.no_grad():
        normalize(fbank(0.05 * torch.randn(1, int(seconds * 16000))), torch.ones(1))  # statistics
    return EarlyExitCTCModel(fbank, normalize, enc, heads).eval().to(device)


def autocast(device, bf16):
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def bench_inference(name, seconds, repeats, warmup, device, bf16=False, forced=True):
    """Batch-1 latency per exit, proportional ideal, dynamic-policy overhead."""
    model = build_inference_model(name, device)
    enc, ee_layers = model.encoder, model.exit_layers
    num_exits, depth = len(ee_layers), enc.num_layers
    wav = (0.05 * torch.randn(1, int(seconds * 16000))).to(device)
    lens = torch.ones(1, device=device)

    def front():
        enc.start(model.features(wav, lens), lens)

    variants = {"front_end": front}
    for k in range(num_exits):
        variants[f"fixed_{k + 1}"] = lambda k=k: model.exit_log_probs(wav, lens, k)
        if forced:
            variants[f"forced_{k + 1}"] = lambda k=k: model.dynamic(wav, lens, FixedExit(k))
    times = {key: [] for key in variants}
    names = list(variants)
    with autocast(device, bf16):
        for i in range(warmup + repeats):
            order = names[i % len(names):] + names[: i % len(names)]  # rotate the order
            for key in order:
                t = timed(variants[key], device)
                if i >= warmup:
                    times[key].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    full, front_t = med[f"fixed_{num_exits}"], med["front_end"]
    exits = []
    for k, layer in enumerate(ee_layers, start=1):
        ideal = front_t + layer / depth * (full - front_t)
        entry = {
            "exit": k, "layer": layer, "fixed": stats(times[f"fixed_{k}"]),
            "ideal_ms": 1000 * ideal,
            "ratio_to_ideal": med[f"fixed_{k}"] / ideal,
            "speedup_vs_full": full / med[f"fixed_{k}"],
            "real_time_factor": med[f"fixed_{k}"] / seconds,
        }
        if forced:
            pair = [a / b for a, b in zip(times[f"forced_{k}"], times[f"fixed_{k}"])]
            entry.update({"forced_policy": stats(times[f"forced_{k}"]),
                          "forced_over_fixed": med[f"forced_{k}"] / med[f"fixed_{k}"],
                          "forced_over_fixed_pairwise": statistics.median(pair)})
        exits.append(entry)
    return {"config": name, "audio_seconds": seconds, "batch": 1, "device": str(device),
            "bf16": bf16, "threads": torch.get_num_threads(), "repeats": repeats,
            "front_end": stats(times["front_end"]), "exits": exits}


@torch.no_grad()
def bench_compute(name, seconds=10.0, vocab=32):
    """Parameters and multiply-accumulates to each exit (torch.utils.flop_counter), batch 1."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_inference_model(name, torch.device("cpu"), vocab)
    wav, lens = 0.05 * torch.randn(1, int(seconds * 16000)), torch.ones(1)
    rows = []
    for k, layer in enumerate(model.exit_layers):
        counter = FlopCounterMode(display=False)
        with counter:
            model.exit_log_probs(wav, lens, k)
        rows.append({"exit": k + 1, "layer": layer,
                     "params": model.encoder.params_to_exit(k) + model.heads.params_of_exit(k),
                     "gmacs": counter.get_total_flops() / 2e9})
    return {"config": name, "audio_seconds": seconds, "exits": rows}


@torch.no_grad()
def bench_throughput(name, batch, seconds, repeats, warmup, device, bf16=False):
    """Audio seconds transcribed per second at every exit, for a batch of equal-length utterances."""
    model = build_inference_model(name, device)
    wav = (0.05 * torch.randn(batch, int(seconds * 16000))).to(device)
    lens = torch.ones(batch, device=device)
    rows = []
    with autocast(device, bf16):
        for k, layer in enumerate(model.exit_layers):
            times = []
            for i in range(warmup + repeats):
                t = timed(lambda: model.exit_log_probs(wav, lens, k), device)
                if i >= warmup:
                    times.append(t)
            med = statistics.median(times)
            rows.append({"exit": k + 1, "layer": layer, **stats(times),
                         "audio_seconds_per_second": batch * seconds / med})
    return {"config": name, "batch": batch, "audio_seconds": seconds, "device": str(device),
            "bf16": bf16, "threads": torch.get_num_threads(), "repeats": repeats, "exits": rows}


def print_inference(res):
    print(f"inference, {res['config']}, batch 1 x {res['audio_seconds']} s, {res['device']}, "
          f"{res['threads']} threads{', bf16' if res['bf16'] else ''}: front end "
          f"{res['front_end']['median_ms']:.1f} ms")
    print("  exit layer  fixed ms [min-max]      ideal ms  ratio  speed-up  RTF     forced/fixed")
    for e in res["exits"]:
        forced = (f"{e['forced_over_fixed']:.3f} ({e['forced_over_fixed_pairwise']:.3f})"
                  if "forced_over_fixed" in e else "")
        print(f"  {e['exit']:4d} {e['layer']:5d}  {fmt_ms(e['fixed']):>22s}  {e['ideal_ms']:8.1f}  "
              f"{e['ratio_to_ideal']:.3f}  {e['speedup_vs_full']:7.2f}x  "
              f"{e['real_time_factor']:.4f}  {forced}", flush=True)


def run_smoke_recipe(procs, out, data, epochs, timeout=900, master_port=29533):
    """recipes/train.py on the smoke configuration with ``procs`` processes (gloo on the CPU).

    ``procs > 1`` launches ``torchrun --nproc_per_node=<procs>`` (as
    ``python -m torch.distributed.run``) on ``master_port``; returns report.json.
    """
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = ["recipes/train.py", "hparams/synthetic/smoke.yaml", f"--output_folder={out}",
            f"--data_folder={data}", f"--number_of_epochs={epochs}", "--policy_evaluation=False"]
    env = dict(os.environ)
    if procs == 1:
        cmd = [sys.executable] + args
    else:  # one thread per process so that the processes share the cores
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
               f"--master_port={master_port}"] + args + ["--distributed_backend=gloo"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "report.json")) as fin:
        report = json.load(fin)
    return report


def bench_ddp(epochs, workdir):
    """Training throughput of the smoke recipe with 1 and 2 processes (utterances per second)."""
    data = os.path.join(workdir, "data")
    run_smoke_recipe(1, os.path.join(workdir, "prepare"), data, 1)  # corpus and warm-up
    result = {"config": "hparams/synthetic/smoke.yaml", "epochs": epochs, "runs": []}
    for procs in (1, 2):
        report = run_smoke_recipe(procs, os.path.join(workdir, f"p{procs}"), data, epochs)
        seconds = report["train"]["seconds"]
        result["runs"].append({"processes": procs, "threads_per_process": 2 if procs == 1 else 1,
                               "train_seconds": seconds,
                               "utterances_per_second": report["train_utterances"] * epochs / seconds})
    result["speedup"] = result["runs"][1]["utterances_per_second"] / result["runs"][0]["utterances_per_second"]
    return result


def fmt_ms(d):
    return f"{d['median_ms']:.1f} [{d['min_ms']:.1f}-{d['max_ms']:.1f}]"


def fmt_s(d):
    return f"{d['median_s']:.3f} [{d['min_s']:.3f}-{d['max_s']:.3f}]"


def label(r):
    return r["config"] + (" bf16" if r.get("bf16") else "")


def table(title, columns, rows, notes=()):
    """A Markdown section: title, optional notes, a table with ``columns`` and ``rows`` of cells."""
    lines = [f"## {title}", ""]
    for note in notes:
        lines += [note, ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def markdown(output):
    """bench.md: every table of the run."""
    lines = ["# Benchmark results", "", f"Machine: {output['machine']}", ""]
    if "train_step" in output:
        rows = []
        for r in output["train_step"]:
            mem = (f"{r['peak_memory_gb_early_exit']:.2f} / {r['peak_memory_gb_single_exit']:.2f} GB"
                   if r.get("peak_memory_gb_early_exit") is not None else "n/a")
            rows.append([r["config"], f"{r['batch']} x {r['seconds_per_utterance']} s",
                         fmt_s(r["early_exit"]), fmt_s(r["single_exit"]), f"{r['ratio']:.3f}",
                         f"{r['ratio_pairwise_median']:.3f}", mem])
        lines += table("Training step: early-exit vs single-exit (same encoder, same batch)",
                       ["configuration", "batch", "early-exit s [min-max]", "single-exit s [min-max]",
                        "ratio", "pairwise", "peak memory ee / single"], rows)
    if "inference" in output:
        rows = []
        for r in output["inference"]:
            for e in r["exits"]:
                forced = (f"{e['forced_over_fixed']:.3f} ({e['forced_over_fixed_pairwise']:.3f})"
                          if "forced_over_fixed" in e else "")
                rows.append([label(r), f"{r['audio_seconds']:g}", f"{e['exit']} ({e['layer']})",
                             fmt_ms(e["fixed"]), f"{e['ideal_ms']:.1f}", f"{e['ratio_to_ideal']:.3f}",
                             f"{e['speedup_vs_full']:.2f}x", f"{e['real_time_factor']:.4f}", forced])
        lines += table("Batch-1 latency per exit",
                       ["configuration", "audio s", "exit (layer)", "ms [min-max]", "ideal ms", "ratio",
                        "speed-up vs full", "RTF", "forced / fixed (pairwise)"], rows,
                       ["Ideal: front end + k/N of the full model's remaining time, same run. Forced: "
                        "dynamic inference with a policy forced to stop at exit k."])
    if "throughput" in output:
        rows = [[label(r), f"{r['batch']} x {r['audio_seconds']:g} s", f"{e['exit']} ({e['layer']})",
                 fmt_ms(e), f"{e['audio_seconds_per_second']:.1f}"]
                for r in output["throughput"] for e in r["exits"]]
        lines += table("Batch throughput per exit",
                       ["configuration", "batch", "exit (layer)", "ms [min-max]", "audio s per s"], rows)
    if "compute" in output:
        latency = {(r["config"], e["exit"]): e["fixed"]["median_ms"] for r in output.get("inference", [])
                   if r["audio_seconds"] == 10.0 and not r["bf16"] for e in r["exits"]}
        rows = []
        for r in output["compute"]:
            for e in r["exits"]:
                ms = latency.get((r["config"], e["exit"]))
                rate = f"{2 * e['gmacs'] / (ms / 1000):.1f}" if ms else ""
                rows.append([r["config"], f"{e['exit']} ({e['layer']})", f"{e['params'] / 1e6:.2f} M",
                             f"{e['gmacs']:.2f}", rate])
        lines += table("Parameters and multiply-accumulates to each exit (10 s of audio, batch 1)",
                       ["configuration", "exit (layer)", "params", "GMACs", "achieved GFLOP/s"], rows,
                       ["GMACs from torch.utils.flop_counter; GFLOP/s = 2 x GMACs / the measured batch-1 "
                        "latency at 10 s above."])
    if "ddp" in output:
        d = output["ddp"]
        rows = [[f"{r['processes']} x {r['threads_per_process']}", f"{r['train_seconds']:.1f}",
                 f"{r['utterances_per_second']:.1f}"] for r in d["runs"]]
        lines += table("DDP on the CPU: the smoke recipe with 1 and 2 processes (gloo)",
                       ["processes x threads", "training seconds", "utterances per second"], rows)
        lines.append(f"Speed-up with 2 processes: {d['speedup']:.2f}x ({d['epochs']} epochs).")
    return "\n".join(lines)


def machine_description(device):
    import platform

    if device.type == "cuda":
        return (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
                f"{torch.get_num_threads()} CPU threads")
    return (f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller batches")
    parser.add_argument("--out", default="bench.json",
                        help="where to write the JSON results (the tables go beside it, .md)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    parser.add_argument("--only", choices=SECTIONS, help="run one section")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for inference")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*json.loads(args.memory_child))
        return
    device = torch.device(args.device)
    quick = args.quick
    repeats, warmup = (6, 2) if quick else (30, 3)
    output = {"machine": machine_description(device), "quick": quick}
    run = [args.only] if args.only else list(SECTIONS)
    if "train-step" in run:
        output["train_step"] = run_train_step(quick, repeats, warmup, device)
    if "inference" in run:
        output["inference"] = []
        for name in CONFIGS:
            for seconds in (2.0, 10.0, 30.0):
                reps = (5 if quick else 20) if seconds < 30 else (3 if quick else 8)
                res = bench_inference(name, seconds, reps, 2 if quick else 3, device, args.bf16,
                                      forced=seconds == 10.0)
                print_inference(res)
                output["inference"].append(res)
    if "throughput" in run:
        output["throughput"] = []
        for name in CONFIGS:
            res = bench_throughput(name, 16, 4.0, 2 if quick else 5, 1, device, args.bf16)
            print(f"throughput, {name}, batch 16 x 4 s: " + ", ".join(
                f"exit {e['exit']} {e['audio_seconds_per_second']:.0f} s/s" for e in res["exits"]),
                flush=True)
            output["throughput"].append(res)
    if "compute" in run:
        output["compute"] = [bench_compute(name) for name in CONFIGS]
        for res in output["compute"]:
            print(f"compute, {res['config']}, 10 s: " + ", ".join(
                f"exit {e['exit']} {e['params'] / 1e6:.2f} M params {e['gmacs']:.2f} GMACs"
                for e in res["exits"]), flush=True)
    if "ddp" in run and device.type == "cpu" and (args.only == "ddp" or not quick):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="bench-ddp-") as workdir:
            output["ddp"] = bench_ddp(2 if quick else 4, workdir)
        runs = output["ddp"]["runs"]
        print(f"ddp, smoke recipe: 1 process {runs[0]['utterances_per_second']:.1f} utt/s, "
              f"2 processes {runs[1]['utterances_per_second']:.1f} utt/s, speed-up "
              f"{output['ddp']['speedup']:.2f}x", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fout:
        json.dump(output, fout, indent=2)
    md_path = os.path.splitext(args.out)[0] + ".md"
    with open(md_path, "w") as fout:
        fout.write(markdown(output))
    print(f"Results written to {args.out} and {md_path}")


def run_train_step(quick, repeats, warmup, device):
    results = []
    for name in CONFIGS:
        batch = 8 if "paper" in name else 16
        if quick:
            batch //= 2
        if device.type == "cuda":
            batch *= 4
        res = bench_train_step(name, batch=batch, seconds=3.0, repeats=repeats, warmup=warmup,
                               device=device)
        results.append(res)
        print(f"train step, {name}, batch {res['batch']} x {res['seconds_per_utterance']} s, "
              f"{res['threads']} threads: early-exit {res['early_exit']['median_s']:.3f} s "
              f"[{res['early_exit']['min_s']:.3f}-{res['early_exit']['max_s']:.3f}], "
              f"single-exit {res['single_exit']['median_s']:.3f} s "
              f"[{res['single_exit']['min_s']:.3f}-{res['single_exit']['max_s']:.3f}], "
              f"ratio {res['ratio']:.3f} (pairwise median {res['ratio_pairwise_median']:.3f})"
              + (f", peak memory {res['peak_memory_gb_early_exit']:.2f} / "
                 f"{res['peak_memory_gb_single_exit']:.2f} GB"
                 if res.get("peak_memory_gb_early_exit") is not None else ""),
              flush=True)
    return results


if __name__ == "__main__":
    main()
