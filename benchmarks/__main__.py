"""Side-by-side benchmarks (ratios measured in one run, never timed assertions).

Currently measured:

- ``train-step``: one training step, ``EarlyExitCTCBrain.fit_batch`` itself (waveforms ->
  features -> normalisation -> encoder -> CTC heads -> the YAML's ``MultiExitLoss``,
  backward, clipping, optimiser step), of the early-exit model against the single-exit
  model with the same encoder, on the same batch, alternating the two models
  so that machine noise hits both alike. Reports the median, min and max of
  each and the ratio of medians, for the default synthetic configuration and
  for the paper-size encoder (12 layers, d_model 256, exits every 2 layers), and
  each model's peak memory (GPU: peak allocated; CPU: peak resident memory of 3 steps
  of the first variant in a fresh process, minus its memory before the model was built).
  The step is ``ctc_stacked_fused`` unless ``--variants`` says otherwise: the synthetic
  recipes' step (one CTC call for all exits, fused AdamW).
- ``inference``: batch-1 latency from the waveform to each exit (2, 10 and 30 s of audio)
  against the proportional ideal computed from the same run (front end + k/N
  of the encoder's time), the speed-up of each exit over the full model, and
  the overhead of dynamic inference over the fixed-exit-k path, with the fixed
  policy (``forced``) and with a policy that scores every exit it reaches as the
  entropy policy does and stops at exit k (``scored``). All variants are timed in
  rotation, so noise hits them alike.

Usage::

    python -m benchmarks [--quick] [--out bench.json] [--threads 2]
                         [--only train-step,inference,throughput,compute,frontend,ddp]
                         [--device cuda] [--bf16]
                         [--variants base,ctc_stacked,...|all] [--profile base,...]

- ``--variants``: train-step variants run side by side, each for both models
  (``TRAIN_VARIANTS``: the loss's per-exit or one-call CTC, batched heads, fused AdamW,
  bf16, cuDNN's CTC, CUDA graphs); before timing, each variant's first-step
  loss and gradients are compared with ``base``. ``--profile`` runs torch.profiler on the
  paper-size cases of the listed variants (per-step kernel time, CPU time, stream
  synchronisations, launches, top kernels). On a GPU the train-step cases add the
  paper's batch, 32 x 10 s with a 256-token vocabulary, and 32 x 15 s (about the 500 s
  of audio per batch of the LibriSpeech and TED-LIUM YAMLs).

- ``throughput``: audio seconds per second at every exit for a batch of 16.
- ``compute``: parameters and multiply-accumulates to every exit
  (torch.utils.flop_counter), to compare measured time with the compute bound.
- ``frontend``: the convolutional front end (features -> ``(B, T', F', C)``) computed by
  SpeechBrain's ``ConvolutionFrontEnd.forward`` and by the encoder's own channels-last
  forward (``ChannelsLastFrontEnd``, same parameters), side by side: a training pass
  (forward and backward) on the train-step batch and batch-1 inference on 10 s, with the
  ratio of medians and the largest difference between the two outputs.
- ``ddp``: training throughput of the smoke recipe with 1 process (2 threads) and
  2 processes (1 thread each, gloo), CPU only; on 2 cores expect little gain.
  ``--quick`` skips it unless ``--only ddp`` asks for it.

``bench.json`` holds every figure; ``bench.md`` beside it the tables.
"""

import argparse
import json
import os
import tempfile

import torch

from earlyexit_brain.config import ConfigError, check_device
from earlyexit_brain.files import NotOurFolderError, check_overwritable_file, is_own_json

from .compute import bench_compute
from .ddp import bench_ddp
from .frontend import bench_frontend
from .inference import bench_inference, bench_throughput, print_inference
from .tables import fmt_ms, is_own_markdown, markdown
from .timing import CONFIGS, machine_description
from .train_step import CUDA_ONLY_VARIANTS, DEFAULT_VARIANT, TRAIN_VARIANTS, run_train_step, train_cases

SECTIONS = ("train-step", "inference", "throughput", "compute", "frontend", "ddp")


