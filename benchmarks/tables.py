"""The benchmark's output: bench.md's tables and the number formats that the printed lines share."""


def fmt_ms(d):
    return f"{d['median_ms']:.1f} [{d['min_ms']:.1f}-{d['max_ms']:.1f}]"


def fmt_s(d):
    return f"{d['median_s']:.3f} [{d['min_s']:.3f}-{d['max_s']:.3f}]"


def label(r):
    return r["config"] + (" bf16" if r.get("bf16") else "")


def over_fixed(entry, kind):
    """'ratio (pairwise)' of a dynamic variant over the fixed-exit path, or '' when not measured."""
    if f"{kind}_over_fixed" not in entry:
        return ""
    return f"{entry[f'{kind}_over_fixed']:.3f} ({entry[f'{kind}_over_fixed_pairwise']:.3f})"


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
            head = [
                r["config"],
                r.get("variant", "base"),
                f"{r['batch']} x {r['seconds_per_utterance']} s, V {r.get('vocab', 32)}",
            ]
            if "error" in r:
                rows.append(head + ["failed: " + r["error"][:200].replace("|", "/").replace("\n", " ")] + [""] * 5)
                continue
            mem = (
                f"{r['peak_memory_gb_early_exit']:.2f} / {r['peak_memory_gb_single_exit']:.2f} GB"
                if r.get("peak_memory_gb_early_exit") is not None
                else "n/a"
            )
            vs = f"{r['early_exit_over_base_single']:.3f}" if "early_exit_over_base_single" in r else ""
            rows.append(
                head
                + [
                    fmt_s(r["early_exit"]),
                    fmt_s(r["single_exit"]),
                    f"{r['ratio']:.3f}",
                    f"{r['ratio_pairwise_median']:.3f}",
                    vs,
                    mem,
                ]
            )
        notes = [f"`{v}`: {d}" for v, d in output.get("train_step_variants", {}).items()]
        lines += table(
            "Training step: early-exit vs single-exit (same encoder, same batch)",
            [
                "configuration",
                "variant",
                "batch",
                "early-exit s [min-max]",
                "single-exit s [min-max]",
                "ratio",
                "pairwise",
                "early-exit / base single-exit",
                "peak memory ee / single",
            ],
            rows,
            notes,
        )
    if output.get("train_step_checks"):
        rows = [
            [
                c["config"],
                f"{c['batch']} x {c['seconds_per_utterance']} s",
                v,
                ("failed: " + d["error"][:200].replace("|", "/").replace("\n", " "))
                if "error" in d
                else f"{d['loss_rel_diff']:.1e}",
                "" if "error" in d else f"{d['grad_rel_diff']:.1e}",
            ]
            for c in output["train_step_checks"]
            for v, d in c["variants"].items()
        ]
        lines += table(
            "Training-step variants against base (early-exit model, first step, dropout 0)",
            ["configuration", "batch", "variant", "loss rel. diff", "largest grad rel. diff"],
            rows,
        )
    if output.get("train_step_profile"):
        rows = [
            [
                p["config"],
                f"{p['batch']} x {p['seconds_per_utterance']} s",
                p["variant"],
                p["model"],
                f"{p['wall_ms_per_step']:.1f}",
                f"{p['kernel_ms_per_step']:.1f}",
                f"{p['cpu_op_ms_per_step']:.1f}",
                f"{p['syncs_per_step']:.0f}",
                f"{p['launches_per_step']:.0f}",
                "; ".join(f"{k['name'][:50]} {k['ms_per_step']:.2f}" for k in p["top_kernels"][:4]),
            ]
            for p in output["train_step_profile"]
        ]
        lines += table(
            "Training step under torch.profiler (per step)",
            [
                "configuration",
                "batch",
                "variant",
                "model",
                "wall ms",
                "kernel ms",
                "CPU-op ms",
                "stream syncs",
                "launches",
                "top kernels (ms)",
            ],
            rows,
        )
    if "inference" in output:
        rows = []
        for r in output["inference"]:
            for e in r["exits"]:
                rows.append(
                    [
                        label(r),
                        f"{r['audio_seconds']:g}",
                        f"{e['exit']} ({e['layer']})",
                        fmt_ms(e["fixed"]),
                        f"{e['ideal_ms']:.1f}",
                        f"{e['ratio_to_ideal']:.3f}",
                        f"{e['speedup_vs_full']:.2f}x",
                        f"{e['real_time_factor']:.4f}",
                        over_fixed(e, "forced"),
                        over_fixed(e, "scored"),
                    ]
                )
        lines += table(
            "Batch-1 latency per exit",
            [
                "configuration",
                "audio s",
                "exit (layer)",
                "ms [min-max]",
                "ideal ms",
                "ratio",
                "speed-up vs full",
                "RTF",
                "forced / fixed (pairwise)",
                "scored / fixed (pairwise)",
            ],
            rows,
            [
                "Ideal: front end + k/N of the full model's remaining time, same run. Forced: "
                "dynamic inference with the fixed policy at exit k (it plans its exit, so passed "
                "exits compute no head). Scored: dynamic inference that scores every exit it "
                "reaches as the entropy policy does and stops at exit k."
            ],
        )
    if "throughput" in output:
        rows = [
            [
                label(r),
                f"{r['batch']} x {r['audio_seconds']:g} s",
                f"{e['exit']} ({e['layer']})",
                fmt_ms(e),
                f"{e['audio_seconds_per_second']:.1f}",
            ]
            for r in output["throughput"]
            for e in r["exits"]
        ]
        lines += table(
            "Batch throughput per exit",
            ["configuration", "batch", "exit (layer)", "ms [min-max]", "audio s per s"],
            rows,
        )
    if "compute" in output:
        latency = {
            (r["config"], e["exit"]): e["fixed"]["median_ms"]
            for r in output.get("inference", [])
            if r["audio_seconds"] == 10.0 and not r["bf16"]
            for e in r["exits"]
        }
        rows = []
        for r in output["compute"]:
            for e in r["exits"]:
                ms = latency.get((r["config"], e["exit"]))
                rate = f"{2 * e['gmacs'] / (ms / 1000):.1f}" if ms else ""
                rows.append(
                    [
                        r["config"],
                        f"{e['exit']} ({e['layer']})",
                        f"{e['params'] / 1e6:.2f} M",
                        f"{e['gmacs']:.2f}",
                        rate,
                    ]
                )
        lines += table(
            "Parameters and multiply-accumulates to each exit (10 s of audio, batch 1)",
            ["configuration", "exit (layer)", "params", "GMACs", "achieved GFLOP/s"],
            rows,
            ["GMACs from torch.utils.flop_counter; GFLOP/s = 2 x GMACs / the measured batch-1 latency at 10 s above."],
        )
    if output.get("frontend"):
        rows = [
            [
                r["config"],
                p["pass"],
                f"{p['batch']} x {p['audio_seconds']:g} s",
                fmt_ms(p["speechbrain"]),
                fmt_ms(p["channels_last"]),
                f"{p['ratio']:.3f}",
                f"{p['ratio_pairwise_median']:.3f}",
                f"{p['max_abs_diff']:.1e}",
            ]
            for r in output["frontend"]
            for p in r["passes"]
        ]
        lines += table(
            "Convolutional front end: SpeechBrain's forward vs the channels-last one",
            [
                "configuration",
                "pass",
                "batch",
                "SpeechBrain ms [min-max]",
                "channels-last ms [min-max]",
                "ratio",
                "pairwise",
                "largest output difference",
            ],
            rows,
            [
                "Train: forward and backward on the train-step batch; inference: forward, batch 1, "
                "no gradient. Same module and parameters, timed in rotation."
            ],
        )
    if "ddp" in output:
        d = output["ddp"]
        rows = [
            [
                f"{r['processes']} x {r['threads_per_process']}",
                f"{r['train_seconds']:.1f}",
                f"{r['utterances_per_second']:.1f}",
            ]
            for r in d["runs"]
        ]
        lines += table(
            "DDP on the CPU: the smoke recipe with 1 and 2 processes (gloo)",
            ["processes x threads", "training seconds", "utterances per second"],
            rows,
        )
        lines.append(f"Speed-up with 2 processes: {d['speedup']:.2f}x ({d['epochs']} epochs).")
    return "\n".join(lines)
