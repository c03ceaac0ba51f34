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

    python recipes/benchmark.py [--quick] [--out bench.json] [--threads 2]
                                [--only train-step,inference,throughput,compute,frontend,ddp]
                                [--device cuda] [--bf16]
                                [--variants base,ctc_stacked,...|all] [--profile base,...]

- ``--variants``: train-step variants run side by side, each for both models
  (``TRAIN_VARIANTS``: per-exit or one-call CTC, lengths on the CPU, batched heads,
  fused AdamW, bf16, cuDNN's CTC, CUDA graphs); before timing, each variant's first-step
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
import statistics
import sys
import time

import torch
from speechbrain.lobes.models.convolution import ConvolutionFrontEnd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from earlyexit_brain.config import ConfigError, check_device  # noqa: E402
from earlyexit_brain.policies import EntropyPolicy, FixedExit  # noqa: E402
from earlyexit_brain.files import NotOurFolderError, check_overwritable_file, is_own_json  # noqa: E402
from earlyexit_brain.losses import stacked_ctc_losses  # noqa: E402
from earlyexit_brain.models.conformer import CTCExitHeads, EarlyExitConformerEncoder  # noqa: E402
from earlyexit_brain.models.pipeline import EarlyExitCTCModel  # noqa: E402
from earlyexit_brain.utils import rss_bytes  # noqa: E402
from earlyexit_brain.dynamic import run_model  # noqa: E402

SECTIONS = ("train-step", "inference", "throughput", "compute", "frontend", "ddp")

CONFIGS = {
    # name: (encoder kwargs, early-exit layers, single-exit layers)
    "default (6 layers, d 144)": (dict(num_layers=6, d_model=144, nhead=4, d_ffn=576,
                                       kernel_size=15, frontend_channels=(32, 32)), [2, 4, 6], [6]),
    "paper size (12 layers, d 256)": (dict(num_layers=12, d_model=256, nhead=8, d_ffn=2048,
                                           kernel_size=31), [2, 4, 6, 8, 10, 12], [12]),
}


def build(enc_kwargs, exit_layers, vocab, seed=0, device=torch.device("cpu"), fused=False, dropout=None):
    torch.manual_seed(seed)
    extra = {} if dropout is None else {"dropout": dropout}
    enc = EarlyExitConformerEncoder(input_size=80, exit_layers=exit_layers, **enc_kwargs, **extra).to(device)
    heads = CTCExitHeads(enc_kwargs["d_model"], vocab, len(exit_layers)).to(device)
    params = list(enc.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if fused else {}))
    return enc, heads, opt


def ctc_per_exit(log_probs, tokens, lens, token_lens):
    """One mean-reduced CTC loss per exit; ``lens`` relative, ``token_lens`` integer (either device)."""
    return [torch.nn.functional.ctc_loss(
        lp.transpose(0, 1), tokens, (lens * lp.shape[1]).round().int(), token_lens,
        blank=0, zero_infinity=True) for lp in log_probs]


def optimiser_step(opt, loss):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()


def train_step(model, feats, lens, tokens, token_lens):
    """The reference step (variant ``base``): per-exit heads and CTC calls, lengths on the device."""
    enc, heads, opt = model
    loss = sum(ctc_per_exit(heads(enc(feats, lens)), tokens, lens, token_lens))
    optimiser_step(opt, loss)
    return loss.detach()


