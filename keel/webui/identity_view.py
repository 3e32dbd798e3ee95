"""The web UI's Identity tab: the rows `keel data identity` writes for a name and maker, and `keel data check`'s
findings on them (edited or not).

    app.include_router(router(ui))      # POST /api/identity/preview, POST /api/identity/check
"""

from __future__ import annotations

import asyncio
import uuid

from fastapi import APIRouter, Request

from keel.core.files import write_json
from keel.webui import forms
from keel.webui.state import UI, body_of


async def identity_rows(form):
    """(names, authors, model, rows, kinds) for an identity form: the builder's rows, built in a worker thread."""
    names, authors = forms.identity_of(form)
    model = forms.check_model(form.model)
    rows, kinds = await asyncio.to_thread(forms.preview_rows, names, authors, form.system)
    return names, authors, model, rows, kinds


async def check_rows(ui: UI, rows, names, authors, form, model, max_length=2048) -> list[dict]:
    """Run keel data check on the rows, written whole to a scratch file of this request's own in the first output
    folder (no lock: a slow check holds up no other request)."""
    scratch = ui.roots[0] / ".webui" / f"check-{uuid.uuid4().hex}.json"
    try:
        await asyncio.to_thread(write_scratch, scratch, rows)
        _, tok = await asyncio.to_thread(ui.tokenizer, model)
        return await asyncio.to_thread(forms.findings, scratch, names, authors, form.system, tok, max_length)
    finally:
        scratch.unlink(missing_ok=True)


def write_scratch(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, rows, indent=None)


def router(ui: UI) -> APIRouter:
    r = APIRouter()

    @r.post("/api/identity/preview")
    async def preview(request: Request):
        form = await body_of(request, forms.IdentityForm)
        names, authors, model, rows, kinds = await identity_rows(form)
        found = await check_rows(ui, rows, names, authors, form, model)
        return {"rows": rows, "kinds": kinds, "findings": found, "names": names, "authors": authors}

    @r.post("/api/identity/check")
    async def check(request: Request):
        form = await body_of(request, forms.CheckForm)
        names, authors = forms.identity_of(form)
        model = forms.check_model(form.model)
        return {"findings": await check_rows(ui, forms.row_dicts(form.rows), names, authors, form, model)}

    return r
