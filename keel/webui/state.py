"""What the web UI's routers share: the output folders, the jobs, the chat apps of the loaded checkpoint.

    ui = UI(roots=[Path("output")], api_key=None, data_dirs=[Path("data")])
    app.add_middleware(Forward, ui=ui)              # the API key on /api/; /v1/ and /base/v1/ to the chat apps
    form = await body_of(request, forms.RunForm)    # a strictly validated request body, or a 400
"""

from __future__ import annotations

import asyncio
import hmac
from pathlib import Path

from fastapi import Request
from pydantic import BaseModel

from keel.core.errors import KeelError
from keel.serve.api import ApiError, json_body, validate
from keel.webui.runs import Jobs, inside


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
    """What the endpoints share: the output folders (and the folders general data may come from besides them),
    the jobs, the chat apps and their checkpoint. `lock` is held only for a moment (a folder checked free and its
    job started); loading chat models has its own lock."""

    def __init__(self, roots: list[Path], api_key: str | None, data_dirs: list[Path] = ()):
        self.roots = [r.resolve() for r in roots]
        for r in self.roots:
            r.mkdir(parents=True, exist_ok=True)
        self.data_dirs = [d.resolve() for d in data_dirs]
        self.api_key = api_key
        self.jobs = Jobs(self.roots)
        self.chat: dict = {}
        self.loaded: dict = {}
        self.tokenizers: dict = {}
        self.lock = asyncio.Lock()
        self.chat_lock = asyncio.Lock()

    def close(self):
        """Shutting down (keel deploy's Server calls app.state.queue.close()): stop the chat generations."""
        for side in ("tuned", "base"):
            if side in self.chat:
                self.chat[side].state.queue.close()

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
    return validate(model, await json_body(request))