# Variants of the training step, each run for both models (``--variants``). All compute
# the same loss and gradients as ``base`` up to float rounding (``check_train_variants``).
TRAIN_VARIANTS = {
    "base": "per-exit heads and CTC calls, integer lengths made on the device (the reference)",
    "cpu_lengths": "as base, the integer lengths made on the CPU (no device-to-host copy in each CTC call)",
    "ctc_stacked": "per-exit heads as in base; every exit's CTC from one call (the library's "
                   "stacked_ctc_losses, as EarlyExitCTCBrain now trains: relative lengths copied to the CPU once)",
    "stacked": "the exits' LayerNorms and heads as one batched op each (baddbmm, one log-softmax), "
               "one CTC call for all exits (reduction 'none', lengths on the CPU)",
    "ctc_stacked_fused": "ctc_stacked with fused AdamW: the step EarlyExitCTCBrain takes with the "
                         "synthetic recipes (fused: True under opt_class)",
    "stacked_fused": "stacked, with fused AdamW",
    "stacked_bf16": "stacked under bf16 autocast (log-softmax and CTC in fp32)",
    "stacked_cudnn": "stacked with cuDNN's CTC (int32 targets on the CPU; cuDNN needs every input "
                     "length equal to T, so padded batches cannot use it)",
    "graphed": "stacked with fused AdamW; forward and backward of encoder + heads captured as CUDA "
               "graphs (torch.cuda.make_graphed_callables), CTC and optimiser eager; CUDA only",
}
VARIANT_OPTIONS = {
    "base": {}, "cpu_lengths": {"cpu_lengths": True}, "ctc_stacked": {"ctc_stacked": True},
    "stacked": {"stacked": True}, "ctc_stacked_fused": {"ctc_stacked": True, "fused": True},
    "stacked_fused": {"stacked": True, "fused": True}, "stacked_bf16": {"stacked": True, "bf16": True},
    "stacked_cudnn": {"stacked": True, "cudnn": True},
    "graphed": {"stacked": True, "fused": True, "graphed": True},
}
# left out on the CPU: graphed needs CUDA; bf16 without the CPU's bf16 units is emulated (very slow)
CUDA_ONLY_VARIANTS = {"graphed", "stacked_bf16"}
DEFAULT_VARIANT = "ctc_stacked_fused"  # the step the synthetic recipes take


def make_train_batch(batch, seconds, vocab, device, tokens_per_second=12):
    """Random features and targets, on ``device`` and (lengths, targets) also on the CPU."""
    torch.manual_seed(1)
    feats = torch.randn(batch, int(seconds * 100), 80)
    tokens = torch.randint(1, vocab, (batch, int(seconds * tokens_per_second)))
    token_lens = torch.full((batch,), tokens.shape[1], dtype=torch.long)
    lens = torch.ones(batch)
    return {"feats": feats.to(device), "lens": lens.to(device), "tokens": tokens.to(device),
            "token_lens": token_lens.to(device), "token_lens_rel": (token_lens / tokens.shape[1]).to(device),
            "lens_cpu": lens, "token_lens_cpu": token_lens,
            # cuDNN's CTC: the targets concatenated, int32, on the CPU
            "targets_cat_cpu": torch.cat([t[:n] for t, n in zip(tokens, token_lens)]).int()}


def stacked_log_probs(enc, heads, feats, lens):
    """``(E, B, T', V)`` log-probabilities of every exit, the exits' LayerNorms and heads as one op each.

    The same function as ``torch.stack(heads(enc(feats, lens)))`` up to float rounding.
    """
    state = enc.start(feats, lens)
    x, done, raw = state.x, 0, []
    for layer_no in enc.exit_layers:
        for layer in enc.layers[done:layer_no]:
            x, _ = layer(x, src_mask=state.src_mask, src_key_padding_mask=state.key_padding_mask,
                         pos_embs=state.pos_embs)
        done = layer_no
        raw.append(x)
    norms = [n.norm for n in enc.exit_norms]
    h = torch.nn.functional.layer_norm(torch.stack(raw), norms[0].normalized_shape, eps=norms[0].eps)
    h = torch.addcmul(torch.stack([n.bias for n in norms])[:, None, None],
                      h, torch.stack([n.weight for n in norms])[:, None, None])
    e, b, t, d = h.shape
    weight = torch.stack([lin.weight for lin in heads.heads])  # (E, V, D)
    bias = torch.stack([lin.bias for lin in heads.heads])  # (E, V)
    logits = torch.baddbmm(bias[:, None], h.reshape(e, b * t, d), weight.transpose(1, 2))
    return torch.log_softmax(logits, dim=-1).view(e, b, t, -1)


class StackedExits(torch.nn.Module):
    """``stacked_log_probs`` as a module (what ``graphed`` captures)."""

    def __init__(self, enc, heads):
        super().__init__()
        self.enc, self.heads = enc, heads

    def forward(self, feats, lens):
        return stacked_log_probs(self.enc, self.heads, feats, lens)


