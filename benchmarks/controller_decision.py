"""The learned exit controller's decision against the encoder time it follows, PyTorch and the ONNX
runtime side by side in one process (the exit-controller issue allows 2% of the exit's compute).

Run from the repository root::

    python -m benchmarks.controller_decision [--quick] [--out decision_bench.json]

For the default and the paper-size Conformer (random weights,
:func:`benchmarks.timing.build_inference_model`, exported with
:func:`earlyexit_brain.onnx_export.export_onnx_folder`), batch 1, 2 / 10 / 30 s of audio, 2 and 1
threads, every exit where the controller decides (all but the last), timed in rotation:

* PyTorch eager: the time to each exit (``EarlyExitCTCModel.exit_log_probs``) and the
  ``learned`` policy's score there (:class:`earlyexit_brain.policies.LearnedPolicy`, on that
  exit's states and log-probabilities and the previous exit's, as a dynamic run passes them);
* the ONNX runtime (fp32): the time to each exit (``EarlyExitONNX.log_probs_at_exit``) and its
  ``learned`` policy's score (:func:`earlyexit_brain.runtime.policies.make_runtime_policy`);
* each decision is timed right after its engine has computed up to its exit, as in a dynamic
  run (:func:`time_after`: the engine's thread pool is then still awake, which a decision timed
  after another engine's work would not see);
* each decision's share of the segment it follows (the time to its exit minus the time to the
  previous one; the first segment includes the front end, as in the recipes' measurement) and of
  the whole time to its exit.

The controller's weights are random (a decision's cost does not depend on their values): one
logistic regression per exit on the 9 statistics, as the recipes train it, or with ``--states``
on the statistics and the exit's mean encoder state (``controller_reads_states: True``).
"""

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from earlyexit_brain.latency import timed_exits
from earlyexit_brain.policies import LearnedPolicy
from earlyexit_brain.policy_bundle import CONTROLLER_STATISTICS, ControllerWeights
from earlyexit_brain.runtime import EarlyExitONNX
from earlyexit_brain.runtime.policies import make_runtime_policy

from .onnx_runtime import add_latency_arguments, char_tokenizer, export_config, report
from .tables import table
from .timing import CONFIGS, time_in_rotation

CPU = torch.device("cpu")


def random_controller(num_exits: int, hidden_size: int, reads_states: bool = False, seed: int = 0):
    """Logistic-regression weights of the right shape for a model (values random)."""
    rng = np.random.default_rng(seed)
    f = len(CONTROLLER_STATISTICS) + (hidden_size if reads_states else 0)
    exits = [
        {
            "mean": rng.standard_normal(f).tolist(),
            "scale": rng.uniform(0.5, 2.0, f).tolist(),
            "weight": (0.1 * rng.standard_normal(f)).tolist(),
            "bias": 0.0,
        }
        for _ in range(num_exits - 1)
    ]
    return ControllerWeights(
        num_exits=num_exits,
        hidden_size=hidden_size,
        hidden_units=0,
        blank_index=0,
        exits=exits,
        reads_states=reads_states,
    )


