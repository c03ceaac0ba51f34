"""The ``train-step`` section: one training step of the early-exit model against the single-exit model.

Both models have the same encoder and take the same batch, timed in rotation; the step's variants
(``TRAIN_VARIANTS``) run side by side, each checked against ``base`` first (loss and gradients), and
``--profile`` runs torch.profiler over the paper-size cases.
"""

import statistics
import time

import torch

from earlyexit_brain.losses import stacked_ctc_losses
from earlyexit_brain.models.conformer import CTCExitHeads, EarlyExitConformerEncoder

from .memory import cpu_peak_memory_gb as child_peak_memory_gb
from .tables import fmt_s
from .timing import CONFIGS, autocast, sync, time_in_rotation


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
    return [
        torch.nn.functional.ctc_loss(
            lp.transpose(0, 1), tokens, (lens * lp.shape[1]).round().int(), token_lens, blank=0, zero_infinity=True
        )
        for lp in log_probs
    ]


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
    "base": {},
    "cpu_lengths": {"cpu_lengths": True},
    "ctc_stacked": {"ctc_stacked": True},
    "stacked": {"stacked": True},
    "ctc_stacked_fused": {"ctc_stacked": True, "fused": True},
    "stacked_fused": {"stacked": True, "fused": True},
    "stacked_bf16": {"stacked": True, "bf16": True},
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
    return {
        "feats": feats.to(device),
        "lens": lens.to(device),
        "tokens": tokens.to(device),
        "token_lens": token_lens.to(device),
        "token_lens_rel": (token_lens / tokens.shape[1]).to(device),
        "lens_cpu": lens,
        "token_lens_cpu": token_lens,
        # cuDNN's CTC: the targets concatenated, int32, on the CPU
        "targets_cat_cpu": torch.cat([t[:n] for t, n in zip(tokens, token_lens)]).int(),
    }


def stacked_log_probs(enc, heads, feats, lens):
    """``(E, B, T', V)`` log-probabilities of every exit, the exits' LayerNorms and heads as one op each.

    The same function as ``torch.stack(heads(enc(feats, lens)))`` up to float rounding.
    """
    state = enc.start(feats, lens)
    x, done, raw = state.x, 0, []
    for layer_no in enc.exit_layers:
        for layer in enc.layers[done:layer_no]:
            x, _ = layer(
                x, src_mask=state.src_mask, src_key_padding_mask=state.key_padding_mask, pos_embs=state.pos_embs
            )
        done = layer_no
        raw.append(x)
    norms = [n.norm for n in enc.exit_norms]
    h = torch.nn.functional.layer_norm(torch.stack(raw), norms[0].normalized_shape, eps=norms[0].eps)
    h = torch.addcmul(
        torch.stack([n.bias for n in norms])[:, None, None], h, torch.stack([n.weight for n in norms])[:, None, None]
    )
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
    losses = torch.nn.functional.ctc_loss(lp, targets, in_lens, tok_lens, blank=0, reduction="none", zero_infinity=True)
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
                loss = sum(
                    stacked_ctc_losses(
                        heads(enc(data["feats"], data["lens"])), data["tokens"], data["lens"], data["token_lens_rel"], 0
                    )
                )
            else:  # cpu_lengths
                loss = sum(
                    ctc_per_exit(
                        heads(enc(data["feats"], data["lens"])),
                        data["tokens"],
                        data["lens_cpu"],
                        data["token_lens_cpu"],
                    )
                )
        optimiser_step(opt, loss)
        return loss.detach()

    return step


