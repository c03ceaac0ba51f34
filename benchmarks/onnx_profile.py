"""Where the ONNX runtime's time goes, against PyTorch eager (issue 29: profile a missed speed figure).

Run from the repository root::

    python -m benchmarks.onnx_profile [--configs "paper size (12 layers, d 256)"] [--threads 2]
        [--seconds 10] [--repeats 5] [--out profile.json]

For one random-weight model (the configurations of :mod:`benchmarks.timing`, exported as
:mod:`benchmarks.onnx_runtime` does) and batch 1 at the last exit (front end, every segment, the
last head):

* onnxruntime's profiler (``SessionOptions.enable_profiling``) over ``repeats`` runs of fp32 and int8:
  milliseconds per run by operator type, summed over the graphs, and by graph;
* PyTorch's profiler (``torch.profiler``) over the same runs of ``EarlyExitCTCModel.exit_log_probs``:
  milliseconds per run by aten operator (self time);
* the nodes of each precision's segment graph after onnxruntime's optimisations, by type (which
  fusions happened);
* the full model timed in rotation with onnxruntime's intra-op threads sleeping between graphs (the
  runtime's setting) and spinning (onnxruntime's default), PyTorch beside them.
"""

import argparse
import collections
import glob
import json
import os
import statistics
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import torch

from earlyexit_brain.runtime import EarlyExitONNX
from earlyexit_brain.runtime.folder import session_options

from .onnx_runtime import char_tokenizer, export_config, report
from .timing import CONFIGS, time_in_rotation

CPU = torch.device("cpu")


def sessions(rt):
    """``(graph name, session)`` of every graph of ``rt``."""
    named = [("front", rt.front)]
    named += [(f"segment {k + 1}", s) for k, s in enumerate(rt.segments)]
    named += [(f"head {k + 1}", s) for k, s in enumerate(rt.heads)]
    return named