def ctc_stacked(log_probs, data, cudnn=False):
    """Each exit's mean CTC loss ``(E,)`` from ONE CTC call over ``(E, B, T, V)`` log-probabilities.

    Lengths go in as CPU tensors; the per-utterance losses are divided by the target
    lengths and averaged per exit, as ``reduction='mean'`` does.
    """
    e, b, t, v = log_probs.shape
    lp = log_probs.reshape(e * b, t, v).transpose(0, 1)
    in_lens = (data["lens_cpu"] * t).round().int().repeat(e)
    if cudnn:
        lp, targets = lp.contiguous(), data["targets_cat_cpu"].repeat(e)
        tok_lens = data["token_lens_cpu"].int().repeat(e)
    else:
        targets, tok_lens = data["tokens"].repeat(e, 1), data["token_lens_cpu"].repeat(e)
    losses = torch.nn.functional.ctc_loss(lp, targets, in_lens, tok_lens, blank=0,
                                          reduction="none", zero_infinity=True)
    return (losses / data["token_lens"].clamp_min(1).repeat(e)).view(e, b).mean(1)


def make_train_step(model, variant, data, device):
    """A closure running one training step of ``model`` on ``data`` in ``variant``; returns the loss."""
    enc, heads, opt = model
    opts = VARIANT_OPTIONS[variant]
    if variant == "base":
        return lambda: train_step(model, data["feats"], data["lens"], data["tokens"], data["token_lens"])
    forward = None
    if opts.get("stacked"):
        forward = StackedExits(enc, heads)
        if opts.get("graphed"):
            if device.type != "cuda":
                raise ValueError("the graphed variant needs a CUDA device")
            forward = torch.cuda.make_graphed_callables(forward, (data["feats"], data["lens"]))

    def step():
        with autocast(device, opts.get("bf16", False)):
            if forward is not None:
                loss = ctc_stacked(forward(data["feats"], data["lens"]), data, opts.get("cudnn", False)).sum()
            elif opts.get("ctc_stacked"):
                loss = sum(stacked_ctc_losses(heads(enc(data["feats"], data["lens"])), data["tokens"],
                                              data["lens"], data["token_lens_rel"], 0))
            else:  # cpu_lengths
                loss = sum(ctc_per_exit(heads(enc(data["feats"], data["lens"])), data["tokens"],
                                        data["lens_cpu"], data["token_lens_cpu"]))
        optimiser_step(opt, loss)
        return loss.detach()
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def time_in_rotation(variants, repeats, warmup, device):
    """Seconds of each call of every callable in ``variants``, ``warmup`` rounds left out;
    the order rotates from round to round, so that machine noise hits them alike."""
    names = list(variants)
    times = {key: [] for key in names}
    for i in range(warmup + repeats):
        for key in names[i % len(names):] + names[: i % len(names)]:
            t = timed(variants[key], device)
            if i >= warmup:
                times[key].append(t)
    return times


def bench_train_step(name, batch, seconds, repeats, warmup, vocab=32, device=torch.device("cpu"),
                     variant="base", tokens_per_second=12, memory=True):
    enc_kwargs, ee_layers, single_layers = CONFIGS[name]
    fused = VARIANT_OPTIONS[variant].get("fused", False)
    data = make_train_batch(batch, seconds, vocab, device, tokens_per_second)
    steps = {key: make_train_step(build(enc_kwargs, layers, vocab, device=device, fused=fused),
                                  variant, data, device)
             for key, layers in (("early_exit", ee_layers), ("single_exit", single_layers))}
    times = time_in_rotation(steps, repeats, warmup, device)
    result = {"config": name, "variant": variant, "batch": batch, "seconds_per_utterance": seconds,
              "vocab": vocab, "tokens_per_utterance": data["tokens"].shape[1],
              "threads": torch.get_num_threads(), "repeats": repeats, "device": str(device)}
    if device.type == "cpu" and memory:
        for key in steps:  # each model alone in a fresh process
            result[f"peak_memory_gb_{key}"] = cpu_peak_memory_gb(name, key, batch, seconds, vocab, variant)
    if device.type == "cuda":
        for key in steps:  # one more step each, peak memory measured alone
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            steps[key]()
            torch.cuda.synchronize()
            result[f"peak_memory_gb_{key}"] = torch.cuda.max_memory_allocated() / 2**30
    for key, values in times.items():
        result[key] = {"median_s": statistics.median(values), "min_s": min(values),
                       "max_s": max(values)}
    result["ratio"] = result["early_exit"]["median_s"] / result["single_exit"]["median_s"]
    pair = [a / b for a, b in zip(times["early_exit"], times["single_exit"])]
    result["ratio_pairwise_median"] = statistics.median(pair)
    return result


