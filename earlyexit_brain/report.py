"""Experiment reports: report.json, report.md and a WER-vs-compute plot."""

import json
import logging
import os
from typing import Dict, List, Optional

from earlyexit_brain.files import atomic_write_text


def build_report(
    encoder, heads, test_results: Dict[str, List[Dict]], train: Dict, extra: Optional[Dict] = None, decoders=None
) -> Dict:
    """Assemble the report dictionary.

    Arguments
    ---------
    encoder : early-exit encoder (``exit_layers``, ``exit_compute_layers``, ``params_to_exit``);
        where the layers computed to an exit differ from its layer (a Splitformer's
        branches), the exit's entry has ``compute_layers``, and so has the report (the last exit's)
    heads : exit heads (``params_of_exit``)
    test_results : ``{set: [{"exit", "wer", "cer", "n"}, ...]}`` from the Brain
    train : ``{"epochs": int, "seconds": float}``
    extra : more top-level fields (configuration facts)
    decoders : attention decoders, one per exit (``params_of_exit``), or None

    Each test set's entry of an exit has ``wer``, ``cer`` and ``n`` from the
    first test decoder and, when the Brain ran several, ``decoders``:
    ``{name: {"wer", "cer", "ms_per_utterance"}}``.
    """
    parts = [encoder, heads] + ([decoders] if decoders is not None else [])
    params_total = sum(p.numel() for part in parts for p in part.parameters())
    exits = []
    computed = list(encoder.exit_compute_layers)
    for k, layer in enumerate(encoder.exit_layers):
        entry = {
            "exit": k + 1,
            "layer": int(layer),
            **({"compute_layers": int(computed[k])} if computed[k] != layer else {}),
            "params_to_exit": int(
                encoder.params_to_exit(k)
                + heads.params_of_exit(k)
                + (decoders.params_of_exit(k) if decoders is not None else 0)
            ),
            "encoder_fraction": round(layer / encoder.num_layers, 4),
            "sets": {},
        }
        for name, rows in test_results.items():
            row = rows[k]
            entry["sets"][name] = {"wer": float(row["wer"]), "cer": float(row["cer"]), "n": int(row["n"])}
            if row.get("decoders"):
                entry["sets"][name]["decoders"] = row["decoders"]
        exits.append(entry)
    report = {
        "params_total": int(params_total),
        "num_layers": int(encoder.num_layers),
        **({"compute_layers": int(computed[-1])} if computed != list(encoder.exit_layers) else {}),
        "exits": exits,
        "train": {"epochs": int(train["epochs"]), "seconds": round(float(train["seconds"]), 1)},
    }
    if extra:
        report.update(extra)
    return report


def report_markdown(report: Dict) -> str:
    """Per-exit WER/CER table in Markdown."""
    sets = list(report["exits"][0]["sets"]) if report["exits"] else []
    lines = ["# Early-exit evaluation", ""]
    lines.append(
        f"Parameters: {report['params_total']:,}; trained {report['train']['epochs']} "
        f"epochs in {report['train']['seconds']:.0f} s."
    )
    lines.append("")
    header = "| exit | layer | params to exit |" + "".join(f" {s} WER | {s} CER |" for s in sets)
    lines.append(header)
    lines.append("|" + "---|" * (3 + 2 * len(sets)))
    for e in report["exits"]:
        row = f"| {e['exit']} | {e['layer']} | {e['params_to_exit'] / 1e6:.2f} M |"
        row += "".join(f" {e['sets'][s]['wer']:.2f} | {e['sets'][s]['cer']:.2f} |" for s in sets)
        lines.append(row)
    lines.append("")
    decoders = report.get("test_decoders") or ["ctc_greedy"]
    words = DECODER_WORDS.get(decoders[0], decoders[0])
    lm = report.get("ctc_lm")
    if decoders[0] == "ctc_beam" and lm:
        words += f" with a word {lm['order'] or 'n'}-gram LM ({lm['file']}, alpha {lm['alpha']:g}, beta {lm['beta']:g})"
    if decoders[0] == "aed_beam" and lm and "aed_weight" in lm:
        words += (
            f" with a word {lm['order'] or 'n'}-gram LM fused ({lm['file']}, weight "
            f"{lm['aed_weight']:g}, word bonus {lm['aed_word_bonus']:g})"
        )
    lines.append(f"WER and CER in percent, {words} at each exit.")
    if len(decoders) > 1 and report["exits"] and "decoders" in report["exits"][0]["sets"][sets[0]]:
        lines += ["", *decoder_markdown(report, decoders, sets)]
    if report.get("policies"):
        lines += ["", *policy_markdown(report)]
    if report.get("controller"):
        lines += ["", *controller_markdown(report["controller"])]
    return "\n".join(lines) + "\n"


