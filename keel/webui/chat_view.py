"""The web UI's Chat tab: keel deploy's web chat (talking to /v1/ here), the 👍/👎 count of the loaded
checkpoint and `keel feedback export` in a child process.

    app.include_router(router(ui))      # GET /chat, GET /api/feedback, POST /api/feedback/export
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel

from keel.serve.api import STRICT, ApiError
from keel.serve.server import STATIC as CHAT_STATIC
from keel.webui.state import UI, body_of


class FeedbackExportForm(BaseModel):
    model_config = STRICT
    checkpoint: str
    include_good: bool = False
    kind: str = "sft"


def router(ui: UI) -> APIRouter:
    r = APIRouter()

    @r.get("/chat")
    async def chat_page():
        return FileResponse(CHAT_STATIC / "index.html")  # keel deploy's web chat, talking to /v1/ here

    @r.get("/api/feedback")
    async def feedback(checkpoint: str):
        from keel.serve.feedback import FeedbackStore

        db = ui.checkpoint(checkpoint).parent / "feedback.sqlite"
        if not db.is_file():
            return {"db": str(db), "up": 0, "down": 0, "corrected": 0}
        ratings = await asyncio.to_thread(lambda: FeedbackStore(db, readonly=True).ratings())
        return {"db": str(db), "up": sum(r["rating"] == "up" for r in ratings),
                "down": sum(r["rating"] == "down" for r in ratings),
                "corrected": sum(r["rating"] == "down" and bool(r["correction"]) for r in ratings)}

    @r.post("/api/feedback/export")
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

    return r