def parse_list(text, choices, what):
    """A comma-separated list of names from ``choices`` ('all': every one)."""
    names = list(choices) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in choices]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; accepted: {', '.join(choices)} or all")
    return names


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller batches")
    parser.add_argument(
        "--out", default="bench.json", help="where to write the JSON results (the tables go beside it, .md)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    parser.add_argument("--only", help="run these sections only (comma-separated: " + ", ".join(SECTIONS) + ")")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for inference")
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANT,
        help="train-step variants to run side by side (comma-separated, or 'all'; "
        "CPU peak memory is measured for the first): "
        + ", ".join(TRAIN_VARIANTS)
        + f"; default {DEFAULT_VARIANT}, the step the synthetic recipes take",
    )
    parser.add_argument(
        "--profile", default="", help="train-step variants to profile with torch.profiler (paper-size cases)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="train-step repeats (default 30, quick 6)")
    parser.add_argument(
        "--train-seconds",
        type=float,
        default=None,
        help="seconds per utterance of the train-step cases (default 3; cuda adds 32 x 10 s)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        device = torch.device(check_device(args.device))
    except ConfigError as err:
        raise SystemExit(f"Error: {err}") from None
    quick = args.quick
    repeats, warmup = (6, 2) if quick else (30, 3)
    if args.repeats is not None:
        repeats = args.repeats
    variants = parse_list(args.variants, TRAIN_VARIANTS, "variants")
    if device.type != "cuda":
        variants = [v for v in variants if v not in CUDA_ONLY_VARIANTS]
    profile = parse_list(args.profile, variants, "profiled variants") if args.profile else []
    output = {"machine": machine_description(device), "quick": quick}
    run = parse_list(args.only, SECTIONS, "sections") if args.only else list(SECTIONS)
    md_path = os.path.splitext(args.out)[0] + ".md"
    try:  # overwrite only results this command wrote
        check_overwritable_file(args.out, "--out", lambda p: is_own_json(p, "machine"))
        check_overwritable_file(md_path, "--out", is_own_markdown)
    except NotOurFolderError as err:
        raise SystemExit(f"Error: {err}") from None
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():
        with open(args.out, "w") as fout:
            json.dump(output, fout, indent=2)
        with open(md_path, "w") as fout:
            fout.write(markdown(output))

    if "train-step" in run:
        if len(variants) > 1:
            output["train_step_variants"] = {v: TRAIN_VARIANTS[v] for v in variants}
        run_train_step(quick, repeats, warmup, device, variants, profile, args.train_seconds, save, output)
    if "inference" in run:
        output["inference"] = []
        for name in CONFIGS:
            for seconds in (2.0, 10.0, 30.0):
                reps = (5 if quick else 20) if seconds < 30 else (3 if quick else 8)
                res = bench_inference(name, seconds, reps, 2 if quick else 3, device, args.bf16, forced=seconds == 10.0)
                print_inference(res)
                output["inference"].append(res)
                save()
    if "throughput" in run:
        output["throughput"] = []
        for name in CONFIGS:
            res = bench_throughput(name, 16, 4.0, 2 if quick else 5, 1, device, args.bf16)
            print(
                f"throughput, {name}, batch 16 x 4 s: "
                + ", ".join(f"exit {e['exit']} {e['audio_seconds_per_second']:.0f} s/s" for e in res["exits"]),
                flush=True,
            )
            output["throughput"].append(res)
            save()
    if "compute" in run:
        output["compute"] = [bench_compute(name) for name in CONFIGS]
        for res in output["compute"]:
            print(
                f"compute, {res['config']}, 10 s: "
                + ", ".join(
                    f"exit {e['exit']} {e['params'] / 1e6:.2f} M params {e['gmacs']:.2f} GMACs" for e in res["exits"]
                ),
                flush=True,
            )
    if "frontend" in run:
        output["frontend"] = []
        for name, batch, secs, _, _ in train_cases(quick, device)[: len(CONFIGS)]:
            res = bench_frontend(name, batch, secs, 5 if quick else 20, 2 if quick else 3, device)
            for p in res["passes"]:
                print(
                    f"front end, {name}, {p['pass']} {p['batch']} x {p['audio_seconds']:g} s: SpeechBrain "
                    f"{fmt_ms(p['speechbrain'])} ms, channels-last {fmt_ms(p['channels_last'])} ms, ratio "
                    f"{p['ratio']:.3f} (pairwise {p['ratio_pairwise_median']:.3f}), largest output "
                    f"difference {p['max_abs_diff']:.1e}",
                    flush=True,
                )
            output["frontend"].append(res)
            save()
    if "ddp" in run and device.type == "cpu" and ("ddp" in (args.only or "") or not quick):
        with tempfile.TemporaryDirectory(prefix="bench-ddp-") as workdir:
            output["ddp"] = bench_ddp(2 if quick else 4, workdir)
        runs = output["ddp"]["runs"]
        print(
            f"ddp, smoke recipe: 1 process {runs[0]['utterances_per_second']:.1f} utt/s, "
            f"2 processes {runs[1]['utterances_per_second']:.1f} utt/s, speed-up "
            f"{output['ddp']['speedup']:.2f}x",
            flush=True,
        )
    save()
    print(f"Results written to {args.out} and {md_path}")


if __name__ == "__main__":
    main()
