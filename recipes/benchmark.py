#!/usr/bin/env python3
"""Side-by-side benchmarks (ratios measured in one run, never timed assertions).

Currently measured:

- ``train-step``: one training step (features -> encoder -> CTC heads -> loss,
  backward, optimiser step) of the early-exit model against the single-exit
  model with the same encoder, on the same batch, alternating the two models
  so that machine noise hits both alike. Reports the median, min and max of
  each and the ratio of medians, for the default synthetic configuration and
  for the paper-size encoder (12 layers, d_model 256, exits every 2 layers).

Usage::

    python recipes/benchmark.py [--quick] [--out bench.json]
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from earlyexit_brain.models.conformer import CTCExitHeads, EarlyExitConformerEncoder  # noqa: E402

CONFIGS = {
    # name: (encoder kwargs, early-exit layers, single-exit layers)
    "default (6 layers, d 144)": (dict(num_layers=6, d_model=144, nhead=4, d_ffn=576,
                                       kernel_size=15), [2, 4, 6], [6]),
    "paper size (12 layers, d 256)": (dict(num_layers=12, d_model=256, nhead=8, d_ffn=2048,
                                           kernel_size=31), [2, 4, 6, 8, 10, 12], [12]),
}


def build(enc_kwargs, exit_layers, vocab, seed=0):
    torch.manual_seed(seed)
    enc = EarlyExitConformerEncoder(input_size=80, exit_layers=exit_layers, **enc_kwargs)
    heads = CTCExitHeads(enc_kwargs["d_model"], vocab, len(exit_layers))
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


def bench_train_step(name, batch, seconds, repeats, warmup, vocab=32):
    enc_kwargs, ee_layers, single_layers = CONFIGS[name]
    models = {"early_exit": build(enc_kwargs, ee_layers, vocab),
              "single_exit": build(enc_kwargs, single_layers, vocab)}
    frames = int(seconds * 100)
    torch.manual_seed(1)
    feats = torch.randn(batch, frames, 80)
    lens = torch.ones(batch)
    tokens = torch.randint(1, vocab, (batch, int(seconds * 12)))
    token_lens = torch.full((batch,), tokens.shape[1], dtype=torch.long)
    times = {k: [] for k in models}
    for i in range(warmup + repeats):
        for key in (("early_exit", "single_exit") if i % 2 == 0 else ("single_exit", "early_exit")):
            start = time.perf_counter()
            train_step(models[key], feats, lens, tokens, token_lens)
            if i >= warmup:
                times[key].append(time.perf_counter() - start)
    result = {"config": name, "batch": batch, "seconds_per_utterance": seconds,
              "threads": torch.get_num_threads(), "repeats": repeats}
    for key, values in times.items():
        result[key] = {"median_s": statistics.median(values), "min_s": min(values),
                       "max_s": max(values)}
    result["ratio"] = result["early_exit"]["median_s"] / result["single_exit"]["median_s"]
    pair = [a / b for a, b in zip(times["early_exit"], times["single_exit"])]
    result["ratio_pairwise_median"] = statistics.median(pair)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller batches")
    parser.add_argument("--out", default="bench.json", help="where to write the JSON results")
    args = parser.parse_args(argv)
    repeats, warmup = (6, 2) if args.quick else (30, 3)
    results = []
    for name in CONFIGS:
        batch = 8 if "paper" in name else 16
        if args.quick:
            batch //= 2
        res = bench_train_step(name, batch=batch, seconds=3.0, repeats=repeats, warmup=warmup)
        results.append(res)
        print(f"train step, {name}, batch {res['batch']} x {res['seconds_per_utterance']} s, "
              f"{res['threads']} threads: early-exit {res['early_exit']['median_s']:.3f} s "
              f"[{res['early_exit']['min_s']:.3f}-{res['early_exit']['max_s']:.3f}], "
              f"single-exit {res['single_exit']['median_s']:.3f} s "
              f"[{res['single_exit']['min_s']:.3f}-{res['single_exit']['max_s']:.3f}], "
              f"ratio {res['ratio']:.3f} (pairwise median {res['ratio_pairwise_median']:.3f})",
              flush=True)
    with open(args.out, "w") as fout:
        json.dump({"train_step": results}, fout, indent=2)
    print(f"Results written to {args.out}")


if __name__ == "__main__":
    main()
