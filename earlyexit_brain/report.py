"""Experiment reports: report.json, report.md and a WER-vs-compute plot."""

import json
import os
from typing import Dict, List, Optional

from earlyexit_brain.utils import atomic_write_text


def build_report(encoder, heads, test_results: Dict[str, List[Dict]], train: Dict,
                 extra: Optional[Dict] = None) -> Dict:
    """Assemble the report dictionary.

    Arguments
    ---------
    encoder : early-exit encoder (``exit_layers``, ``params_to_exit``)
    heads : exit heads (``params_of_exit``)
    test_results : ``{set: [{"exit", "wer", "cer", "n"}, ...]}`` from the Brain
    train : ``{"epochs": int, "seconds": float}``
    extra : more top-level fields (configuration facts)
    """
    params_total = sum(p.numel() for p in encoder.parameters()) + sum(
        p.numel() for p in heads.parameters())
    exits = []
    for k, layer in enumerate(encoder.exit_layers):
        entry = {
            "exit": k + 1,
            "layer": int(layer),
            "params_to_exit": int(encoder.params_to_exit(k) + heads.params_of_exit(k)),
            "encoder_fraction": round(layer / encoder.num_layers, 4),
            "sets": {},
        }
        for name, rows in test_results.items():
            row = rows[k]
            entry["sets"][name] = {"wer": float(row["wer"]), "cer": float(row["cer"]),
                                   "n": int(row["n"])}
        exits.append(entry)
    report = {"params_total": int(params_total), "num_layers": int(encoder.num_layers),
              "exits": exits, "train": {"epochs": int(train["epochs"]),
                                        "seconds": round(float(train["seconds"]), 1)}}
    if extra:
        report.update(extra)
    return report


def report_markdown(report: Dict) -> str:
    """Per-exit WER/CER table in Markdown."""
    sets = list(report["exits"][0]["sets"]) if report["exits"] else []
    lines = ["# Early-exit evaluation", ""]
    lines.append(f"Parameters: {report['params_total']:,}; trained {report['train']['epochs']} "
                 f"epochs in {report['train']['seconds']:.0f} s.")
    lines.append("")
    header = "| exit | layer | params to exit |" + "".join(f" {s} WER | {s} CER |" for s in sets)
    lines.append(header)
    lines.append("|" + "---|" * (3 + 2 * len(sets)))
    for e in report["exits"]:
        row = f"| {e['exit']} | {e['layer']} | {e['params_to_exit'] / 1e6:.2f} M |"
        row += "".join(f" {e['sets'][s]['wer']:.2f} | {e['sets'][s]['cer']:.2f} |" for s in sets)
        lines.append(row)
    lines.append("")
    lines.append("WER and CER in percent, greedy CTC decoding at each exit.")
    return "\n".join(lines) + "\n"


def plot_wer_vs_compute(report: Dict, path: str) -> Optional[str]:
    """WER of every test set against the fraction of encoder layers computed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [e["layer"] for e in report["exits"]]
    for name in report["exits"][0]["sets"]:
        ax.plot(xs, [e["sets"][name]["wer"] for e in report["exits"]], marker="o", label=name)
    ax.set_xlabel(f"encoder layers computed (of {report['num_layers']})")
    ax.set_ylabel("WER (%)")
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_report(report: Dict, folder: str) -> Dict[str, str]:
    """Write report.json, report.md and wer_vs_compute.png into ``folder``."""
    paths = {"json": os.path.join(folder, "report.json"), "md": os.path.join(folder, "report.md")}
    atomic_write_text(paths["json"], json.dumps(report, indent=2) + "\n")
    atomic_write_text(paths["md"], report_markdown(report))
    plot = plot_wer_vs_compute(report, os.path.join(folder, "wer_vs_compute.png"))
    if plot:
        paths["plot"] = plot
    return paths