DECODER_WORDS = {
    "ctc_greedy": "greedy CTC decoding",
    "ctc_beam": "CTC beam search",
    "aed_beam": "joint CTC/attention beam search",
}


def decoder_markdown(report: Dict, decoders: List[str], sets: List[str]) -> List[str]:
    """WER of every decoder at every exit, with the decoding time per utterance."""
    lines = [
        "## Decoders",
        "",
        "| exit | layer |" + "".join(f" {s} {d} WER | {s} {d} ms/utt |" for s in sets for d in decoders),
    ]
    lines.append("|" + "---|" * (2 + 2 * len(sets) * len(decoders)))
    for e in report["exits"]:
        row = f"| {e['exit']} | {e['layer']} |"
        for s in sets:
            for d in decoders:
                v = e["sets"][s]["decoders"][d]
                row += f" {v['wer']:.2f} | {v['ms_per_utterance']:.1f} |"
        lines.append(row)
    lines += [
        "",
        "ms/utt: decoding time alone (after the encoder), per utterance, in batches of "
        "eval_batch_size on this machine.",
    ]
    return lines


#: How report.md names the two analysis-only oracles.
ORACLE_WORDS = {
    "oracle": "oracle (agreement: the last exit's text)",
    "oracle_errors": "oracle_errors (no more word errors than the last exit)",
}


def _policy_label(entry: Dict) -> str:
    if entry["policy"] == "fixed":
        return f"fixed exit {entry['exit']}"
    if entry["threshold"] is None:
        return ORACLE_WORDS.get(entry["policy"], entry["policy"])
    unit = " ms" if entry["policy"] == "budget" else ""
    mark = " (calibrated)" if entry.get("calibrated") else ""
    return f"{entry['policy']} {entry['threshold']:.4g}{unit}{mark}"


def policy_markdown(report: Dict) -> List[str]:
    """Exit-policy table: WER, average layers and seconds per test set."""
    sets = list(report["policies"][0]["sets"])
    lines = ["## Exit policies", ""]
    cal = report.get("calibration", {})
    if cal.get("thresholds"):
        what = (
            "at most {v} WER points above the last exit"
            if cal["target"] == "max_wer_increase"
            else "at most {v} layers on average"
        ).format(v=cal["value"])
        if cal.get("confidence") is not None:
            what += f" with bootstrap confidence {cal['confidence']}"
        lines.append(f"Thresholds calibrated on dev for {what}:")
        for name, c in cal["thresholds"].items():
            interval = c.get("dev_increase_interval")
            spread = f", increase 90% interval {interval[0]:+.2f} to {interval[1]:+.2f}" if interval else ""
            lines.append(
                f"- {name}: {c['threshold']:.4g} (dev WER {c['dev']['wer']:.2f} vs "
                f"{c['dev_last_exit']['wer']:.2f} at the last exit{spread}, "
                f"{c['dev']['avg_layers']:.2f} layers)"
            )
        lines.append("")
    lines.append("| policy |" + "".join(f" {s} WER | {s} avg layers | {s} s |" for s in sets))
    lines.append("|" + "---|" * (1 + 3 * len(sets)))
    for entry in report["policies"]:
        row = f"| {_policy_label(entry)} |"
        for s in sets:
            v = entry["sets"][s]
            row += f" {v['wer']:.2f} | {v['avg_layers']:.2f} | {v['seconds']:.2f} |"
        lines.append(row)
    lines.append("")
    layers = f"Layers of {report['num_layers']}"
    if "compute_layers" in report:
        layers = (
            f"Layers computed, the parallel branches counted (of {report['compute_layers']}: "
            f"{report['num_layers']} in the stack)"
        )
    lines.append(
        f"{layers}; seconds: measured time at batch 1 from the "
        "waveform to the chosen exit plus the policy's decisions, summed over the set."
    )
    for set_name, row in report.get("depth_matched", {}).items():
        ref = row.get("posterior")
        if not ref:
            continue
        others = ", ".join(f"{n} {v['wer']:.2f}" for n, v in row.items() if n != "posterior" and v)
        lines.append(
            f"- {set_name}: at the calibrated posterior's average depth "
            f"({ref['avg_layers']:.2f} layers, WER {ref['wer']:.2f}), WER of {others}."
        )
    if report.get("references"):
        lines += ["", *reference_markdown(report["references"])]
    return lines


