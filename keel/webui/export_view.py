"""The web UI's Export tab: `keel export` (merged weights or GGUF, with its verification table) in a child process.

    app.include_router(router(ui))      # POST /api/export
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from keel.core.errors import KeelError
from keel.serve.api import STRICT, ApiError
from keel.webui.state import UI, body_of


class ExportForm(BaseModel):
    model_config = STRICT
    checkpoint: str
    to: str = "hf"
    quant: str = "f16"
    overwrite: bool = False


def router(ui: UI) -> APIRouter:
    r = APIRouter()

    @r.post("/api/export")
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

    return r
