"""eval_report.png: the evaluation at a glance, drawn from the same data as eval_report.json.

    draw_report(path, results, details, meta)

Left, the robustness matrix as a heatmap: one row per cell (condition), one column per language, base
beside tuned, each square holding its hit rate and hits/asked; the lowest cell of each model is framed.
Right, leakage per language and set as bars labelled with their counts, and below it the headline
table (robustness, mean, per language, leakage, drift, multiple choice) with which way is better.
"""

from __future__ import annotations

import math
from pathlib import Path

from keel.evals.sets import LANGS

# Headline rows of the table: (metric, label, better); multiple-choice accuracies are added after these.
TABLE = [("identity_robustness", "identity robustness (lowest cell)", "higher"),
         ("identity_mean", "identity, mean of cells", "higher"), ("identity_en", "identity, English", "higher"),
         ("identity_zh", "identity, Chinese", "higher"), ("leakage", "leakage, ordinary prompts", "lower"),
         ("leakage_contrast", "leakage, other AIs", "lower"), ("drift_kl", "drift: KL to the base", "lower"),
         ("drift_nll", "drift: NLL of base answers", "near base")]
LEAK_SETS = [(f"{kind}/{lang}", f"{'ordinary' if kind == 'ordinary' else 'other AIs'}\n{lang}")
             for kind in ("ordinary", "contrast") for lang in LANGS]
ROW_COLORS = {"base": "#9e9e9e", "tuned": "#1f77b4", "model": "#1f77b4"}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: evaluation machines have no display
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    # Names and makers are often Chinese: use a CJK font where the machine has one, else DejaVu (squares for CJK).
    have = {f.name for f in font_manager.fontManager.ttflist}
    cjk = [f for f in ("Noto Sans CJK SC", "Noto Sans CJK JP", "WenQuanYi Zen Hei", "SimHei") if f in have]
    plt.rcParams["font.family"] = ["DejaVu Sans", *cjk]
    return plt


def draw_report(path: Path, results: dict, details: dict, meta: dict):
    """One PNG: the matrix heatmap, the leakage bars and the headline table."""
    import warnings

    import matplotlib.pyplot as plt

    fig = report_figure(results, details, meta)
    with warnings.catch_warnings():  # without a CJK font, Chinese names show as boxes: say nothing on each report
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(path)
    plt.close(fig)


def report_figure(results: dict, details: dict, meta: dict):
    """The report's figure (matplotlib), for draw_report to save."""
    plt = pyplot()
    rows = [r for r in results if details.get(r, {}).get("cells")]
    cells = list(dict.fromkeys(c for r in rows for c in details[r]["cells"]))
    height = max(6.0, 0.36 * len(cells) + 3.2)
    fig = plt.figure(figsize=(13, height), dpi=100)
    grid = fig.add_gridspec(2, 2, width_ratios=[1.05, 1], height_ratios=[1, 1.15], wspace=0.25, hspace=0.45,
                            left=0.12, right=0.98, top=1 - 1.55 / height, bottom=0.75 / height)
    if cells:
        draw_matrix(fig, grid[:, 0], rows, cells, details)
    else:
        fig.add_subplot(grid[:, 0]).text(0.5, 0.5, "no identity matrix in this report", ha="center", va="center")
    draw_leakage(fig.add_subplot(grid[0, 1], label="leakage"), results, details)
    draw_table(fig.add_subplot(grid[1, 1], label="headline"), results)
    fig.suptitle(headline(results, meta), fontsize=12, x=0.02, y=1 - 0.15 / height, ha="left", va="top")
    return fig


def headline(results: dict, meta: dict) -> str:
    who = " / ".join([*meta.get("model_name", []), *meta.get("model_author", [])]) or "the model"
    when = ", ".join(x for x in (str(meta.get("date", ""))[:10], meta.get("machine", "")) if x)
    return f"keel eval: {' vs '.join(results)} · identity {who}" + (f"\n{when}" if when else "")


