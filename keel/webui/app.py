"""The FastAPI app behind `keel web-ui`: the page, /api/ for identity, runs, eval, export and feedback,
and keel deploy's own chat server (/v1/, plus /base/v1/ for the base model in the compare view).

    app = create_app(roots=[Path("output")], api_key=None, data_dirs=[])
    uvicorn.run(app, host="127.0.0.1", port=7860)

One router per tab (identity_view.py, train_view.py, compare_view.py, chat_view.py, export_view.py), each built
from the shared state (state.py `UI`); errors.py holds the error handlers they share. Everything slow or fallible
runs as a child process (`python -m keel sft|eval|export|feedback`, see runs.py), so the UI outlives it. Only
the chat and compare models live in this process: loading a checkpoint builds keel deploy's app for it
(keel/serve/server.py `create_app`: the same validation, queue, streaming and 👍/👎 store as `keel deploy`) and
requests to /v1/ go to it. Paths in requests must lie inside the output folders (403 otherwise; general data
may also come from the --allow_data_dir folders). Errors are one line in OpenAI's error form, never a 500.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse

from keel.serve.api import ApiError, Guard
from keel.webui import chat_view, compare_view, evals_view, export_view, forms, identity_view, train_view
from keel.webui.errors import add_error_handlers
from keel.webui.state import UI, Forward

PAGES = Path(__file__).resolve().parents[1] / "static" / "webui"

# The tabs' routers, each built from the shared UI state; a new view adds its module's `router` here.
VIEWS = (identity_view.router, train_view.router, compare_view.router, chat_view.router, export_view.router)


def create_app(roots: list[Path], api_key: str | None = None, max_body: int = 4 << 20,
               data_dirs: list[Path] = ()) -> FastAPI:
    app = FastAPI(title="Keel web UI")
    # keel deploy's Server closes app.state.queue on shutdown: the UI stops its chat apps' generations.
    ui = app.state.ui = app.state.queue = UI(roots, api_key, data_dirs)
    app.add_middleware(Forward, ui=ui)
    app.add_middleware(Guard, api_key=api_key, max_body=max_body)
    add_error_handlers(app)
    app.include_router(pages(ui))
    for view in VIEWS:
        app.include_router(view(ui))
    app.include_router(evals_view.router)  # the Eval view: reports under the output folders
    return app


def pages(ui: UI) -> APIRouter:
    """The page and its files, and the settings it opens with."""
    r = APIRouter()

    @r.get("/")
    async def page():
        return FileResponse(PAGES / "index.html")

    @r.get("/ui/{name}")
    async def asset(name: str):
        if name not in ("app.js", "style.css", "curves.js"):
            raise ApiError(404, f"no file '{name}'", kind="not_found_error")
        return FileResponse(PAGES / name)

    @r.get("/api/config")
    async def config():
        return {"roots": [str(r) for r in ui.roots], "defaults": forms.form_defaults(),
                "loaded": {k: str(v) for k, v in ui.loaded.items()}}

    return r
