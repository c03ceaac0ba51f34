"""The ``train-step`` section: ``EarlyExitCTCBrain.fit_batch`` of the early-exit model against the single-exit model.

Every variant times the library's training step itself, :meth:`earlyexit_brain.brain.EarlyExitCTCBrain.fit_batch`
on a SpeechBrain ``PaddedBatch`` of waveforms and tokens: filterbank features, feature normalisation, encoder,
exit heads, the loss object the recipes' YAML names (:class:`earlyexit_brain.losses.MultiExitLoss`), the
non-finite check, backward, gradient clipping (``max_grad_norm`` 1.0) and the AdamW step. A variant changes
only what a YAML or a Brain hook changes: the loss's ``ctc`` option, AdamW's ``fused``, the precision; the
``stacked*`` and ``graphed`` variants, alternatives the library does not take, replace the Brain's
``compute_forward`` and ``compute_objectives`` (:mod:`benchmarks.stacked`). The two models have the same
encoder and take the same batch, timed in rotation; each variant's first step is checked against ``base``
(loss and gradients), and ``--profile`` runs torch.profiler over the paper-size cases.
"""

import functools
import statistics
import time

import speechbrain as sb
import torch
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.lobes.features import Fbank
from speechbrain.processing.features import InputNormalization
from speechbrain.utils.epoch_loop import EpochCounter
from torch.autograd import DeviceType

from earlyexit_brain.brain import EarlyExitCTCBrain
from earlyexit_brain.losses import MultiExitLoss
from earlyexit_brain.models.conformer import EarlyExitConformerEncoder
from earlyexit_brain.models.exits import CTCExitHeads

from .memory import cpu_peak_memory_gb as child_peak_memory_gb
from .stacked import StackedExitsBrain
from .tables import fmt_s
from .timing import CONFIGS, sync, time_in_rotation

# Variants of the training step, each run for both models (``--variants``). All compute
# the same loss and gradients as ``base`` up to float rounding (``check_train_variants``).
TRAIN_VARIANTS = {
    "base": "fit_batch with MultiExitLoss(ctc='per_exit'): one SpeechBrain ctc_loss call per exit, plain AdamW "
    "(the reference)",
    "ctc_stacked": "fit_batch with MultiExitLoss(ctc='one_call'): every exit's CTC from one call "
    "(stacked_ctc_losses, relative lengths copied to the CPU once), plain AdamW",
    "stacked": "the exits' LayerNorms and heads as one batched op each (baddbmm, one log-softmax), "
    "one CTC call for all exits (reduction 'none', lengths on the CPU): StackedExitsBrain's hooks",
    "ctc_stacked_fused": "ctc_stacked with fused AdamW: the step EarlyExitCTCBrain takes with the "
    "synthetic recipes (ctc: one_call, fused: True under opt_class)",
    "stacked_fused": "stacked, with fused AdamW",
    "stacked_bf16": "stacked with precision bf16 (SpeechBrain's autocast; log-softmax and CTC in fp32)",
    "stacked_cudnn": "stacked with cuDNN's CTC (int32 targets on the CPU; cuDNN needs every input "
    "length equal to T, so padded batches cannot use it)",
    "graphed": "stacked with fused AdamW; forward and backward of encoder + heads captured as CUDA "
    "graphs (torch.cuda.make_graphed_callables), features, CTC and optimiser eager; CUDA only",
}
VARIANT_OPTIONS = {
    "base": {"ctc": "per_exit"},
    "ctc_stacked": {},
    "stacked": {"stacked": True},
    "ctc_stacked_fused": {"fused": True},
    "stacked_fused": {"stacked": True, "fused": True},
    "stacked_bf16": {"stacked": True, "bf16": True},
    "stacked_cudnn": {"stacked": True, "cudnn": True},
    "graphed": {"stacked": True, "fused": True, "graphed": True},
}
# left out on the CPU: graphed needs CUDA; bf16 without the CPU's bf16 units is emulated (very slow)
CUDA_ONLY_VARIANTS = {"graphed", "stacked_bf16"}
DEFAULT_VARIANT = "ctc_stacked_fused"  # the step the synthetic recipes take
SAMPLE_RATE, N_MELS, MAX_GRAD_NORM = 16000, 80, 1.0


def make_train_batch(batch, seconds, vocab, device, tokens_per_second=12):
    """A ``PaddedBatch`` on ``device`` of ``batch`` random waveforms of ``seconds`` and random token targets
    (``int(seconds * tokens_per_second)`` each, ids 1..vocab-1), as the recipes' training loader gives it."""
    torch.manual_seed(1)
    wavs = 0.05 * torch.randn(batch, int(seconds * SAMPLE_RATE))
    tokens = torch.randint(1, vocab, (batch, int(seconds * tokens_per_second)))
    return PaddedBatch([{"id": f"utt{i}", "sig": w, "tokens": t} for i, (w, t) in enumerate(zip(wavs, tokens))]).to(
        device
    )