def check_train_variants(name, variants, batch, seconds, vocab=32, device=torch.device("cpu"),
                         tokens_per_second=12):
    """Loss and gradients of each variant's first step against ``base`` (same weights, dropout 0).

    Returns ``{variant: {"loss_rel_diff", "grad_rel_diff"}}``; the gradient figure is the
    largest ``|g - g_base| / |g_base|`` over the parameters (after clipping, before the update).
    """
    enc_kwargs, ee_layers, _ = CONFIGS[name]
    data = make_train_batch(batch, seconds, vocab, device, tokens_per_second)
    ref, out = None, {}
    for variant in ["base"] + [v for v in variants if v != "base"]:
        try:
            model = build(enc_kwargs, ee_layers, vocab, device=device, dropout=0.0,
                          fused=VARIANT_OPTIONS[variant].get("fused", False))
            loss = make_train_step(model, variant, data, device)()
        except Exception as exc:  # reported, so that one failing variant does not stop the others
            out[variant] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        params = [p for m in model[:2] for p in m.parameters()]
        grads = [p.grad.detach().double().clone() for p in params]
        if ref is None:
            ref = (loss.double(), grads)
        out[variant] = {
            "loss": float(loss),
            "loss_rel_diff": float(abs(loss.double() - ref[0]) / abs(ref[0])),
            "grad_rel_diff": max(float((g - g0).norm() / g0.norm().clamp_min(1e-30))
                                 for g, g0 in zip(grads, ref[1])),
        }
    return out


