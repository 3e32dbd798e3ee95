"""PNG curves of a training run (train loss, eval loss, token accuracy) from logging.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def plot_run(run_dir: Path):
    """Write images/<metric>.png for every metric logged in run_dir/logging.jsonl."""
    import matplotlib

    matplotlib.use("Agg")  # files only: training machines have no display
    import matplotlib.pyplot as plt

    log = Path(run_dir) / "logging.jsonl"
    if not log.is_file():
        return
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    out = Path(run_dir) / "images"
    out.mkdir(exist_ok=True)
    for key, title in (("loss", "train loss"), ("token_acc", "train token accuracy"), ("eval_loss", "eval loss"),
                       ("eval_token_acc", "eval token accuracy"), ("identity_hit", "identity hit rate"),
                       ("leakage", "identity leakage"), ("drift_kl", "drift (KL to base)")):
        points = [(r["global_step"], r[key]) for r in records if key in r and r[key] is not None]
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