def bench_train_step(
    name,
    batch,
    seconds,
    repeats,
    warmup,
    vocab=32,
    device=torch.device("cpu"),
    variant="base",
    tokens_per_second=12,
    memory=True,
):
    enc_kwargs, ee_layers, single_layers = CONFIGS[name]
    fused = VARIANT_OPTIONS[variant].get("fused", False)
    data = make_train_batch(batch, seconds, vocab, device, tokens_per_second)
    steps = {
        key: make_train_step(build(enc_kwargs, layers, vocab, device=device, fused=fused), variant, data, device)
        for key, layers in (("early_exit", ee_layers), ("single_exit", single_layers))
    }
    times = time_in_rotation(steps, repeats, warmup, device)
    result = {
        "config": name,
        "variant": variant,
        "batch": batch,
        "seconds_per_utterance": seconds,
        "vocab": vocab,
        "tokens_per_utterance": data["tokens"].shape[1],
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "device": str(device),
    }
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
        result[key] = {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values)}
    result["ratio"] = result["early_exit"]["median_s"] / result["single_exit"]["median_s"]
    pair = [a / b for a, b in zip(times["early_exit"], times["single_exit"])]
    result["ratio_pairwise_median"] = statistics.median(pair)
    return result


def check_train_variants(name, variants, batch, seconds, vocab=32, device=torch.device("cpu"), tokens_per_second=12):
    """Loss and gradients of each variant's first step against ``base`` (same weights, dropout 0).

    Returns ``{variant: {"loss_rel_diff", "grad_rel_diff"}}``; the gradient figure is the
    largest ``|g - g_base| / |g_base|`` over the parameters (after clipping, before the update).
    """
    enc_kwargs, ee_layers, _ = CONFIGS[name]
    data = make_train_batch(batch, seconds, vocab, device, tokens_per_second)
    ref, out = None, {}
    for variant in ["base"] + [v for v in variants if v != "base"]:
        try:
            model = build(
                enc_kwargs,
                ee_layers,
                vocab,
                device=device,
                dropout=0.0,
                fused=VARIANT_OPTIONS[variant].get("fused", False),
            )
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
            "grad_rel_diff": max(float((g - g0).norm() / g0.norm().clamp_min(1e-30)) for g, g0 in zip(grads, ref[1])),
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
        step = make_train_step(build(enc_kwargs, layers, vocab, device=device, fused=fused), variant, data, device)
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
        kernels = [
            e
            for e in events
            if getattr(e, "device_type", None) == DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False)
            and not e.key.startswith("Optimizer.")
        ]
        count = {}
        for e in events:
            count[e.key] = count.get(e.key, 0) + e.count
        top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:8]
        rows.append(
            {
                "config": name,
                "variant": variant,
                "model": key,
                "batch": batch,
                "seconds_per_utterance": seconds,
                "steps": steps,
                "wall_ms_per_step": 1000 * wall / steps,
                "kernel_ms_per_step": sum(e.self_device_time_total for e in kernels) / steps / 1000,
                "cpu_op_ms_per_step": sum(
                    e.self_cpu_time_total for e in events if getattr(e, "device_type", None) != DeviceType.CUDA
                )
                / steps
                / 1000,
                "syncs_per_step": count.get("cudaStreamSynchronize", 0) / steps,
                "memcpy_per_step": count.get("cudaMemcpyAsync", 0) / steps,
                "launches_per_step": sum(
                    count.get(k, 0)
                    for k in (
                        "cudaLaunchKernel",
                        "cuLaunchKernel",
                        "cudaLaunchKernelExC",
                        "cuLaunchKernelEx",
                        "cudaGraphLaunch",
                    )
                )
                / steps,
                "top_kernels": [
                    {
                        "name": e.key[:90],
                        "ms_per_step": e.self_device_time_total / steps / 1000,
                        "calls_per_step": e.count / steps,
                    }
                    for e in top
                ],
            }
        )
    return rows


def print_profile(rows):
    for r in rows:
        print(
            f"profile, {r['config']} {r['batch']} x {r['seconds_per_utterance']} s, {r['variant']}, "
            f"{r['model']}: wall {r['wall_ms_per_step']:.1f} ms/step, kernels "
            f"{r['kernel_ms_per_step']:.1f} ms, CPU ops {r['cpu_op_ms_per_step']:.1f} ms, "
            f"{r['syncs_per_step']:.0f} stream syncs, {r['launches_per_step']:.0f} launches, "
            f"{r['memcpy_per_step']:.0f} memcpys per step",
            flush=True,
        )
        for k in r["top_kernels"]:
            print(f"    {k['ms_per_step']:7.3f} ms {k['calls_per_step']:5.1f}x  {k['name']}")


