"""The web UI's Compare tab: a checkpoint (and its base model) loaded as keel deploy's chat apps, `keel eval` in a
child process and its report.

    app.include_router(router(ui))      # POST /api/chat/load, POST /api/eval, GET /api/eval/report
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fastapi import APIRouter, Request
from pydantic import BaseModel

from keel.core.errors import KeelError
from keel.serve.api import STRICT, ApiError
from keel.webui.state import UI, body_of


class CheckpointForm(BaseModel):
    model_config = STRICT
    checkpoint: str
    base: bool = False


class EvalForm(BaseModel):
    model_config = STRICT
    checkpoint: str
    tasks: str = "identity,leakage,drift"
    full: bool = False


def router(ui: UI) -> APIRouter:
    r = APIRouter()

    @r.post("/api/chat/load")
    async def load(request: Request):
        form = await body_of(request, CheckpointForm)
        ckpt = ui.checkpoint(form.checkpoint)
        async with ui.chat_lock:
            await asyncio.to_thread(load_chat, ui, ckpt, form.base)
        return {"loaded": {k: str(v) for k, v in ui.loaded.items()}}

    @r.post("/api/eval")
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

    @r.get("/api/eval/report")
    async def eval_report(checkpoint: str):
        ckpt = ui.checkpoint(checkpoint)
        folder = ckpt.parent / f"eval-{ckpt.name}"
        if not (folder / "eval_report.json").is_file():
            raise ApiError(404, f"no report yet for {ckpt.name} (press Evaluate)", kind="not_found_error")
        report = json.loads((folder / "eval_report.json").read_text(encoding="utf-8"))
        from keel.evals.report import metric_names

        return {"results": report["results"], "metrics": metric_names(report["results"]),
                "markdown": (folder / "eval_report.md").read_text(encoding="utf-8")}

    return r


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