def profile_train_step(name, variant, batch, seconds, vocab, device, tokens_per_second=12, steps=5):
    """torch.profiler over ``steps`` steps of each model: per-step wall, kernel and CPU-op time,
    stream synchronisations, launches, and the top kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    enc_kwargs, ee_layers, single_layers = CONFIGS[name]
    data = make_train_batch(batch, seconds, vocab, device, tokens_per_second)
    fused = VARIANT_OPTIONS[variant].get("fused", False)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    rows = []
    for key, layers in (("early_exit", ee_layers), ("single_exit", single_layers)):
        step = make_train_step(build(enc_kwargs, layers, vocab, device=device, fused=fused), variant, data,
                               device)
        for _ in range(3):
            step()
        sync(device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
            wall = time.perf_counter() - start
        events = prof.key_averages()
        # GPU time of the kernels (and copies); a record_function range such as the optimiser's
        # "Optimizer.step#AdamW.step" also shows as a GPU event spanning its kernels: left out
        kernels = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA
                   and not getattr(e, "is_user_annotation", False) and not e.key.startswith("Optimizer.")]
        count = {}
        for e in events:
            count[e.key] = count.get(e.key, 0) + e.count
        top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:8]
        rows.append({
            "config": name, "variant": variant, "model": key, "batch": batch,
            "seconds_per_utterance": seconds, "steps": steps,
            "wall_ms_per_step": 1000 * wall / steps,
            "kernel_ms_per_step": sum(e.self_device_time_total for e in kernels) / steps / 1000,
            "cpu_op_ms_per_step": sum(e.self_cpu_time_total for e in events
                                      if getattr(e, "device_type", None) != DeviceType.CUDA) / steps / 1000,
            "syncs_per_step": count.get("cudaStreamSynchronize", 0) / steps,
            "memcpy_per_step": count.get("cudaMemcpyAsync", 0) / steps,
            "launches_per_step": sum(count.get(k, 0) for k in (
                "cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
                "cudaGraphLaunch")) / steps,
            "top_kernels": [{"name": e.key[:90], "ms_per_step": e.self_device_time_total / steps / 1000,
                             "calls_per_step": e.count / steps} for e in top],
        })
    return rows


def print_profile(rows):
    for r in rows:
        print(f"profile, {r['config']} {r['batch']} x {r['seconds_per_utterance']} s, {r['variant']}, "
              f"{r['model']}: wall {r['wall_ms_per_step']:.1f} ms/step, kernels "
              f"{r['kernel_ms_per_step']:.1f} ms, CPU ops {r['cpu_op_ms_per_step']:.1f} ms, "
              f"{r['syncs_per_step']:.0f} stream syncs, {r['launches_per_step']:.0f} launches, "
              f"{r['memcpy_per_step']:.0f} memcpys per step", flush=True)
        for k in r["top_kernels"]:
            print(f"    {k['ms_per_step']:7.3f} ms {k['calls_per_step']:5.1f}x  {k['name']}")


def memory_child(name, key, batch, seconds, vocab, variant="base"):
    """In a fresh process: peak RSS of 3 training steps of ``variant`` minus the RSS before the
    model exists."""
    import resource

    enc_kwargs, ee_layers, single_layers = CONFIGS[name]
    cpu = torch.device("cpu")
    data = make_train_batch(batch, seconds, vocab, cpu)
    before = rss_bytes()
    model = build(enc_kwargs, ee_layers if key == "early_exit" else single_layers, vocab,
                  fused=VARIANT_OPTIONS[variant].get("fused", False))
    step = make_train_step(model, variant, data, cpu)
    for _ in range(3):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"peak_bytes": peak - before}))


def cpu_peak_memory_gb(name, key, batch, seconds, vocab, variant="base"):
    """Peak resident memory of ``key``'s training steps in ``variant``, measured alone in a child
    process.

    Linux only (``/proc``, ``ru_maxrss`` in KiB); None elsewhere or if the child fails.
    """
    import subprocess

    if rss_bytes() is None:
        return None
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child",
                           json.dumps([name, key, batch, seconds, vocab, variant]),
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
            "exit": k, "layer": layer, "fixed": stats(times[f"fixed_{k}"]),
            "ideal_ms": 1000 * ideal,
            "ratio_to_ideal": med[f"fixed_{k}"] / ideal,
            "speedup_vs_full": full / med[f"fixed_{k}"],
            "real_time_factor": med[f"fixed_{k}"] / seconds,
        }
        for kind in ("forced", "scored") if forced else ():
            pair = [a / b for a, b in zip(times[f"{kind}_{k}"], times[f"fixed_{k}"])]
            entry.update({f"{kind}_policy": stats(times[f"{kind}_{k}"]),
                          f"{kind}_over_fixed": med[f"{kind}_{k}"] / med[f"fixed_{k}"],
                          f"{kind}_over_fixed_pairwise": statistics.median(pair)})
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


def bench_frontend(name, batch, seconds, repeats, warmup, device):
    """SpeechBrain's front-end forward against the channels-last one (same module), in rotation."""
    enc_kwargs, ee_layers, _ = CONFIGS[name]
    torch.manual_seed(0)
    frontend = EarlyExitConformerEncoder(input_size=80, exit_layers=ee_layers, dropout=0.0,
                                         **enc_kwargs).frontend.to(device)
    forwards = {"speechbrain": lambda x: ConvolutionFrontEnd.forward(frontend, x), "channels_last": frontend}
    result = {"config": name, "device": str(device), "threads": torch.get_num_threads(), "passes": []}
    for kind, shape in (("train", (batch, int(seconds * 100))), ("inference", (1, 1000))):
        feats = torch.randn(*shape, 80, device=device)
        with torch.no_grad():
            diff = (forwards["speechbrain"](feats) - forwards["channels_last"](feats)).abs().max().item()

        def run(key):
            if kind == "train":
                x = feats.clone().requires_grad_()
                forwards[key](x).square().mean().backward()
            else:
                with torch.no_grad():
                    forwards[key](feats)

        times = time_in_rotation({key: lambda key=key: run(key) for key in forwards}, repeats, warmup, device)
        frontend.zero_grad(set_to_none=True)
        entry = {"pass": kind, "batch": shape[0], "audio_seconds": shape[1] / 100, "max_abs_diff": diff}
        entry.update({k: stats(v) for k, v in times.items()})
        entry["ratio"] = entry["channels_last"]["median_ms"] / entry["speechbrain"]["median_ms"]
        entry["ratio_pairwise_median"] = statistics.median(
            a / b for a, b in zip(times["channels_last"], times["speechbrain"]))
        result["passes"].append(entry)
    return result


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
    print("  exit layer  fixed ms [min-max]      ideal ms  ratio  speed-up  RTF     forced/fixed   "
          "scored/fixed")
    for e in res["exits"]:
        print(f"  {e['exit']:4d} {e['layer']:5d}  {fmt_ms(e['fixed']):>22s}  {e['ideal_ms']:8.1f}  "
              f"{e['ratio_to_ideal']:.3f}  {e['speedup_vs_full']:7.2f}x  "
              f"{e['real_time_factor']:.4f}  {over_fixed(e, 'forced'):14s} {over_fixed(e, 'scored')}",
              flush=True)


def over_fixed(entry, kind):
    """'ratio (pairwise)' of a dynamic variant over the fixed-exit path, or '' when not measured."""
    if f"{kind}_over_fixed" not in entry:
        return ""
    return f"{entry[f'{kind}_over_fixed']:.3f} ({entry[f'{kind}_over_fixed_pairwise']:.3f})"


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


