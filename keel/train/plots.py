"""PNG curves of a training run from logging.jsonl: one per metric (train and eval loss, token accuracy, the
in-training identity probe's hit rate, robustness, leakage and drift), and the probe's figures together."""

from __future__ import annotations

import json
from pathlib import Path

CURVES = (("loss", "train loss"), ("token_acc", "train token accuracy"), ("eval_loss", "eval loss"),
          ("eval_token_acc", "eval token accuracy"), ("identity_hit", "identity hit rate"),
          ("identity_robustness", "identity robustness"), ("leakage", "identity leakage"),
          ("drift_kl", "drift (KL to base)"))
PROBE_RATES = (("identity_hit", "identity hit rate (mean of cells)"), ("identity_robustness", "identity robustness "
               "(lowest cell)"), ("leakage", "leakage (ordinary prompts)"))


def plot_run(run_dir: Path):
    """Write images/<metric>.png for every metric logged in run_dir/logging.jsonl, and images/identity_probe.png
    when the run probed the identity (--eval_identity)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: training machines have no display
    import matplotlib.pyplot as plt

    log = Path(run_dir) / "logging.jsonl"
    if not log.is_file():
        return
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    out = Path(run_dir) / "images"
    out.mkdir(exist_ok=True)
    for key, title in CURVES:
        points = series(records, key)
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*zip(*points), marker="o" if len(points) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"{title.replace(' ', '_')}.png", dpi=90)
        plt.close(fig)
    if series(records, "identity_hit"):
        plot_probe(plt, records, out / "identity_probe.png")


def series(records: list[dict], key: str) -> list[tuple]:
    return [(r["global_step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]


def plot_probe(plt, records: list[dict], path: Path):
    """The probe at each eval: the identity and leakage rates on one [0, 1] scale, the drift beside them."""
    from matplotlib.ticker import MaxNLocator

    fig, (rates, drift) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1.6, 1]})
    for key, label in PROBE_RATES:
        points = series(records, key)
        if points:
            rates.plot(*zip(*points), marker="o", label=label, linestyle="--" if key == "leakage" else "-")
    rates.set_ylim(-0.03, 1.03)
    rates.set_title("identity probe at each eval (higher is better, leakage lower)", fontsize=10)
    rates.legend(fontsize=8, frameon=False)
    points = series(records, "drift_kl")
    if points:
        drift.plot(*zip(*points), marker="o", color="#8c564b")
    drift.set_title("drift: KL to the base (lower is better)", fontsize=10)
    for ax in (rates, drift):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