def build_brain(name, key, variant, batch, vocab=32, device=torch.device("cpu"), seed=0, dropout=None):
    """``key``'s model (``early_exit`` or ``single_exit`` of configuration ``name``) in a Brain ready to train
    in ``variant``: what the recipes build from their YAML (Fbank, global InputNormalization, the encoder, its
    heads, MultiExitLoss, AdamW with lr 1e-4), with its optimiser initialised and the training stage started.
    ``batch`` (a :func:`make_train_batch` batch) gives the graphed variant the shapes it captures."""
    enc_kwargs, ee_layers, single_layers = CONFIGS[name]
    layers = ee_layers if key == "early_exit" else single_layers
    opts = VARIANT_OPTIONS[variant]
    torch.manual_seed(seed)
    extra = {} if dropout is None else {"dropout": dropout}
    modules = {
        "encoder": EarlyExitConformerEncoder(input_size=N_MELS, exit_layers=layers, **enc_kwargs, **extra),
        "ctc_heads": CTCExitHeads(enc_kwargs["d_model"], vocab, len(layers)),
        "normalize": InputNormalization(norm_type="global"),
    }
    hparams = {
        "compute_features": Fbank(sample_rate=SAMPLE_RATE, n_mels=N_MELS),
        "blank_index": 0,
        "epoch_counter": EpochCounter(1),
        "loss": MultiExitLoss(blank_index=0, ctc=opts.get("ctc", "one_call")),
    }
    run_opts = {
        "device": str(device),
        "max_grad_norm": MAX_GRAD_NORM,
        "precision": "bf16" if opts.get("bf16") else "fp32",
    }
    opt_class = functools.partial(torch.optim.AdamW, lr=1e-4, **({"fused": True} if opts.get("fused") else {}))
    if opts.get("stacked"):
        if opts.get("graphed") and device.type != "cuda":
            raise ValueError("the graphed variant needs a CUDA device")
        brain = StackedExitsBrain(
            modules=modules,
            hparams=hparams,
            opt_class=opt_class,
            run_opts=run_opts,
            cudnn=opts.get("cudnn", False),
            graphed_batch=batch if opts.get("graphed") else None,
        )
    else:
        brain = EarlyExitCTCBrain(modules=modules, hparams=hparams, opt_class=opt_class, run_opts=run_opts)
    brain.init_optimizers()
    brain.on_stage_start(sb.Stage.TRAIN, 1)
    brain.modules.train()
    brain.nonfinite_count = 0  # as Brain.fit sets it at the start of an epoch
    return brain


def make_train_step(name, key, variant, batch, vocab=32, device=torch.device("cpu"), dropout=None):
    """A function running one ``fit_batch`` of :func:`build_brain`'s Brain on ``batch``; it returns the loss."""
    brain = build_brain(name, key, variant, batch, vocab, device, dropout=dropout)
    step = functools.partial(brain.fit_batch, batch)
    step.brain = brain
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
    """Both models' ``fit_batch`` in ``variant`` on one batch, timed in rotation: median/min/max of each, the
    ratio of medians and the median of pairwise ratios; peak memory (CPU: each alone in a child process)."""
    data = make_train_batch(batch, seconds, vocab, device, tokens_per_second)
    steps = {key: make_train_step(name, key, variant, data, vocab, device) for key in ("early_exit", "single_exit")}
    times = time_in_rotation(steps, repeats, warmup, device)
    result = {
        "config": name,
        "variant": variant,
        "batch": batch,
        "seconds_per_utterance": seconds,
        "vocab": vocab,
        "tokens_per_utterance": data.tokens.data.shape[1],
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
    largest ``|g - g_base| / |g_base|`` over the parameters (after clipping, before the update:
    read by an optimiser step pre-hook inside ``fit_batch``).
    """
    data = make_train_batch(batch, seconds, vocab, device, tokens_per_second)
    ref, out = None, {}
    for variant in ["base"] + [v for v in variants if v != "base"]:
        try:
            step = make_train_step(name, "early_exit", variant, data, vocab, device, dropout=0.0)
            brain = step.brain
            params = [p for m in (brain.modules.encoder, brain.modules.ctc_heads) for p in m.parameters()]
            grads = []
            hook = brain.optimizer.register_step_pre_hook(
                lambda opt, args, kwargs, params=params, grads=grads: grads.extend(
                    p.grad.detach().double().clone() for p in params
                )
            )
            loss = step()
            hook.remove()
        except Exception as exc:  # reported, so that one failing variant does not stop the others
            out[variant] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
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
    data = make_train_batch(batch, seconds, vocab, device, tokens_per_second)
    kinds = torch.profiler.ProfilerActivity
    activities = [kinds.CPU] + ([kinds.CUDA] if device.type == "cuda" else [])
    rows = []
    for key in ("early_exit", "single_exit"):
        step = make_train_step(name, key, variant, data, vocab, device)
        for _ in range(3):
            step()
        sync(device)
        with torch.profiler.profile(activities=activities) as prof:
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
    returned function builds ``key``'s Brain and returns its step (the memory it takes is counted)."""
    data = make_train_batch(batch, seconds, vocab, torch.device("cpu"))
    return functools.partial(make_train_step, name, key, variant, data, vocab)


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
