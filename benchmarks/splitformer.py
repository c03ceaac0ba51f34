"""Splitformer against the early-exit Conformer, side by side in one process.

``python -m benchmarks.splitformer [--config NAME] [--seconds 10] [--out FILE.json]`` (from the
repository root). Both models are built with random weights from the same configuration of
:data:`benchmarks.timing.CONFIGS` (the Splitformer with its defaults: a branch beside the blocks of
the first and the last exit, 2x downsampling, one layer) and timed in rotation
(:func:`benchmarks.timing.time_in_rotation`), so that machine noise hits them alike:

- a training step on the same batch: features, normalisation, encoder, every exit's head, the sum of
  the exits' CTC losses (SpeechBrain's ``ctc_loss``), backward, gradient clipping and a fused AdamW
  step, in training mode;
- the batch-1 latency to each exit for ``seconds`` of audio (``exit_log_probs``: features, the layers
  up to the exit, the Splitformer's branches below it, the head);
- each branch alone at batch 1 on its block's input for the same audio (what the branches add).
"""

import argparse
import functools
import json
import statistics

import torch
from speechbrain.nnet.losses import ctc_loss

from earlyexit_brain.models.exits import CTCExitHeads
from earlyexit_brain.models.pipeline import EarlyExitCTCModel
from earlyexit_brain.models.splitformer import SplitformerEncoder

from .timing import CONFIGS, build_inference_model, machine_description, stats, time_in_rotation

SAMPLE_RATE = 16000


def build_pair(name, device, vocab=32):
    """``{"conformer": model, "splitformer": model}``: random-weight :class:`EarlyExitCTCModel`\\ s of
    configuration ``name``, the Splitformer with the same trunk configuration and the same features."""
    conformer = build_inference_model(name, device, vocab)
    enc_kwargs, ee_layers, _ = CONFIGS[name]
    torch.manual_seed(0)
    encoder = SplitformerEncoder(input_size=80, exit_layers=ee_layers, dropout=0.0, **enc_kwargs)
    heads = CTCExitHeads(enc_kwargs["d_model"], vocab, len(ee_layers))
    split = EarlyExitCTCModel(conformer.compute_features, conformer.normalize, encoder, heads)
    return {"conformer": conformer, "splitformer": split.eval().to(device)}