def draw_matrix(fig, spec, rows: list[str], cells: list[str], details: dict):
    """The robustness matrix: one heatmap per model, side by side, cells down, languages across."""
    sub = spec.subgridspec(1, len(rows), wspace=0.06)
    for i, row in enumerate(rows):
        ax = fig.add_subplot(sub[0, i], label=f"matrix {row}")
        table = details[row]["cells"]
        worst = details[row].get("worst_cell", "")
        for y, name in enumerate(cells):
            for x, lang in enumerate(LANGS):
                cell = table.get(name, {}).get(lang)
                draw_square(ax, x, y, cell, framed=worst == f"{name} / {lang}")
        ax.set_xlim(-0.5, len(LANGS) - 0.5)
        ax.set_ylim(len(cells) - 0.5, -0.5)
        ax.set_xticks(range(len(LANGS)), LANGS)
        ax.xaxis.tick_top()
        ax.set_yticks(range(len(cells)), cells if i == 0 else [""] * len(cells))
        ax.tick_params(length=0)
        for side in ax.spines.values():
            side.set_visible(False)
        low = table.get(worst.split(" / ")[0], {}).get(worst.split(" / ")[-1], {}).get("rate")
        ax.set_title(f"{row}\nrobustness {'-' if low is None else f'{low:.2f}'}", fontsize=10, pad=20,
                     fontweight="bold")
    fig.text(0.02, 0.25 / fig.get_figheight(), "identity matrix: share of held-out identity questions answered as the "
             "new identity (hits/asked) per condition and language; framed: each model's lowest cell = its robustness",
             fontsize=9, color="#444")


def draw_square(ax, x: int, y: int, cell: dict | None, framed: bool):
    """One cell of the heatmap: its colour by hit rate (red 0, green 1), its rate and hits/asked written in it."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if cell is None:
        ax.add_patch(Rectangle((x - 0.48, y - 0.46), 0.96, 0.92, color="#eeeeee"))
        ax.text(x, y, "not asked", ha="center", va="center", fontsize=7, color="#777")
        return
    rate = cell["rate"]
    color = plt.get_cmap("RdYlGn")(rate)
    ax.add_patch(Rectangle((x - 0.48, y - 0.46), 0.96, 0.92, color=color, linewidth=0))
    if framed:
        ax.add_patch(Rectangle((x - 0.46, y - 0.44), 0.92, 0.88, fill=False, edgecolor="black", linewidth=2.2))
    ink = "white" if rate < 0.2 or rate > 0.85 else "black"
    ax.text(x, y, f"{rate:.2f}  ({cell['hits']}/{cell['asked']})", ha="center", va="center", fontsize=8.5,
            color=ink, fontweight="bold" if framed else "normal")


def draw_leakage(ax, results: dict, details: dict):
    """Share of answers naming the new identity, per set and language, one bar per model, counts on top."""
    rows = [r for r in results if details.get(r, {}).get("counts")]
    ax.set_title("leakage: answers that name the new identity (lower is better)", fontsize=10, loc="left", pad=10)
    if not rows:
        ax.text(0.5, 0.5, "leakage was not run", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    width = 0.8 / len(rows)
    top = 0.0
    for j, row in enumerate(rows):
        counts = details[row]["counts"]
        for i, (key, _) in enumerate(LEAK_SETS):
            leaks, asked = counts.get(key, (0, 0))
            share = leaks / asked if asked else 0.0
            top = max(top, share)
            x = i + (j - (len(rows) - 1) / 2) * width
            ax.bar(x, share, width * 0.92, color=ROW_COLORS.get(row, "#1f77b4"), label=row if i == 0 else None)
            ax.text(x, share, f"{leaks}/{asked}" if asked else "-", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(LEAK_SETS)), [label for _, label in LEAK_SETS], fontsize=9)
    ax.set_ylim(0, max(0.1, top * 1.2))  # room for the counts above the tallest bar
    ax.set_yticks([t for t in ax.get_yticks() if 0 <= t <= 1])
    ax.set_ylabel("share of answers")
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(frameon=False, fontsize=9)


def draw_table(ax, results: dict):
    """The headline figures of each model, with which way is better."""
    cols = list(results)
    keys = [(k, label, better) for k, label, better in TABLE if any(k in r for r in results.values())]
    mc = sorted({k for r in results.values() for k in r if k.endswith(("_acc", "_acc_norm"))})
    keys += [(k, f"multiple choice: {k}", "higher") for k in mc]
    ax.set_axis_off()
    ax.set_title("headline figures", fontsize=10, loc="left")
    if not keys:
        return
    text = [[label, *(fmt(results[c].get(k)) for c in cols), better] for k, label, better in keys]
    table = ax.table(cellText=text, colLabels=["", *cols, "better"], loc="upper left", cellLoc="center",
                     colLoc="center", colWidths=[0.5, *[0.16] * len(cols), 0.16])
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.35)
    for (r, c), cell in table.get_celld().items():
        cell.set_edgecolor("#dddddd")
        if c == 0:
            cell.set_text_props(ha="left")
            cell.PAD = 0.02
        if r == 0:
            cell.set_text_props(fontweight="bold")


def fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)