def ort_profile(onnx_folder, precision, threads, wav, lens, repeats, workdir):
    """Milliseconds per run of the full model by operator type and by graph (onnxruntime's profiler)."""
    options = session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(workdir, f"ort_{precision}")
    rt = EarlyExitONNX.from_folder(onnx_folder, threads=threads, precision=precision, options=options)
    last = rt.num_exits - 1
    for _ in range(1 + repeats):  # one warm-up run, left out below
        rt.log_probs_at_exit(wav, lens, last)
    by_op, by_graph = collections.Counter(), collections.Counter()
    for name, session in sessions(rt):
        with open(session.end_profiling()) as fin:
            events = json.load(fin)
        kernels = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
        # every graph ran once per run (the other exits' heads never): the first run is the warm-up
        kernels = kernels[len(kernels) // (repeats + 1) :]
        for e in kernels:
            by_op[e["args"]["op_name"]] += e["dur"] / 1000 / repeats
            by_graph[name] += e["dur"] / 1000 / repeats
    return {"by_op_ms": dict(by_op.most_common()), "by_graph_ms": dict(by_graph), "total_ms": sum(by_op.values())}


@torch.no_grad()
def torch_profile(model, threads, wav, repeats):
    """Milliseconds per run of the full model by aten operator, self time (PyTorch's profiler)."""
    torch.set_num_threads(threads)
    tw, tl = torch.from_numpy(wav), torch.ones(1)
    last = model.num_exits - 1
    model.exit_log_probs(tw, tl, last)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            model.exit_log_probs(tw, tl, last)
    rows = sorted(prof.key_averages(), key=lambda r: -r.self_cpu_time_total)
    by_op = {r.key: r.self_cpu_time_total / 1000 / repeats for r in rows if r.self_cpu_time_total > 0}
    return {"by_op_ms": by_op, "total_ms": sum(by_op.values())}


def optimised_nodes(onnx_folder, precision, workdir):
    """Node types of the first segment graph after onnxruntime's optimisations, with counts."""
    rt_manifest = json.load(open(os.path.join(onnx_folder, "manifest.json")))
    path = os.path.join(onnx_folder, rt_manifest["precisions"][precision]["segments"][0]["file"])
    options = ort.SessionOptions()
    options.optimized_model_filepath = os.path.join(workdir, f"optimised_{precision}.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    before = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
    after = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    return {"before": dict(before.most_common()), "after": dict(after.most_common())}


def spinning(model, onnx_folder, threads, wav, lens, repeats):
    """Median ms of the full model: PyTorch, and fp32 / int8 with sleeping and spinning thread pools."""
    torch.set_num_threads(threads)
    tw, tl = torch.from_numpy(wav), torch.ones(1)
    last = model.num_exits - 1
    variants = {"torch": lambda: model.exit_log_probs(tw, tl, last)}
    for precision in ("fp32", "int8"):
        for spin in (False, True):
            options = session_options(threads, spinning=spin)
            rt = EarlyExitONNX.from_folder(onnx_folder, threads=threads, precision=precision, options=options)
            name = f"{precision} {'spinning' if spin else 'sleeping'} threads"
            variants[name] = lambda rt=rt: rt.log_probs_at_exit(wav, lens, last)
    with torch.no_grad():
        times = time_in_rotation(variants, repeats, 1, CPU)
    return {key: 1000 * statistics.median(v) for key, v in times.items()}


def markdown(result, top=12):
    """The profile as markdown tables."""
    lines = [
        f"{result['config']}, {result['audio_seconds']:g} s, {result['threads']} thread(s), batch 1, last exit, "
        f"{result['repeats']} runs (onnxruntime {result['onnxruntime']}, torch {result['torch_version']})",
        "",
        "| onnxruntime op | fp32 ms | int8 ms |",
        "|---|---|---|",
    ]
    fp32, int8 = result["ort"]["fp32"]["by_op_ms"], result["ort"]["int8"]["by_op_ms"]
    for op in list(dict.fromkeys(list(fp32)[:top] + list(int8)[:top])):
        lines.append(f"| {op} | {fp32.get(op, 0):.1f} | {int8.get(op, 0):.1f} |")
    lines.append(
        f"| **all kernels** | {result['ort']['fp32']['total_ms']:.1f} | {result['ort']['int8']['total_ms']:.1f} |"
    )
    lines += ["", "| graph | fp32 ms | int8 ms |", "|---|---|---|"]
    for graph, ms in result["ort"]["fp32"]["by_graph_ms"].items():
        lines.append(f"| {graph} | {ms:.1f} | {result['ort']['int8']['by_graph_ms'].get(graph, 0):.1f} |")
    lines += ["", "| PyTorch op (self) | ms |", "|---|---|"]
    for op, ms in list(result["torch"]["by_op_ms"].items())[:top]:
        lines.append(f"| {op} | {ms:.1f} |")
    lines.append(f"| **all ops** | {result['torch']['total_ms']:.1f} |")
    for precision, nodes in result["optimised_nodes"].items():
        lines.append(
            f"\nsegment 1, {precision}: {sum(nodes['before'].values())} nodes exported, "
            f"{sum(nodes['after'].values())} after onnxruntime's optimisations: "
            + ", ".join(f"{op} {n}" for op, n in nodes["after"].items())
        )
    lines += ["", "| full model, timed in rotation | median ms |", "|---|---|"]
    for key, ms in result["spinning_ms"].items():
        lines.append(f"| {key} | {ms:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description="onnxruntime's and PyTorch's profiles of the full model.")
    parser.add_argument("--configs", default=list(CONFIGS)[1], choices=list(CONFIGS), help="model configuration")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the result as JSON (and .md beside it)")
    args = parser.parse_args(argv)
    wav = (0.05 * np.random.default_rng(0).standard_normal((1, int(args.seconds * 16000)))).astype(np.float32)
    lens = np.ones(1, np.float32)
    result = {
        "config": args.configs,
        "threads": args.threads,
        "audio_seconds": args.seconds,
        "repeats": args.repeats,
        "onnxruntime": ort.__version__,
        "torch_version": torch.__version__,
    }
    with tempfile.TemporaryDirectory() as workdir:
        model, _, onnx_folder = export_config(args.configs, workdir, char_tokenizer(workdir))
        result["spinning_ms"] = spinning(model, onnx_folder, args.threads, wav, lens, args.repeats)
        result["ort"] = {
            p: ort_profile(onnx_folder, p, args.threads, wav, lens, args.repeats, workdir) for p in ("fp32", "int8")
        }
        result["torch"] = torch_profile(model, args.threads, wav, args.repeats)
        result["optimised_nodes"] = {p: optimised_nodes(onnx_folder, p, workdir) for p in ("fp32", "int8")}
        for path in glob.glob(os.path.join(workdir, "ort_*.json")):
            os.remove(path)
    report(result, markdown(result), args.out)


if __name__ == "__main__":
    main()