def time_after(run, decide, repeats, warmup):
    """Seconds of ``decide()`` each time right after ``run()`` (untimed), ``warmup`` left out."""
    times = []
    for i in range(warmup + repeats):
        run()
        start = time.perf_counter()
        decide()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def bench_decisions(name, model, onnx, threads, seconds, repeats, warmup, reads_states=False):
    """Median ms to each exit and of each decision, PyTorch and the runtime, timed in rotation."""
    torch.set_num_threads(threads)
    runtime = EarlyExitONNX.from_folder(onnx, threads=threads, precision="fp32")
    weights = random_controller(model.num_exits, model.heads.heads[0].in_features, reads_states)
    torch_policy = LearnedPolicy(0.5, weights)
    runtime_policy = make_runtime_policy("learned", 0.5, num_exits=model.num_exits, controller=weights)
    wav = (0.05 * np.random.default_rng(0).standard_normal((1, int(seconds * 16000)))).astype(np.float32)
    tw, tl, lens = torch.from_numpy(wav), torch.ones(1), np.ones(1, np.float32)
    _, log_probs, hiddens = timed_exits(model, tw, tl, keep_hidden=True)
    frames = np.array([log_probs[0].shape[1]])
    host = [(lp.numpy(), h.numpy()) for lp, h in zip(log_probs, hiddens)]
    decisions = range(model.num_exits - 1)
    variants, decide = {}, {}
    for k in decisions:
        previous = log_probs[k - 1] if k else None
        variants[f"torch_to_{k}"] = lambda k=k: model.exit_log_probs(tw, tl, k)
        variants[f"fp32_to_{k}"] = lambda k=k: runtime.log_probs_at_exit(wav, lens, k)
        decide[f"torch_decision_{k}"] = lambda k=k, p=previous: torch_policy.score(
            log_probs[k], tl, exit_index=k, hidden=hiddens[k], previous=p
        )
        decide[f"fp32_decision_{k}"] = lambda k=k: runtime_policy.score(
            k, host[k][0], frames, host[k][1], host[k - 1][0] if k else None
        )
    times = time_in_rotation(variants, repeats, warmup, CPU)
    for key, fn in decide.items():
        times[key] = time_after(variants[key.replace("decision", "to")], fn, repeats, warmup)
    med = {key: 1000 * statistics.median(v) for key, v in times.items()}
    rows = []
    for k in decisions:
        row = {"exit": k + 1, "layer": model.exit_layers[k]}
        for engine in ("torch", "fp32"):
            to_exit = med[f"{engine}_to_{k}"]
            segment = to_exit - (med[f"{engine}_to_{k - 1}"] if k else 0.0)
            decision = med[f"{engine}_decision_{k}"]
            row[engine] = {
                "to_exit_ms": to_exit,
                "segment_ms": segment,
                "decision_ms": decision,
                "share_of_segment": decision / segment if segment > 0 else None,
                "share_to_exit": decision / to_exit,
            }
        rows.append(row)
    return {
        "config": name,
        "threads": threads,
        "audio_seconds": seconds,
        "frames": int(frames[0]),
        "reads_states": reads_states,
        "batch": 1,
        "repeats": repeats,
        "exits": rows,
    }


def markdown(results):
    """One table per configuration, thread count and duration."""
    out = []
    for r in results:

        def pct(v):
            return "n/a" if v is None else f"{100 * v:.2f}%"

        rows = [
            [
                str(e["exit"]),
                str(e["layer"]),
                *(
                    f
                    for engine in ("torch", "fp32")
                    for f in (
                        f"{e[engine]['segment_ms']:.1f}",
                        f"{e[engine]['decision_ms']:.3f}",
                        pct(e[engine]["share_of_segment"]),
                        pct(e[engine]["share_to_exit"]),
                    )
                ),
            ]
            for e in r["exits"]
        ]
        out += table(
            f"{r['config']}, {r['audio_seconds']:g} s ({r['frames']} frames), {r['threads']} threads, batch 1"
            + (", controller reading the states" if r["reads_states"] else ""),
            [
                "exit",
                "layer",
                "PyTorch segment ms",
                "PyTorch decision ms",
                "share of segment",
                "share to exit",
                "runtime segment ms",
                "runtime decision ms",
                "share of segment",
                "share to exit",
            ],
            rows,
            notes=[
                f"exits: median of {r['repeats']} rounds in rotation; decisions: median of {r['repeats']}, "
                "each right after its engine reached the exit; random weights"
            ],
        )
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description="The learned controller's decision time against the encoder's.")
    parser.add_argument("--quick", action="store_true", help="the default model, 2 s, 1 thread, 3 repeats")
    add_latency_arguments(parser, repeats=7)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--states", action="store_true", help="a controller that also reads the mean encoder state")
    parser.add_argument("--out", default=None, help="write the result as JSON (and .md beside it)")
    args = parser.parse_args(argv)
    if args.quick:
        args.configs, args.seconds, args.repeats, args.threads = [list(CONFIGS)[0]], [2.0], 3, [1]
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        tokenizer = char_tokenizer(workdir)
        for name in args.configs:
            model, _, onnx = export_config(name, workdir, tokenizer)
            for threads in args.threads:
                for seconds in args.seconds:
                    r = bench_decisions(name, model, onnx, threads, seconds, args.repeats, args.warmup, args.states)
                    results.append(r)
                    print(markdown([r]), flush=True)
    report({"decisions": results, "torch": torch.__version__}, markdown(results), args.out)


if __name__ == "__main__":
    main()
