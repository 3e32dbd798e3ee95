"""The evaluation report: eval_report.json, eval_report.md and eval_report.png (base vs tuned; keel/evals/figure.py).

The Markdown holds the headline table (one column per row: base, tuned or model), the identity
matrix (hit rate per cell and language), leakage counts per language and set, and notes such as how
"no system turn" was rendered.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path

from keel.core.files import atomic_write, write_json

# Metrics shown in the table and chart, in order; lower is better for leakage and drift.
SHOWN = ["identity_robustness", "identity_mean", "identity_en", "identity_zh", "leakage", "leakage_en", "leakage_zh",
         "leakage_contrast", "arc_easy_acc_norm", "piqa_acc_norm", "drift_kl", "drift_nll"]
CELL_KEY = re.compile(r"identity_(en|zh)_")   # per-cell rates: shown in the matrix table instead


def metric_names(results: dict) -> list[str]:
    keys = {k for r in results.values() for k in r if not CELL_KEY.match(k)}
    return [k for k in SHOWN if k in keys] + sorted(k for k in keys if k not in SHOWN)


def _fmt(value) -> str:
    return "" if value is None else f"{value:g}"


def markdown(results: dict, details: dict | None = None) -> str:
    """The headline table, then (when `details` has them) the matrix and the leakage counts."""
    cols = list(results)
    lines = ["| metric | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for k in metric_names(results):
        lines.append(f"| {k} | " + " | ".join(_fmt(results[c].get(k)) for c in cols) + " |")
    details = details or {}
    rows = [c for c in cols if details.get(c, {}).get("cells")]
    if rows:
        lines += ["", "identity hit rate per cell (hits/asked); robustness = the lowest cell", "",
                  "| cell | " + " | ".join(f"{c} {lang}" for c in rows for lang in ("en", "zh")) + " |",
                  "| --- |" + " --- |" * (2 * len(rows))]
        names = list(dict.fromkeys(name for c in rows for name in details[c]["cells"]))
        for name in names:
            out = []
            for c in rows:
                for lang in ("en", "zh"):
                    cell = details[c]["cells"].get(name, {}).get(lang)
                    out.append(f"{cell['rate']:g} ({cell['hits']}/{cell['asked']})" if cell else "")
            lines.append(f"| {name} | " + " | ".join(out) + " |")
        lines.append("")
        lines += [f"{c}: worst cell {details[c]['worst_cell']}" for c in rows if details[c].get("worst_cell")]
    leak_rows = [c for c in cols if details.get(c, {}).get("counts")]
    if leak_rows:
        keys = list(dict.fromkeys(k for c in leak_rows for k in details[c]["counts"]))
        lines += ["", "leaks (answers naming the new identity / asked)", "",
                  "| set | " + " | ".join(leak_rows) + " |", "| --- |" + " --- |" * len(leak_rows)]
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(
                "{}/{}".format(*details[c]["counts"][k]) if k in details[c]["counts"] else "" for c in leak_rows) + " |")
    return "\n".join(lines)


def write_report(out_dir: Path, results: dict, samples: list, meta: dict, details: dict | None = None) -> dict:
    """eval_report.json (every figure and answer), .md (the tables) and .png (draw_report: the same figures); returns
    the report's meta, dated."""
    from keel.evals.figure import draw_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.datetime.now().isoformat(timespec="minutes"), **meta}
    write_json(out_dir / "eval_report.json", {"meta": meta, "results": results, "details": details or {},
                                              "samples": samples})
    text = markdown(results, details)
    for note in meta.get("notes", []):
        text += f"\n\nnote: {note}"
    atomic_write(out_dir / "eval_report.md", text + "\n")
    draw_report(out_dir / "eval_report.png", results, details or {}, meta)
    return meta


def card_scores(results: dict, meta: dict, out_dir: Path, measured_on: str) -> dict:
    """The headline figures of each row for a model card (keel/model/card.py), dated, with the report's path."""
    headline = [k for k in metric_names(results) if k in SHOWN or k.endswith(("_acc", "_acc_norm"))]
    rows = {row: {k: r[k] for k in headline if isinstance(r.get(k), (int, float))} for row, r in results.items()}
    return {"date": meta.get("date"), "machine": meta.get("machine"), "report": str(Path(out_dir)),
            "row": "tuned" if "tuned" in results else next(iter(results), None), "rows": rows,
            "measured_on": measured_on}