def memory_inputs(name, key, batch, seconds, vocab, variant="base"):
    """What :mod:`benchmarks.memory`'s child process measures: the batch is made here, and the
    returned function builds ``key``'s model and returns its step (the memory it takes is counted)."""
    enc_kwargs, ee_layers, single_layers = CONFIGS[name]
    cpu = torch.device("cpu")
    data = make_train_batch(batch, seconds, vocab, cpu)

    def build_step():
        model = build(
            enc_kwargs,
            ee_layers if key == "early_exit" else single_layers,
            vocab,
            fused=VARIANT_OPTIONS[variant].get("fused", False),
        )
        return make_train_step(model, variant, data, cpu)

    return build_step


def cpu_peak_memory_gb(name, key, batch, seconds, vocab, variant="base"):
    """Peak resident memory of 3 training steps of ``key`` in ``variant``, measured alone in a child
    process, minus its memory before the model was built.

    Linux only (``/proc``, ``ru_maxrss`` in KiB); None elsewhere or if the child fails.
    """
    return child_peak_memory_gb(
        f"{__name__}:memory_inputs", [name, key, batch, seconds, vocab, variant], f"peak memory of {name} {key}"
    )


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


def run_train_step(
    quick,
    repeats,
    warmup,
    device,
    variants=(DEFAULT_VARIANT,),
    profile=(),
    seconds=None,
    save=lambda: None,
    output=None,
):
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
            checks.append(
                {"config": name, "batch": batch, "seconds_per_utterance": secs, "vocab": vocab, "variants": check}
            )
            print(
                f"check, {name}, {batch} x {secs} s, vocab {vocab}: "
                + ", ".join(
                    f"{v} {c['error'][:200]}"
                    if "error" in c
                    else f"{v} loss {c['loss_rel_diff']:.1e} grad {c['grad_rel_diff']:.1e}"
                    for v, c in check.items()
                ),
                flush=True,
            )
            save()
        base = None
        for variant in variants:
            try:
                res = bench_train_step(
                    name,
                    batch=batch,
                    seconds=secs,
                    repeats=repeats,
                    warmup=warmup,
                    vocab=vocab,
                    device=device,
                    variant=variant,
                    tokens_per_second=tps,
                    memory=variant == variants[0],
                )
            except Exception as exc:  # reported; the other variants still run
                res = {
                    "config": name,
                    "variant": variant,
                    "batch": batch,
                    "seconds_per_utterance": secs,
                    "vocab": vocab,
                    "error": f"{type(exc).__name__}: {exc}",
                }
                print(f"train step, {name}, {variant}: FAILED {res['error'][:2000]}", flush=True)
                results.append(res)
                save()
                continue
            if variant == "base":
                base = res
            if base is not None:
                res["early_exit_over_base_single"] = res["early_exit"]["median_s"] / base["single_exit"]["median_s"]
                res["speedup_vs_base"] = {
                    k: base[k]["median_s"] / res[k]["median_s"] for k in ("early_exit", "single_exit")
                }
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
    vs_base = (
        f"; vs base single-exit {res['early_exit_over_base_single']:.3f}, speed-up vs base "
        f"{res['speedup_vs_base']['early_exit']:.3f} / {res['speedup_vs_base']['single_exit']:.3f}"
        if "speedup_vs_base" in res
        else ""
    )
    print(
        f"train step, {res['config']}, {res['variant']}, batch {res['batch']} x {res['seconds_per_utterance']} s, "
        f"vocab {res['vocab']}, {res['threads']} threads: early-exit {fmt_s(res['early_exit'])} s, "
        f"single-exit {fmt_s(res['single_exit'])} s, ratio {res['ratio']:.3f} "
        f"(pairwise median {res['ratio_pairwise_median']:.3f})"
        + (
            f", peak memory {res['peak_memory_gb_early_exit']:.2f} / {res['peak_memory_gb_single_exit']:.2f} GB"
            if res.get("peak_memory_gb_early_exit") is not None
            else ""
        )
        + vs_base,
        flush=True,
    )
