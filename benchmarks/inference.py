"""The ``inference``, ``throughput`` sections: batch-1 latency to each exit against the proportional ideal,
the overhead of dynamic (policy-driven) inference, and batch throughput per exit."""

import statistics

import torch

from earlyexit_brain.dynamic import run_model
from earlyexit_brain.policies import EntropyPolicy, FixedExit

from .tables import fmt_ms, over_fixed
from .timing import autocast, build_inference_model, stats, time_in_rotation, timed


class ScoredFixedExit(FixedExit):
    """Stops at exit ``exit_index`` as :class:`FixedExit` does, but decides at every exit it
    reaches after scoring it as the entropy policy does (norm, head, score, its copy to the
    host): the cost of a confidence policy's decisions with the depth held fixed."""

    def __init__(self, exit_index):
        super().__init__(exit_index)
        self.scorer = EntropyPolicy(threshold=0.5)

    def planned_exits(self, batch, durations, num_exits):
        return None  # no plan: run_dynamic asks at every exit, as with a confidence policy

    def __call__(self, exit_index, log_probs, lengths, durations=None):
        self.scorer(exit_index, log_probs, lengths, durations)
        return super().__call__(exit_index, log_probs, lengths, durations)


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
            variants[f"forced_{k + 1}"] = lambda k=k: run_model(model, wav, lens, FixedExit(k))
            variants[f"scored_{k + 1}"] = lambda k=k: run_model(model, wav, lens, ScoredFixedExit(k))
    with autocast(device, bf16):
        times = time_in_rotation(variants, repeats, warmup, device)
    med = {k: statistics.median(v) for k, v in times.items()}
    full, front_t = med[f"fixed_{num_exits}"], med["front_end"]
    exits = []
    for k, layer in enumerate(ee_layers, start=1):
        ideal = front_t + layer / depth * (full - front_t)
        entry = {
            "exit": k,
            "layer": layer,
            "fixed": stats(times[f"fixed_{k}"]),
            "ideal_ms": 1000 * ideal,
            "ratio_to_ideal": med[f"fixed_{k}"] / ideal,
            "speedup_vs_full": full / med[f"fixed_{k}"],
            "real_time_factor": med[f"fixed_{k}"] / seconds,
        }
        for kind in ("forced", "scored") if forced else ():
            pair = [a / b for a, b in zip(times[f"{kind}_{k}"], times[f"fixed_{k}"])]
            entry.update(
                {
                    f"{kind}_policy": stats(times[f"{kind}_{k}"]),
                    f"{kind}_over_fixed": med[f"{kind}_{k}"] / med[f"fixed_{k}"],
                    f"{kind}_over_fixed_pairwise": statistics.median(pair),
                }
            )
        exits.append(entry)
    return {
        "config": name,
        "audio_seconds": seconds,
        "batch": 1,
        "device": str(device),
        "bf16": bf16,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "front_end": stats(times["front_end"]),
        "exits": exits,
    }


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
                t = timed(lambda k=k: model.exit_log_probs(wav, lens, k), device)
                if i >= warmup:
                    times.append(t)
            med = statistics.median(times)
            rows.append(
                {"exit": k + 1, "layer": layer, **stats(times), "audio_seconds_per_second": batch * seconds / med}
            )
    return {
        "config": name,
        "batch": batch,
        "audio_seconds": seconds,
        "device": str(device),
        "bf16": bf16,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "exits": rows,
    }


def print_inference(res):
    print(
        f"inference, {res['config']}, batch 1 x {res['audio_seconds']} s, {res['device']}, "
        f"{res['threads']} threads{', bf16' if res['bf16'] else ''}: front end "
        f"{res['front_end']['median_ms']:.1f} ms"
    )
    print("  exit layer  fixed ms [min-max]      ideal ms  ratio  speed-up  RTF     forced/fixed   scored/fixed")
    for e in res["exits"]:
        print(
            f"  {e['exit']:4d} {e['layer']:5d}  {fmt_ms(e['fixed']):>22s}  {e['ideal_ms']:8.1f}  "
            f"{e['ratio_to_ideal']:.3f}  {e['speedup_vs_full']:7.2f}x  "
            f"{e['real_time_factor']:.4f}  {over_fixed(e, 'forced'):14s} {over_fixed(e, 'scored')}",
            flush=True,
        )