def is_own_markdown(path: str) -> bool:
    """Whether ``path`` is a results table this command wrote (its first line)."""
    try:
        with open(path) as fin:
            return fin.readline().rstrip("\n") == "# Benchmark results"
    except (OSError, UnicodeDecodeError):
        return False


def markdown(output):
    """bench.md: every table of the run."""
    lines = ["# Benchmark results", "", f"Machine: {output['machine']}", ""]
    if output.get("train_step"):
        rows = []
        for r in output["train_step"]:
            head = [r["config"], r.get("variant", "base"),
                    f"{r['batch']} x {r['seconds_per_utterance']} s, V {r.get('vocab', 32)}"]
            if "error" in r:
                rows.append(head + ["failed: " + r["error"][:200].replace("|", "/").replace("\n", " ")]
                            + [""] * 5)
                continue
            mem = (f"{r['peak_memory_gb_early_exit']:.2f} / {r['peak_memory_gb_single_exit']:.2f} GB"
                   if r.get("peak_memory_gb_early_exit") is not None else "n/a")
            vs = (f"{r['early_exit_over_base_single']:.3f}" if "early_exit_over_base_single" in r else "")
            rows.append(head + [fmt_s(r["early_exit"]), fmt_s(r["single_exit"]), f"{r['ratio']:.3f}",
                                f"{r['ratio_pairwise_median']:.3f}", vs, mem])
        notes = [f"`{v}`: {d}" for v, d in output.get("train_step_variants", {}).items()]
        lines += table("Training step: early-exit vs single-exit (same encoder, same batch)",
                       ["configuration", "variant", "batch", "early-exit s [min-max]", "single-exit s [min-max]",
                        "ratio", "pairwise", "early-exit / base single-exit", "peak memory ee / single"], rows,
                       notes)
    if output.get("train_step_checks"):
        rows = [[c["config"], f"{c['batch']} x {c['seconds_per_utterance']} s", v,
                 ("failed: " + d["error"][:200].replace("|", "/").replace("\n", " ")) if "error" in d else
                 f"{d['loss_rel_diff']:.1e}", "" if "error" in d else f"{d['grad_rel_diff']:.1e}"]
                for c in output["train_step_checks"] for v, d in c["variants"].items()]
        lines += table("Training-step variants against base (early-exit model, first step, dropout 0)",
                       ["configuration", "batch", "variant", "loss rel. diff", "largest grad rel. diff"], rows)
    if output.get("train_step_profile"):
        rows = [[p["config"], f"{p['batch']} x {p['seconds_per_utterance']} s", p["variant"], p["model"],
                 f"{p['wall_ms_per_step']:.1f}", f"{p['kernel_ms_per_step']:.1f}", f"{p['cpu_op_ms_per_step']:.1f}",
                 f"{p['syncs_per_step']:.0f}", f"{p['launches_per_step']:.0f}",
                 "; ".join(f"{k['name'][:50]} {k['ms_per_step']:.2f}" for k in p["top_kernels"][:4])]
                for p in output["train_step_profile"]]
        lines += table("Training step under torch.profiler (per step)",
                       ["configuration", "batch", "variant", "model", "wall ms", "kernel ms", "CPU-op ms",
                        "stream syncs", "launches", "top kernels (ms)"], rows)
    if "inference" in output:
        rows = []
        for r in output["inference"]:
            for e in r["exits"]:
                rows.append([label(r), f"{r['audio_seconds']:g}", f"{e['exit']} ({e['layer']})",
                             fmt_ms(e["fixed"]), f"{e['ideal_ms']:.1f}", f"{e['ratio_to_ideal']:.3f}",
                             f"{e['speedup_vs_full']:.2f}x", f"{e['real_time_factor']:.4f}",
                             over_fixed(e, "forced"), over_fixed(e, "scored")])
        lines += table("Batch-1 latency per exit",
                       ["configuration", "audio s", "exit (layer)", "ms [min-max]", "ideal ms", "ratio",
                        "speed-up vs full", "RTF", "forced / fixed (pairwise)", "scored / fixed (pairwise)"],
                       rows,
                       ["Ideal: front end + k/N of the full model's remaining time, same run. Forced: "
                        "dynamic inference with the fixed policy at exit k (it plans its exit, so passed "
                        "exits compute no head). Scored: dynamic inference that scores every exit it "
                        "reaches as the entropy policy does and stops at exit k."])
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
    if output.get("frontend"):
        rows = [[r["config"], p["pass"], f"{p['batch']} x {p['audio_seconds']:g} s", fmt_ms(p["speechbrain"]),
                 fmt_ms(p["channels_last"]), f"{p['ratio']:.3f}", f"{p['ratio_pairwise_median']:.3f}",
                 f"{p['max_abs_diff']:.1e}"]
                for r in output["frontend"] for p in r["passes"]]
        lines += table("Convolutional front end: SpeechBrain's forward vs the channels-last one",
                       ["configuration", "pass", "batch", "SpeechBrain ms [min-max]", "channels-last ms [min-max]",
                        "ratio", "pairwise", "largest output difference"], rows,
                       ["Train: forward and backward on the train-step batch; inference: forward, batch 1, "
                        "no gradient. Same module and parameters, timed in rotation."])
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
    parser.add_argument("--out", default="bench.json",
                        help="where to write the JSON results (the tables go beside it, .md)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    parser.add_argument("--only", help="run these sections only (comma-separated: " + ", ".join(SECTIONS) + ")")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for inference")
    parser.add_argument("--variants", default=DEFAULT_VARIANT,
                        help="train-step variants to run side by side (comma-separated, or 'all'; "
                             "CPU peak memory is measured for the first): " + ", ".join(TRAIN_VARIANTS)
                             + f"; default {DEFAULT_VARIANT}, the step the synthetic recipes take")
    parser.add_argument("--profile", default="",
                        help="train-step variants to profile with torch.profiler (paper-size cases)")
    parser.add_argument("--repeats", type=int, default=None, help="train-step repeats (default 30, quick 6)")
    parser.add_argument("--train-seconds", type=float, default=None,
                        help="seconds per utterance of the train-step cases (default 3; cuda adds 32 x 10 s)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*json.loads(args.memory_child))
        return
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
                res = bench_inference(name, seconds, reps, 2 if quick else 3, device, args.bf16,
                                      forced=seconds == 10.0)
                print_inference(res)
                output["inference"].append(res)
                save()
    if "throughput" in run:
        output["throughput"] = []
        for name in CONFIGS:
            res = bench_throughput(name, 16, 4.0, 2 if quick else 5, 1, device, args.bf16)
            print(f"throughput, {name}, batch 16 x 4 s: " + ", ".join(
                f"exit {e['exit']} {e['audio_seconds_per_second']:.0f} s/s" for e in res["exits"]),
                flush=True)
            output["throughput"].append(res)
            save()
    if "compute" in run:
        output["compute"] = [bench_compute(name) for name in CONFIGS]
        for res in output["compute"]:
            print(f"compute, {res['config']}, 10 s: " + ", ".join(
                f"exit {e['exit']} {e['params'] / 1e6:.2f} M params {e['gmacs']:.2f} GMACs"
                for e in res["exits"]), flush=True)
    if "frontend" in run:
        output["frontend"] = []
        for name, batch, secs, _, _ in train_cases(quick, device)[:len(CONFIGS)]:
            res = bench_frontend(name, batch, secs, 5 if quick else 20, 2 if quick else 3, device)
            for p in res["passes"]:
                print(f"front end, {name}, {p['pass']} {p['batch']} x {p['audio_seconds']:g} s: SpeechBrain "
                      f"{fmt_ms(p['speechbrain'])} ms, channels-last {fmt_ms(p['channels_last'])} ms, ratio "
                      f"{p['ratio']:.3f} (pairwise {p['ratio_pairwise_median']:.3f}), largest output "
                      f"difference {p['max_abs_diff']:.1e}", flush=True)
            output["frontend"].append(res)
            save()
    if "ddp" in run and device.type == "cpu" and ("ddp" in (args.only or "") or not quick):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="bench-ddp-") as workdir:
            output["ddp"] = bench_ddp(2 if quick else 4, workdir)
        runs = output["ddp"]["runs"]
        print(f"ddp, smoke recipe: 1 process {runs[0]['utterances_per_second']:.1f} utt/s, "
              f"2 processes {runs[1]['utterances_per_second']:.1f} utt/s, speed-up "
              f"{output['ddp']['speedup']:.2f}x", flush=True)
    save()
    print(f"Results written to {args.out} and {md_path}")


