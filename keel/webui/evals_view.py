"""The Eval view of `keel web-ui`: every evaluation report under the output folders, served from its
eval_report.json so the page draws the robustness matrix and the leakage itself (no image round-trip).

    GET /api/evals                        -> {"reports": [{"path", "name", "date", "adapters", "headline"}, ...]}
    GET /api/evals/report?path=FOLDER     -> {"path", "meta", "results", "details", "headline"} (answers left out)
    GET /evals/evals.js                   -> the view's script (keel/static/webui/evals.js)

Reports are what `keel eval` writes (RUN/eval-checkpoint-N/) and the recipe's (OUTPUT_DIR/report/), found
wherever they lie under the output folders. A folder outside them is refused (403), a folder without a
report is 404, and a report that is not readable JSON is a one-line 400.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from keel.serve.api import ApiError

PAGES = Path(__file__).resolve().parents[1] / "static" / "webui"
REPORT = "eval_report.json"
# What the list shows of each row (the view shows every cell once a report is chosen).
HEADLINE = ("identity_robustness", "identity_mean", "identity_en", "identity_zh", "leakage", "leakage_en",
            "leakage_zh", "leakage_contrast", "drift_kl", "drift_nll")

router = APIRouter()


def find_reports(roots: list[Path]) -> list[Path]:
    """Folders holding an eval_report.json under the roots (the web UI's own scratch folder left out)."""
    found = {p.parent for root in roots for p in root.rglob(REPORT) if ".webui" not in p.parts}
    return sorted(found)


def read_report(folder: Path) -> dict:
    """The report without its answers; ApiError(400) naming the file when it is not a readable report."""
    path = folder / REPORT
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(report, dict) or not isinstance(report.get("results"), dict):
            raise ValueError("no results")
    except (OSError, ValueError) as e:
        reason = f"line {e.lineno}: not valid JSON" if isinstance(e, json.JSONDecodeError) else str(e)
        raise ApiError(400, f"{path}: not a readable evaluation report ({reason})", "path") from None
    meta = report.get("meta") if isinstance(report.get("meta"), dict) else {}
    headline = {row: {k: r.get(k) for k in HEADLINE if isinstance(r, dict) and k in r}
                for row, r in report["results"].items()}
    return {"path": str(folder), "meta": meta, "results": report["results"],
            "details": report.get("details") or {}, "headline": headline}


def summary(folder: Path, roots: list[Path]) -> dict | None:
    try:
        report = read_report(folder)
    except ApiError:
        return None  # listed reports are the readable ones; opening a broken one says why
    root = next((r for r in roots if folder.is_relative_to(r)), folder)
    meta = report["meta"]
    adapters = (meta.get("model") or {}).get("adapters") or ([meta["checkpoint"]] if meta.get("checkpoint") else [])
    return {"path": str(folder), "name": str(folder.relative_to(root)), "date": meta.get("date"),
            "adapters": adapters, "headline": report["headline"]}


@router.get("/api/evals")
async def list_reports(request: Request):
    ui = request.app.state.ui

    def collect():
        items = [summary(f, ui.roots) for f in find_reports(ui.roots)]
        return sorted((i for i in items if i), key=lambda i: (i["date"] or "", i["path"]), reverse=True)

    return {"reports": await asyncio.to_thread(collect)}


@router.get("/api/evals/report")
async def report(request: Request, path: str):
    folder = request.app.state.ui.inside(path)
    if not (folder / REPORT).is_file():
        raise ApiError(404, f"no {REPORT} in '{path}'", "path", kind="not_found_error")
    return await asyncio.to_thread(read_report, folder)


@router.get("/evals/evals.js")
async def script():
    return FileResponse(PAGES / "evals.js")
