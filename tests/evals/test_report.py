"""eval_report.png: the robustness matrix as a heatmap (base beside tuned, each square holding its own report
numbers, the lowest framed), leakage per set and language with its counts, and the headline table; the same
data in eval_report.json. No model: a report is made up with a different number in every cell."""

from __future__ import annotations

import json

from keel.evals.figure import LEAK_SETS, report_figure
from keel.evals.report import write_report

CELLS = ["sys:train", "sys:helpful", "turn:after_1", "pressure"]


def made_up_report():
    details, results = {}, {}
    for r, row in enumerate(("base", "tuned")):
        cells = {name: {lang: {"hits": (i + 2 * j + r) % 5, "asked": 4 + j} for j, lang in enumerate(("en", "zh"))}
                 for i, name in enumerate(CELLS)}
        for per in cells.values():
            for c in per.values():
                c["rate"] = round(c["hits"] / c["asked"], 3)
        worst = min(((n, lang) for n in CELLS for lang in ("en", "zh")), key=lambda k: cells[k[0]][k[1]]["rate"])
        counts = {key: [r * (3 + i), 48 if key.startswith("ordinary") else 10] for i, (key, _) in enumerate(LEAK_SETS)}
        details[row] = {"cells": cells, "worst_cell": f"{worst[0]} / {worst[1]}", "counts": counts}
        results[row] = {"identity_robustness": cells[worst[0]][worst[1]]["rate"], "identity_mean": 0.5 + r / 4,
                        "leakage": 0.03 * r, "drift_kl": 0.11 * r, "drift_nll": 1.5, "arc_easy_acc_norm": 0.61 - r / 100}
    meta = {"model_name": ["小K", "Keel"], "model_author": ["Acme"], "machine": "test CPU", "date": "2026-12-07T10:00"}
    return results, details, meta


def texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_the_heatmap_squares_carry_the_reports_numbers_and_frame_the_lowest():
    from matplotlib.patches import Rectangle

    results, details, meta = made_up_report()
    fig = report_figure(results, details, meta)
    axes = {ax.get_label(): ax for ax in fig.axes}
    for row in ("base", "tuned"):
        ax = axes[f"matrix {row}"]
        shown = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
        want = {(i, j): f"{c['rate']:.2f}  ({c['hits']}/{c['asked']})"
                for i, name in enumerate(CELLS) for j, c in enumerate(details[row]["cells"][name].values())}
        assert shown == want
        name, lang = details[row]["worst_cell"].split(" / ")
        framed = [p.get_xy() for p in ax.patches if isinstance(p, Rectangle) and not p.get_fill()]
        assert [(round(x + 0.46), round(y + 0.44)) for x, y in framed] == [(("en", "zh").index(lang), CELLS.index(name))]
        assert f"robustness {results[row]['identity_robustness']:.2f}" in ax.get_title()
    leak = texts(axes["leakage"])
    assert leak == [f"{a}/{b}" for row in ("base", "tuned") for a, b in details[row]["counts"].values()]
    table = {tuple(c.get_text().get_text() for c in row) for row in table_rows(axes["headline"])}
    assert ("drift: KL to the base", "0", "0.11", "lower") in table
    assert ("multiple choice: arc_easy_acc_norm", "0.61", "0.6", "higher") in table


def table_rows(ax):
    cells = ax.tables[0].get_celld()
    n_rows = max(r for r, _ in cells) + 1
    n_cols = max(c for _, c in cells) + 1
    return [[cells[r, c] for c in range(n_cols)] for r in range(n_rows)]


def test_report_files_hold_the_same_data(tmp_path):
    from matplotlib.image import imread

    results, details, meta = made_up_report()
    written = write_report(tmp_path, results, [], {k: v for k, v in meta.items() if k != "date"}, details)
    report = json.loads((tmp_path / "eval_report.json").read_text(encoding="utf-8"))
    assert report["results"] == results and report["details"] == details and report["meta"]["date"] == written["date"]
    height, width, _ = imread(tmp_path / "eval_report.png").shape
    assert width >= 1200 and height >= 600  # one picture, readable at a glance, not a thumbnail