def train_step_fn(model, wavs, lens, tokens, token_lens):
    """One training step of ``model`` on the batch (see the module's docstring); returns a function."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)

    def step():
        model.train()
        feats = model.features(wavs, lens)
        hiddens = model.encoder(feats, lens)
        loss = sum(ctc_loss(model.heads.forward_exit(k, h), tokens, lens, token_lens, 0) for k, h in enumerate(hiddens))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return float(loss.detach())

    return step


def branch_inputs(split, wav, lens):
    """The input ``(1, T', D)`` and valid frames of each Splitformer branch for ``wav`` (captured by hooks)."""
    captured = {}
    hooks = [
        branch.register_forward_pre_hook(lambda module, args, i=i: captured.__setitem__(i, args))
        for i, branch in enumerate(split.encoder.branches)
    ]
    with torch.no_grad():
        split.exit_log_probs(wav, lens, split.num_exits - 1)
    for hook in hooks:
        hook.remove()
    return [captured[i] for i in range(len(split.encoder.branches))]


def bench_splitformer(
    name="default (6 layers, d 144)",
    seconds=10.0,
    train_batch=8,
    train_seconds=3.0,
    repeats=10,
    warmup=2,
    device=torch.device("cpu"),
    vocab=32,
):
    """Training-step time, batch-1 latency per exit and the branches' time, both models side by side.

    Returns a dictionary with ``train_step`` (median ms of each model and their ratio, Splitformer over
    Conformer), ``exits`` (per exit: median ms of each model to that exit and the difference) and
    ``branches`` (per branch: its exit and median ms alone).
    """
    models = build_pair(name, device, vocab)
    gen = torch.Generator().manual_seed(1)
    wavs = (0.05 * torch.randn(train_batch, int(train_seconds * SAMPLE_RATE), generator=gen)).to(device)
    lens = torch.linspace(0.7, 1.0, train_batch, device=device)  # padded, as a real batch
    tokens = torch.randint(1, vocab, (train_batch, int(train_seconds * 12)), generator=gen).to(device)
    token_lens = torch.ones(train_batch, device=device)
    steps = {key: train_step_fn(m, wavs, lens, tokens, token_lens) for key, m in models.items()}
    train_times = time_in_rotation(steps, repeats, warmup, device)
    for m in models.values():
        m.eval()
    wav = (0.05 * torch.randn(1, int(seconds * SAMPLE_RATE), generator=gen)).to(device)
    one = torch.ones(1, device=device)
    split = models["splitformer"]
    inputs = branch_inputs(split, wav, one)
    variants = {}
    for key, m in models.items():
        for k in range(m.num_exits):
            variants[f"{key}_{k + 1}"] = functools.partial(m.exit_log_probs, wav, one, k)
    for i, branch in enumerate(split.encoder.branches):
        variants[f"branch_{i}"] = functools.partial(branch, *inputs[i])
    with torch.no_grad():
        times = time_in_rotation(variants, repeats, warmup, device)
    med = {key: 1000 * statistics.median(v) for key, v in times.items()}
    conformer_ms = 1000 * statistics.median(train_times["conformer"])
    split_ms = 1000 * statistics.median(train_times["splitformer"])
    exits = [
        {
            "exit": k + 1,
            "layer": layer,
            "splitformer_compute_layers": split.exit_compute_layers[k],
            "conformer_ms": round(med[f"conformer_{k + 1}"], 2),
            "splitformer_ms": round(med[f"splitformer_{k + 1}"], 2),
            "added_ms": round(med[f"splitformer_{k + 1}"] - med[f"conformer_{k + 1}"], 2),
        }
        for k, layer in enumerate(split.exit_layers)
    ]
    branches = [
        {"exit": e, "frames": int(inputs[i][0].shape[1]), "ms": round(med[f"branch_{i}"], 2)}
        for i, e in enumerate(split.encoder.branch_exits)
    ]
    return {
        "config": name,
        "machine": machine_description(device),
        "repeats": repeats,
        "warmup": warmup,
        "train_step": {
            "batch": train_batch,
            "seconds": train_seconds,
            "conformer": stats(train_times["conformer"]),
            "splitformer": stats(train_times["splitformer"]),
            "ratio": round(split_ms / conformer_ms, 3),
        },
        "latency_seconds": seconds,
        "exits": exits,
        "branches": branches,
        "params": {
            key: [m.encoder.params_to_exit(k) + m.heads.params_of_exit(k) for k in range(m.num_exits)]
            for key, m in models.items()
        },
    }


def markdown(result):
    """The result as Markdown tables."""
    ts = result["train_step"]
    lines = [
        f"Splitformer against the early-exit Conformer, {result['config']}; {result['machine']}; "
        f"median of {result['repeats']} in rotation.",
        "",
        f"Training step (batch {ts['batch']} x {ts['seconds']:g} s): Conformer "
        f"{ts['conformer']['median_ms']:.0f} ms, Splitformer {ts['splitformer']['median_ms']:.0f} ms, "
        f"ratio {ts['ratio']:.3f}.",
        "",
        "| exit | layer | Splitformer layers counted | Conformer ms | Splitformer ms | added ms |",
        "|---|---|---|---|---|---|",
    ]
    for e in result["exits"]:
        lines.append(
            f"| {e['exit']} | {e['layer']} | {e['splitformer_compute_layers']} | {e['conformer_ms']:.1f} | "
            f"{e['splitformer_ms']:.1f} | {e['added_ms']:+.1f} |"
        )
    lines += [
        "",
        f"Batch-1 latency to each exit, {result['latency_seconds']:g} s of audio. Branches alone: "
        + ", ".join(f"exit {b['exit']} {b['ms']:.1f} ms ({b['frames']} frames in)" for b in result["branches"])
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="default (6 layers, d 144)", choices=list(CONFIGS))
    parser.add_argument("--seconds", type=float, default=10.0, help="audio for the batch-1 latency")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="also write the result as JSON here")
    args = parser.parse_args(argv)
    result = bench_splitformer(
        args.config, args.seconds, repeats=args.repeats, warmup=args.warmup, device=torch.device(args.device)
    )
    if args.out:
        with open(args.out, "w") as fout:
            json.dump(result, fout, indent=2)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