def _signed(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


def reference_markdown(references: Dict) -> List[str]:
    """Per set, every policy against the fixed-exit line (``evaluate_policies``'s ``references``)."""
    lines = [
        "## Policies against the fixed-exit line",
        "",
        "The fixed-exit line joins adjacent fixed exits in (average layers, WER): the expected WER of "
        "sending a random share of the utterances to each of the two exits at the same average depth. "
        "Area: the integral over the policy's depth range of the line's WER minus the policy's, in WER "
        "points x layers; mean gap: area / depth range; gap: the line's WER minus the calibrated "
        "point's at its depth. Positive means the policy lies below the line (better than the random "
        "split); negative, above it.",
    ]
    for set_name, row in references.items():
        lines += [
            "",
            f"### {set_name}",
            "",
            "| policy | depth range (layers) | area below the line (WER points x layers) | mean gap (WER points) "
            "| calibrated layers | calibrated WER | calibrated gap |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, ref in row["policies"].items():
            low_high = ref.get("depth_range")
            if low_high is None:
                span = "-"
            elif low_high[0] == low_high[1]:
                span = f"{low_high[0]:.2f} (single depth)"
            else:
                span = f"{low_high[0]:.2f} to {low_high[1]:.2f}"
            cal = ref.get("calibrated")
            point = f" {cal['avg_layers']:.2f} | {cal['wer']:.2f} | {_signed(cal['gap'])} |" if cal else " - | - | - |"
            lines.append(f"| {name} | {span} | {_signed(ref['area'])} | {_signed(ref['mean_gap'])} |{point}")
        for name, o in row.get("oracles", {}).items():
            lines.append(
                f"- {ORACLE_WORDS.get(name, name)}: {o['avg_layers']:.2f} layers, WER {o['wer']:.2f} "
                f"(the line: {o['line_wer']:.2f} at that depth, gap {_signed(o['gap'])})."
            )
    return lines


#: What each target of the learned exit controller predicts (report.md).
TARGETS = {
    "agreement": "the exit's hypothesis equals the last exit's",
    "errors": "no more word errors at the exit than at the last",
}


def controller_markdown(controller: Dict) -> List[str]:
    """The learned exit controller (``run_policy_evaluation``'s ``controller``): its size, how well
    it ranks utterances at each exit, and what its decisions cost against the encoder."""
    training = controller["training"]
    shares = controller.get("decision_time_share", {})
    width = "a logistic regression" if not training.get("hidden_units") else f"{training['hidden_units']} tanh units"
    inputs = (
        "the 9 statistics and the mean encoder state" if controller.get("reads_states", True) else "the 9 statistics"
    )
    lines = [
        "## Learned exit controller",
        "",
        f"{controller['parameters']:,} parameters ({controller['bytes_float32'] / 1024:.1f} KiB as float32), "
        f"{width} per exit on {inputs}, L2 penalty {training.get('weight_decay', 0):g}, target "
        f"'{training.get('target', 'errors')}' ({TARGETS.get(training.get('target', 'errors'), '')}); trained on "
        f"{training['exits'][0]['utterances']} held-out utterances (WER per exit: "
        + ", ".join(f"{w:.2f}" for w in training.get("held_out_wer", []))
        + "). Stop is free: the share of utterances with no more word errors at the exit than at the "
        "last; AUC: how well the controller ranks them (0.5: chance). Decision time: the controller's "
        "time at the exit over the encoder's time from the previous exit to this one.",
        "",
        "| exit | held-out stop is free | held-out AUC | dev stop is free | dev AUC |"
        + "".join(f" {s} decision time |" for s in shares),
        "|" + "---|" * (5 + len(shares)),
    ]
    for k, row in enumerate(training["exits"]):
        cells = [
            str(row["exit"]),
            _number(row.get("held_out_stop_is_free")),
            _number(row.get("held_out_auc")),
            _number(row.get("dev_stop_is_free")),
            _number(row.get("dev_auc")),
        ] + [f"{100.0 * v[k]:.2f}%" for v in shares.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _number(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def quiet_matplotlib() -> None:
    """Keep matplotlib's DEBUG records (hundreds of font-lookup lines per plot) out of an
    experiment's log.txt, where SpeechBrain logs every logger at DEBUG; a level the user
    set on the ``matplotlib`` logger is left alone."""
    mpl_logger = logging.getLogger("matplotlib")
    if mpl_logger.level == logging.NOTSET:
        mpl_logger.setLevel(logging.INFO)


def plot_wer_vs_compute(report: Dict, path: str) -> Optional[str]:
    """WER of every test set against the fraction of encoder layers computed."""
    quiet_matplotlib()  # before the import, which logs its paths at DEBUG
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return None
    xs = [e.get("compute_layers", e["layer"]) for e in report["exits"]]  # a Splitformer's branches counted
    total = report.get("compute_layers", report["num_layers"])
    sets = list(report["exits"][0]["sets"])
    policies = report.get("policies") or []
    if not policies:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name in sets:
            ax.plot(xs, [e["sets"][name]["wer"] for e in report["exits"]], marker="o", label=name)
        ax.set_xlabel(f"encoder layers computed (of {total})")
        ax.set_ylabel("WER (%)")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
        ax.legend()
    else:
        fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 4), squeeze=False)
        for ax, name in zip(axes[0], sets):
            _plot_policies(ax, policies, name)
            ax.set_title(name)
            ax.set_xlabel(f"average encoder layers computed (of {total})")
            ax.set_ylabel("WER (%)")
            ax.set_xticks(xs)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _plot_policies(ax, policies: List[Dict], set_name: str):
    fixed = sorted(
        (p["sets"][set_name]["avg_layers"], p["sets"][set_name]["wer"]) for p in policies if p["policy"] == "fixed"
    )
    ax.plot([x for x, _ in fixed], [y for _, y in fixed], "ks", label="fixed exits", zorder=3)
    ax.plot(
        [x for x, _ in fixed],
        [y for _, y in fixed],
        "k--",
        linewidth=1,
        label="fixed-exit line (random split)",
        zorder=2,
    )
    for name in dict.fromkeys(p["policy"] for p in policies):
        if name in ("fixed", "oracle", "oracle_errors"):
            continue
        pts = sorted(
            (p["sets"][set_name]["avg_layers"], p["sets"][set_name]["wer"]) for p in policies if p["policy"] == name
        )
        (line,) = ax.plot([x for x, _ in pts], [y for _, y in pts], marker=".", label=name)
        for p in policies:
            if p["policy"] == name and p.get("calibrated"):
                ax.plot(
                    p["sets"][set_name]["avg_layers"],
                    p["sets"][set_name]["wer"],
                    "*",
                    color=line.get_color(),
                    markersize=12,
                )
    for p in policies:
        if p["policy"] == "oracle":
            ax.plot(
                p["sets"][set_name]["avg_layers"],
                p["sets"][set_name]["wer"],
                "r^",
                label="oracle (agreement)",
                zorder=3,
            )
        elif p["policy"] == "oracle_errors":
            ax.plot(
                p["sets"][set_name]["avg_layers"],
                p["sets"][set_name]["wer"],
                "D",
                color="darkviolet",
                markeredgecolor="k",
                label="oracle (errors)",
                zorder=3,
            )


def write_report(report: Dict, folder: str) -> Dict[str, str]:
    """Write report.json, report.md and wer_vs_compute.png into ``folder``."""
    paths = {"json": os.path.join(folder, "report.json"), "md": os.path.join(folder, "report.md")}
    atomic_write_text(paths["json"], json.dumps(report, indent=2) + "\n")
    atomic_write_text(paths["md"], report_markdown(report))
    plot = plot_wer_vs_compute(report, os.path.join(folder, "wer_vs_compute.png"))
    if plot:
        paths["plot"] = plot
    return paths
