"""The FastAPI app behind `keel web-ui`: the page, /api/ for identity, runs, eval, export and feedback,
and keel deploy's own chat server (/v1/, plus /base/v1/ for the base model in the compare view).

    app = create_app(roots=[Path("output")], api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=7860)

Everything slow or fallible runs as a child process (`python -m keel sft|eval|export|feedback`, see
runs.py), so the UI outlives it. Only the chat and compare models live in this process: loading a
checkpoint builds keel deploy's app for it (keel/deploy/server.py `create_app`: the same validation,
queue, streaming and 👍/👎 store as `keel deploy`) and requests to /v1/ go to it. Paths in requests must
lie inside the output folders (403 otherwise). Errors are one line in OpenAI's error form, never a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from keel.core.errors import KeelError
from keel.core.files import write_json
from keel.serve.api import STRICT, ApiError, Guard, validate
from keel.serve.server import STATIC as CHAT_STATIC
from keel.webui import evals_view, forms
from keel.webui.runs import Jobs, checkpoints, inside, list_runs, read_log

PAGES = Path(__file__).resolve().parents[1] / "static" / "webui"
log = logging.getLogger("keel.webui")


class CheckpointForm(BaseModel):
    model_config = STRICT
    checkpoint: str
    base: bool = False


class EvalForm(BaseModel):
    model_config = STRICT
    checkpoint: str
    tasks: str = "identity,leakage,drift"
    full: bool = False


class ExportForm(BaseModel):
    model_config = STRICT
    checkpoint: str
    to: str = "hf"
    quant: str = "f16"
    overwrite: bool = False


class FeedbackExportForm(BaseModel):
    model_config = STRICT
    checkpoint: str
    include_good: bool = False
    kind: str = "sft"


class Forward:
    """Pure ASGI: the API key on /api/ (as keel deploy's Guard checks /v1/), and /v1/ and /base/v1/ to the
    keel deploy apps of the loaded checkpoint and its base model."""

    def __init__(self, app, ui):
        self.app, self.ui = app, ui

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        expected = f"Bearer {self.ui.api_key}".encode() if self.ui.api_key else None
        if path.startswith("/api/") and expected and not hmac.compare_digest(
                dict(scope["headers"]).get(b"authorization", b""), expected):
            return await ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                  kind="authentication_error", code="invalid_api_key").response()(scope, receive, send)
        side = "base" if path.startswith("/base/v1/") else "tuned" if path.startswith("/v1/") else None
        if side is None:
            return await self.app(scope, receive, send)
        target = self.ui.chat.get(side)
        if target is None:
            return await ApiError(409, "no checkpoint is loaded for chat: choose one and press Load",
                                  code="no_model").response()(scope, receive, send)
        if side == "base":
            scope = {**scope, "path": path[len("/base"):], "raw_path": scope.get("raw_path", b"")[len(b"/base"):]}
        return await target(scope, receive, send)


class UI:
    """What the endpoints share: the output folders, the jobs, the chat apps and their checkpoint."""

    def __init__(self, roots: list[Path], api_key: str | None):
        self.roots = [r.resolve() for r in roots]
        for r in self.roots:
            r.mkdir(parents=True, exist_ok=True)
        self.api_key = api_key
        self.jobs = Jobs(self.roots)
        self.chat: dict = {}
        self.loaded: dict = {}
        self.tokenizers: dict = {}
        self.lock = asyncio.Lock()

    def close(self):
        """Shutting down (keel deploy's Server calls app.state.gate.close()): stop the chat generations."""
        for side in ("tuned", "base"):
            if side in self.chat:
                self.chat[side].state.gate.close()

    def inside(self, path: str) -> Path:
        try:
            return inside(path, self.roots)
        except KeelError as e:
            raise ApiError(403, str(e), code="outside_output_folders") from None

    def checkpoint(self, path: str) -> Path:
        ckpt = self.inside(path)
        if not (ckpt / "adapter_config.json").is_file():
            raise ApiError(404, f"'{path}' is not a checkpoint (no adapter_config.json)", "checkpoint", kind="not_found_error")
        return ckpt

    def tokenizer(self, model: str | None):
        from keel.model.load import load_tokenizer, resolve_model_path

        path = resolve_model_path(model)[0]
        if path not in self.tokenizers:
            self.tokenizers[path] = load_tokenizer(path)
        return path, self.tokenizers[path]


async def body_of(request: Request, model: type[BaseModel]):
    return validate(model, await request.body())


def create_app(roots: list[Path], api_key: str | None = None, max_body: int = 16 << 20) -> FastAPI:
    app = FastAPI(title="Keel web UI")
    ui = app.state.ui = app.state.gate = UI(roots, api_key)
    app.add_middleware(Forward, ui=ui)
    app.add_middleware(Guard, api_key=api_key, max_body=max_body)
    app.include_router(evals_view.router)  # the Eval view: reports under the output folders

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # unknown path, wrong method
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                        kind="not_found_error" if exc.status_code == 404 else "invalid_request_error").response()

    @app.exception_handler(RequestValidationError)
    async def bad_query(request: Request, exc: RequestValidationError):  # a missing or mistyped ?param=
        err = exc.errors()[0]
        param = str(err["loc"][-1]) if err.get("loc") else None
        return ApiError(400, f"'{param}': {err['msg']}", param).response()

    @app.exception_handler(KeelError)
    async def keel_error(request: Request, exc: KeelError):
        return ApiError(400, " ".join(str(exc).split())).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.exception("keel web-ui: internal error on %s", request.url.path)
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error").response()

    @app.get("/")
    async def page():
        return FileResponse(PAGES / "index.html")

    @app.get("/ui/{name}")
    async def asset(name: str):
        if name not in ("app.js", "style.css", "curves.js"):
            raise ApiError(404, f"no file '{name}'", kind="not_found_error")
        return FileResponse(PAGES / name)

    @app.get("/chat")
    async def chat_page():
        return FileResponse(CHAT_STATIC / "index.html")  # keel deploy's web chat, talking to /v1/ here

    @app.get("/api/config")
    async def config():
        return {"roots": [str(r) for r in ui.roots], "defaults": forms.form_defaults(),
                "loaded": {k: str(v) for k, v in ui.loaded.items()}}

    async def identity_rows(form):
        names, authors = forms.identity_of(form)
        model = forms.check_model(form.model)
        rows, kinds = await asyncio.to_thread(forms.preview_rows, names, authors, form.system)
        return names, authors, model, rows, kinds

    async def check_rows(rows, names, authors, form, model, max_length=2048) -> list[dict]:
        """Run keel data check on the rows, written whole to a scratch file in the first output folder."""
        scratch = ui.roots[0] / ".webui" / "check.json"
        scratch.parent.mkdir(parents=True, exist_ok=True)
        async with ui.lock:
            write_json(scratch, rows, indent=None)
            _, tok = await asyncio.to_thread(ui.tokenizer, model)
            return await asyncio.to_thread(forms.findings, scratch, names, authors, form.system, tok, max_length)

    @app.post("/api/identity/preview")
    async def preview(request: Request):
        form = await body_of(request, forms.IdentityForm)
        names, authors, model, rows, kinds = await identity_rows(form)
        found = await check_rows(rows, names, authors, form, model)
        return {"rows": rows, "kinds": kinds, "findings": found, "names": names, "authors": authors}

    @app.post("/api/identity/check")
    async def check(request: Request):
        form = await body_of(request, forms.CheckForm)
        names, authors = forms.identity_of(form)
        model = forms.check_model(form.model)
        return {"findings": await check_rows(forms.row_dicts(form.rows), names, authors, form, model)}

    async def run_plan(form: forms.RunForm):
        form, fixed = forms.with_defaults(form)
        names, authors = forms.identity_of(form)
        model = forms.check_model(form.model)
        folder = forms.run_folder(form.folder, ui.roots[0])
        general = await asyncio.to_thread(forms.check_general, form.general)
        rows = forms.row_dicts(form.rows) if form.rows else (await identity_rows(form))[3]
        # One data file per run: an earlier run in the folder keeps the file its args.json names.
        data = folder / f"self_cognition-{time.strftime('%Y%m%d-%H%M%S')}.json"
        argv = forms.sft_argv(form, names, authors, model, data, general, folder, fixed)
        return form, names, authors, model, folder, general, rows, data, argv

    @app.post("/api/estimate")
    async def estimate(request: Request):
        form = await body_of(request, forms.RunForm)
        form, names, authors, model, folder, general, rows, data, argv = await run_plan(form)
        path, tok = await asyncio.to_thread(ui.tokenizer, model)
        return await asyncio.to_thread(forms.estimate, path, rows, general, form, tok, ui.roots)

    @app.post("/api/runs")
    async def start_run(request: Request):
        form = await body_of(request, forms.RunForm)
        form, names, authors, model, folder, general, rows, data, argv = await run_plan(form)
        errors = [f for f in await check_rows(rows, names, authors, form, model, form.max_length) if f["row"]]
        if errors:
            raise ApiError(400, f"the identity rows have {len(errors)} problem(s): row {errors[0]['row']}: "
                           f"{errors[0]['message']}", "rows", "data_check_failed")
        async with ui.lock:  # two requests for one folder: the second sees the first's job
            try:
                ui.jobs.check_free(folder)  # before a byte is written there
                folder.mkdir(parents=True, exist_ok=True)
                write_json(data, rows, indent=1)
                return ui.jobs.start("train", argv, folder, {"name": names, "author": authors})
            except KeelError as e:
                raise ApiError(409, str(e), "folder", "folder_busy") from None
            except OSError as e:
                raise ApiError(400, f"folder: cannot write {folder} ({e.strerror})", "folder") from None

    @app.get("/api/runs")
    async def runs():
        return {"runs": await asyncio.to_thread(list_runs, ui.roots, ui.jobs)}

    @app.get("/api/runs/log")
    async def run_log(path: str, since: int = 0):
        run = ui.inside(path)
        if not (run / "args.json").is_file():
            raise ApiError(404, f"'{path}' is not a run folder (no args.json)", "path", kind="not_found_error")
        rows = await asyncio.to_thread(read_log, run)
        return {"rows": rows[since:], "next": len(rows), "checkpoints": [str(c) for c in checkpoints(run)]}

    @app.get("/api/jobs")
    async def jobs():
        return {"jobs": ui.jobs.list()}

    @app.get("/api/jobs/{job_id}")
    async def job(job_id: str):
        try:
            return {**ui.jobs.read(job_id), "log_tail": ui.jobs.log_tail(job_id)}
        except KeelError as e:
            raise ApiError(404, str(e), kind="not_found_error") from None

    @app.post("/api/jobs/{job_id}/stop")
    async def stop(job_id: str):
        try:
            ui.jobs.read(job_id)
        except KeelError as e:
            raise ApiError(404, str(e), kind="not_found_error") from None
        try:
            return await asyncio.to_thread(ui.jobs.stop, job_id)
        except KeelError as e:
            raise ApiError(409, str(e)) from None

    @app.post("/api/chat/load")
    async def load(request: Request):
        form = await body_of(request, CheckpointForm)
        ckpt = ui.checkpoint(form.checkpoint)
        async with ui.lock:
            await asyncio.to_thread(load_chat, ui, ckpt, form.base)
        return {"loaded": {k: str(v) for k, v in ui.loaded.items()}}

    @app.get("/api/feedback")
    async def feedback(checkpoint: str):
        from keel.serve.feedback import FeedbackStore

        db = ui.checkpoint(checkpoint).parent / "feedback.sqlite"
        if not db.is_file():
            return {"db": str(db), "up": 0, "down": 0, "corrected": 0}
        ratings = await asyncio.to_thread(lambda: FeedbackStore(db, readonly=True).ratings())
        return {"db": str(db), "up": sum(r["rating"] == "up" for r in ratings),
                "down": sum(r["rating"] == "down" for r in ratings),
                "corrected": sum(r["rating"] == "down" and bool(r["correction"]) for r in ratings)}

    @app.post("/api/feedback/export")
    async def feedback_export(request: Request):
        form = await body_of(request, FeedbackExportForm)
        run = ui.checkpoint(form.checkpoint).parent
        db = run / "feedback.sqlite"
        if not db.is_file():
            raise ApiError(400, f"no feedback recorded for this run yet ({db})", "checkpoint")
        if form.kind not in ("sft", "pairs"):
            raise ApiError(400, f"kind must be sft (bad cases as conversations) or pairs (chosen vs rejected), "
                           f"got '{form.kind}'", "kind")
        out = run / ("bad_cases.jsonl" if form.kind == "sft" else "pairs.jsonl")
        argv = ["feedback", "export", "--db", str(db), "-o", str(out)] + (
            ["--include_good", "true" if form.include_good else "false"] if form.kind == "sft" else ["--kind", "pairs"])
        return ui.jobs.start("feedback", argv, run, {"output": str(out)})

    @app.post("/api/eval")
    async def run_eval(request: Request):
        form = await body_of(request, EvalForm)
        ckpt = ui.checkpoint(form.checkpoint)
        from keel.evals.run import EvalArgs

        try:
            EvalArgs(tasks=form.tasks)
        except KeelError as e:
            raise ApiError(400, str(e), "tasks") from None
        # keel recipe identity's slice on CPU unless the whole matrix is asked for
        argv = ["eval", "--adapters", str(ckpt), "--tasks", form.tasks] + (
            [] if form.full else ["--questions_per_cell", "4", "--leakage_per_lang", "24"])
        return ui.jobs.start("eval", argv, ckpt.parent, {"report": str(ckpt.parent / f"eval-{ckpt.name}")})

    @app.get("/api/eval/report")
    async def eval_report(checkpoint: str):
        ckpt = ui.checkpoint(checkpoint)
        folder = ckpt.parent / f"eval-{ckpt.name}"
        if not (folder / "eval_report.json").is_file():
            raise ApiError(404, f"no report yet for {ckpt.name} (press Evaluate)", kind="not_found_error")
        report = json.loads((folder / "eval_report.json").read_text(encoding="utf-8"))
        from keel.evals.report import metric_names

        return {"results": report["results"], "metrics": metric_names(report["results"]),
                "markdown": (folder / "eval_report.md").read_text(encoding="utf-8")}

    @app.post("/api/export")
    async def run_export(request: Request):
        form = await body_of(request, ExportForm)
        ckpt = ui.checkpoint(form.checkpoint)
        from keel.export.run import ExportArgs

        try:
            ExportArgs(to=form.to, quant=form.quant)
        except KeelError as e:
            raise ApiError(400, str(e)) from None
        argv = ["export", "--adapters", str(ckpt), "--to", form.to, "--quant", form.quant,
                "--overwrite", "true" if form.overwrite else "false"]
        return ui.jobs.start("export", argv, ckpt.parent)

    return app


def load_chat(ui: UI, ckpt: Path, with_base: bool):
    """Build keel deploy's app for the checkpoint (answers rated into feedback.sqlite beside it, as keel deploy
    does) and, for the compare view, one for its base model with the same system prompt."""
    from keel.model.load import ModelArgs, load_model, read_adapter_args
    from keel.serve.feedback import FeedbackStore
    from keel.serve.server import create_app as deploy_app

    if ui.loaded.get("tuned") != ckpt:
        model, tok, info = load_model(ModelArgs(adapters=[str(ckpt)]))
        ui.chat["tuned"] = deploy_app(model, tok, info, api_key=ui.api_key, model_id=f"{ckpt.parent.name}/{ckpt.name}",
                                      store=FeedbackStore(ckpt.parent / "feedback.sqlite"))
        ui.chat["info"] = info
        ui.loaded["tuned"] = ckpt
    if with_base and ui.loaded.get("base") != ckpt:
        # A second copy of the base weights: the compare view streams both answers at once.
        saved = read_adapter_args(ckpt)  # the absolute path it trained on, when it is still there
        path = saved.get("base_model_path")
        base = path if path and Path(path).is_dir() else saved.get("model")
        model, tok, _ = load_model(ModelArgs(model=base))
        ui.chat["base"] = deploy_app(model, tok, ui.chat["info"], api_key=ui.api_key, model_id="base")
        ui.loaded["base"] = ckpt