def train_cases(quick, device, seconds=None):
    """(configuration, batch, seconds per utterance, vocabulary, tokens per second) of each train-step case."""
    cases = []
    for name in CONFIGS:
        batch = 8 if "paper" in name else 16
        if quick:
            batch //= 2
        if device.type == "cuda":
            batch *= 4
        cases.append((name, batch, seconds or 3.0, 32, 12))
    if device.type == "cuda" and seconds is None:
        # the paper's batch, 32 x 10 s with BPE 256, and 32 x 15 s: about the 500 s of audio per
        # batch that the LibriSpeech and TED-LIUM YAMLs take on a GPU (max_batch_length_train)
        for secs in (10.0, 15.0):
            cases.append(("paper size (12 layers, d 256)", 32, secs, 256, 8))
    return cases


def run_train_step(quick, repeats, warmup, device, variants=(DEFAULT_VARIANT,), profile=(), seconds=None,
                   save=lambda: None, output=None):
    """Every case x variant, side by side; optional loss/gradient checks and profiles.

    Results go into ``output`` (``train_step``, ``train_step_checks``, ``train_step_profile``)
    as they come, ``save()`` after each, so that a run cut short keeps what it measured.
    """
    output = {} if output is None else output
    results = output.setdefault("train_step", [])
    checks = output.setdefault("train_step_checks", []) if len(variants) > 1 else []
    profiles = output.setdefault("train_step_profile", []) if profile else []
    for name, batch, secs, vocab, tps in train_cases(quick, device, seconds):
        if len(variants) > 1:
            check = check_train_variants(name, variants, batch, secs, vocab, device, tps)
            checks.append({"config": name, "batch": batch, "seconds_per_utterance": secs, "vocab": vocab,
                           "variants": check})
            print(f"check, {name}, {batch} x {secs} s, vocab {vocab}: " + ", ".join(
                f"{v} {c['error'][:200]}" if "error" in c else
                f"{v} loss {c['loss_rel_diff']:.1e} grad {c['grad_rel_diff']:.1e}" for v, c in check.items()),
                flush=True)
            save()
        base = None
        for variant in variants:
            try:
                res = bench_train_step(name, batch=batch, seconds=secs, repeats=repeats, warmup=warmup,
                                       vocab=vocab, device=device, variant=variant, tokens_per_second=tps,
                                       memory=variant == variants[0])
            except Exception as exc:  # reported; the other variants still run
                res = {"config": name, "variant": variant, "batch": batch, "seconds_per_utterance": secs,
                       "vocab": vocab, "error": f"{type(exc).__name__}: {exc}"}
                print(f"train step, {name}, {variant}: FAILED {res['error'][:2000]}", flush=True)
                results.append(res)
                save()
                continue
            if variant == "base":
                base = res
            if base is not None:
                res["early_exit_over_base_single"] = res["early_exit"]["median_s"] / base["single_exit"]["median_s"]
                res["speedup_vs_base"] = {k: base[k]["median_s"] / res[k]["median_s"]
                                          for k in ("early_exit", "single_exit")}
            results.append(res)
            print_train_step(res)
            save()
    # profiles last: the timings above come first if the run is cut short
    for name, batch, secs, vocab, tps in train_cases(quick, device, seconds):
        for variant in profile if name.startswith("paper") else ():
            try:
                rows = profile_train_step(name, variant, batch, secs, vocab, device, tps)
            except Exception as exc:
                print(f"profile, {name}, {variant}: FAILED {type(exc).__name__}: {exc}", flush=True)
                continue
            profiles.extend(rows)
            print_profile(rows)
            save()
    return results


def print_train_step(res):
    vs_base = (f"; vs base single-exit {res['early_exit_over_base_single']:.3f}, speed-up vs base "
               f"{res['speedup_vs_base']['early_exit']:.3f} / {res['speedup_vs_base']['single_exit']:.3f}"
               if "speedup_vs_base" in res else "")
    print(f"train step, {res['config']}, {res['variant']}, batch {res['batch']} x {res['seconds_per_utterance']} s, "
          f"vocab {res['vocab']}, {res['threads']} threads: early-exit {fmt_s(res['early_exit'])} s, "
          f"single-exit {fmt_s(res['single_exit'])} s, ratio {res['ratio']:.3f} "
          f"(pairwise median {res['ratio_pairwise_median']:.3f})"
          + (f", peak memory {res['peak_memory_gb_early_exit']:.2f} / "
             f"{res['peak_memory_gb_single_exit']:.2f} GB"
             if res.get("peak_memory_gb_early_exit") is not None else "") + vs_base,
          flush=True)


if __name__ == "__main__":
    main()
