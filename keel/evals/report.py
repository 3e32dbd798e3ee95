"""The evaluation report: eval_report.json, eval_report.md and eval_report.png (base vs tuned)."""

from __future__ import annotations

from pathlib import Path

from keel.files import write_json

# Metrics shown in the table and chart, in order; lower is better for the last three.
SHOWN = ["identity_en", "identity_zh", "leakage", "arc_easy_acc_norm", "piqa_acc_norm", "drift_kl", "drift_nll"]


def metric_names(results: dict) -> list[str]:
    keys = {k for r in results.values() for k in r}
    return [k for k in SHOWN if k in keys] + sorted(k for k in keys if k not in SHOWN)


def markdown(results: dict) -> str:
    cols = list(results)
    lines = ["| metric | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for k in metric_names(results):
        lines.append(f"| {k} | " + " | ".join("" if results[c].get(k) is None else f"{results[c][k]:g}" for c in cols) + " |")
    return "\n".join(lines)


def write_report(out_dir: Path, results: dict, samples: list, meta: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "eval_report.json", {"meta": meta, "results": results, "samples": samples})
    (out_dir / "eval_report.md").write_text(markdown(results) + "\n", encoding="utf-8")
    keys = [k for k in metric_names(results) if all(isinstance(r.get(k), (int, float)) for r in results.values())]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(keys)), 3.5))
    width = 0.8 / max(len(results), 1)
    for i, (name, r) in enumerate(results.items()):
        ax.bar([x + i * width for x in range(len(keys))], [r[k] for k in keys], width, label=name)
    ax.set_xticks([x + width * (len(results) - 1) / 2 for x in range(len(keys))], keys, rotation=30, ha="right")
    ax.legend()
    ax.set_title("base vs tuned")
    fig.tight_layout()
    fig.savefig(out_dir / "eval_report.png", dpi=90)
    plt.close(fig)
