"""The web UI's Train tab: the estimate, a run started as `keel sft` in a child process, the run list with live
logs, and the jobs (train, eval, export, feedback) every tab polls and stops.

    app.include_router(router(ui))      # /api/estimate, /api/runs, /api/runs/log, /api/jobs, /api/jobs/{id}[/stop]
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request

from keel.core.errors import KeelError
from keel.core.files import write_json
from keel.serve.api import ApiError
from keel.webui import forms
from keel.webui.identity_view import check_rows, identity_rows
from keel.webui.runs import checkpoints, list_runs, read_log
from keel.webui.state import UI, body_of


async def run_plan(ui: UI, form: forms.RunForm):
    """The form with its defaults, and everything a run needs: identity, model, folder, data, keel sft's argv."""
    form, fixed = forms.with_defaults(form)
    names, authors = forms.identity_of(form)
    model = forms.check_model(form.model)
    folder = forms.run_folder(form.folder, ui.roots[0])
    general = await asyncio.to_thread(forms.check_general, form.general, ui.roots + ui.data_dirs)
    rows = forms.row_dicts(form.rows) if form.rows else (await identity_rows(form))[3]
    # One data file per run: an earlier run in the folder keeps the file its args.json names.
    data = folder / f"self_cognition-{time.strftime('%Y%m%d-%H%M%S')}.json"
    argv = forms.sft_argv(form, names, authors, model, data, general, folder, fixed)
    return form, names, authors, model, folder, general, rows, data, argv


def router(ui: UI) -> APIRouter:
    r = APIRouter()

    @r.post("/api/estimate")
    async def estimate(request: Request):
        form = await body_of(request, forms.RunForm)
        form, names, authors, model, folder, general, rows, data, argv = await run_plan(ui, form)
        path, tok = await asyncio.to_thread(ui.tokenizer, model)
        return await asyncio.to_thread(forms.estimate, path, rows, general, form, tok, ui.roots)

    @r.post("/api/runs")
    async def start_run(request: Request):
        form = await body_of(request, forms.RunForm)
        form, names, authors, model, folder, general, rows, data, argv = await run_plan(ui, form)
        errors = [f for f in await check_rows(ui, rows, names, authors, form, model, form.max_length) if f["row"]]
        if errors:
            raise ApiError(400, f"the identity rows have {len(errors)} problem(s): row {errors[0]['row']}: "
                           f"{errors[0]['message']}", "rows", "data_check_failed")
        async with ui.lock:  # two requests for one folder: the second sees the first's job
            try:
                ui.jobs.check_free(folder)  # before a byte is written there
            except KeelError as e:
                raise ApiError(409, str(e), "folder", "folder_busy") from None
            try:
                folder.mkdir(parents=True, exist_ok=True)
                write_json(data, rows, indent=1)
                return ui.jobs.start("train", argv, folder, {"name": names, "author": authors})
            except (KeelError, OSError) as e:
                data.unlink(missing_ok=True)  # no run started: nothing of it stays behind
                reason = e.strerror if isinstance(e, OSError) else str(e)
                raise ApiError(400, f"folder: cannot start a run in {folder} ({reason})", "folder") from None

    @r.get("/api/runs")
    async def runs():
        return {"runs": await asyncio.to_thread(list_runs, ui.roots, ui.jobs)}

    @r.get("/api/runs/log")
    async def run_log(path: str, since: int = 0):
        run = ui.inside(path)
        if not (run / "args.json").is_file():
            raise ApiError(404, f"'{path}' is not a run folder (no args.json)", "path", kind="not_found_error")
        rows = await asyncio.to_thread(read_log, run)
        return {"rows": rows[since:], "next": len(rows), "checkpoints": [str(c) for c in checkpoints(run)]}

    add_job_routes(r, ui)
    return r


def add_job_routes(r: APIRouter, ui: UI):
    """The child processes of every tab: listed, read with their log's tail, stopped."""

    @r.get("/api/jobs")
    async def jobs():
        return {"jobs": ui.jobs.list()}

    @r.get("/api/jobs/{job_id}")
    async def job(job_id: str):
        try:
            return {**ui.jobs.read(job_id), "log_tail": ui.jobs.log_tail(job_id)}
        except KeelError as e:
            raise ApiError(404, str(e), kind="not_found_error") from None

    @r.post("/api/jobs/{job_id}/stop")
    async def stop(job_id: str):
        try:
            ui.jobs.read(job_id)
        except KeelError as e:
            raise ApiError(404, str(e), kind="not_found_error") from None
        try:
            return await asyncio.to_thread(ui.jobs.stop, job_id)
        except KeelError as e:
            raise ApiError(409, str(e)) from None
