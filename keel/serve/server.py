"""The OpenAI-compatible HTTP server behind `keel deploy`, with the web chat and feedback.

    app = create_app(model, tokenizer, info, api_key=None, store=FeedbackStore("feedback.sqlite"))
    make_server(app, "127.0.0.1", 8000).run()

Requests are validated as strictly as the OpenAI API does it and tokenized in a worker thread
(keel/deploy/api.py), then take turns on the model (keel/deploy/gate.py): one generation at a time,
at most --max_queue waiting (429 beyond), each request within --request_timeout; a client that
leaves, streaming or not, stops its generation or leaves the queue at once. Every answer is recorded
so a rating can refer to it by id; a store that fails mid-run is logged and never costs an answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import aclosing
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from keel.serve.api import ApiError, FeedbackRequest, Guard, parse_chat, validate
from keel.serve.queue import Gate, Gone

STATIC = Path(__file__).resolve().parents[1] / "static"
log = logging.getLogger("keel.serve")


def context_length(model, tokenizer) -> int:
    return int(getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length)


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    hits = [text.index(s) for s in stop if s and s in text]
    return (text[:min(hits)], True) if hits else (text, False)


def finish_reason(outcome: dict) -> str:
    return "stop" if outcome.get("stop_hit") else outcome.get("finish_reason", "stop")


class Server(uvicorn.Server):
    """uvicorn's server; on shutdown (SIGTERM, Ctrl-C) it first stops the running generation and
    answers the waiting requests 503, so stopping takes a token's time, not the whole queue's."""

    async def shutdown(self, sockets=None):
        self.config.app.state.gate.close()
        await super().shutdown(sockets)


def make_server(app: FastAPI, host: str, port: int) -> Server:
    return Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10))


async def wait_until_gone(request: Request, left: asyncio.Event):
    """Set `left` when the client hangs up (the body is read: what arrives now is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    left.set()


def create_app(model, tokenizer, info, api_key: str | None = None, store=None, model_id: str = "keel",
               max_body: int = 1 << 20, max_queue: int = 64, request_timeout: float = 300.0) -> FastAPI:
    app = FastAPI(title="Keel")
    app.add_middleware(Guard, api_key=api_key, max_body=max_body)
    gate = app.state.gate = Gate(max_queue, request_timeout)
    ctx = context_length(model, tokenizer)
    store_failure: list[str] = []  # the last write error of the feedback store, if any

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect):
        return Response(status_code=499)  # left while sending its body: nobody to answer

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.exception("keel deploy: internal error on %s", request.url.path)
        return ApiError(500, f"internal server error: {type(exc).__name__}", kind="server_error").response()

    @app.get("/health")
    async def health():
        return {"status": "shutting_down" if gate.closing else "ok", "model": model_id, "generating": gate.busy,
                "waiting": len(gate.waiters), **gate.stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "keel"}]}

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html")

    async def answer(chat, left: asyncio.Event, outcome: dict):
        """Yield the answer's text pieces in turn; stop at a stop string (finish_reason "stop")."""
        text = ""
        async with aclosing(gate.generate(model, tokenizer, chat, left, outcome)) as pieces:
            async for piece in pieces:
                new, hit = cut_at_stop(text + piece, chat.stop)
                if len(new) > len(text):
                    yield new[len(text):]
                text = new
                if hit:
                    outcome["stop_hit"] = True  # the generation thread may still write its own finish_reason
                    break

    async def record(cid: str, chat, answer_text: str):
        """Store the answer for ratings; a failing store is logged loudly and never costs the client its answer."""
        if store is None:
            return
        first = chat.messages[0]
        try:
            await asyncio.to_thread(store.record_completion, cid, model_id,
                                    first["content"] if first["role"] == "system" else None,
                                    [m for m in chat.messages if m["role"] != "system"], answer_text)
        except Exception as e:  # sqlite3.Error (disk full, read-only), OSError
            store_failure[:] = [f"{type(e).__name__}: {e}"]
            log.error("keel deploy: ERROR: could not record answer %s in the feedback store %s (%s); "
                      "the answer was delivered, its rating cannot be", cid, getattr(store, "path", ""), e)

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        gate.admit()  # refuse before reading a body when the queue is already full
        chat = await asyncio.to_thread(parse_chat, await request.body(), tokenizer, ctx, info.system)
        gate.admit()
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def usage(outcome: dict) -> dict:
            n_out = outcome.get("tokens", 0)
            return {"prompt_tokens": chat.n_prompt, "completion_tokens": n_out, "total_tokens": chat.n_prompt + n_out}

        if not chat.stream:
            left, outcome = asyncio.Event(), {}
            watcher = asyncio.ensure_future(wait_until_gone(request, left))
            try:
                async with aclosing(answer(chat, left, outcome)) as pieces:
                    text = "".join([p async for p in pieces])
            except Gone:
                return Response(status_code=499)  # nobody is listening
            finally:
                watcher.cancel()
            if left.is_set():
                return Response(status_code=499)  # generation stopped when the client left; nothing recorded
            gate.stats["answered"] += 1
            await record(cid, chat, text)
            return {"id": cid, "object": "chat.completion", "created": created, "model": model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": finish_reason(outcome)}],
                    "usage": usage(outcome)}

        def event(data: dict) -> str:
            return "data: " + json.dumps(data, ensure_ascii=False) + "\n\n"

        def chunk(delta: dict, finish=None) -> str:
            return event({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                          "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        async def events():
            # A client that leaves makes Starlette cancel this generator, which stops the generation or
            # takes the request out of the queue.
            outcome, parts = {}, []
            yield chunk({"role": "assistant", "content": ""})
            try:
                async with aclosing(answer(chat, asyncio.Event(), outcome)) as pieces:
                    async for piece in pieces:
                        parts.append(piece)
                        yield chunk({"content": piece})
            except ApiError as e:  # the status line is sent: the error goes in the stream, as OpenAI does
                yield event(e.body())
                return
            except Exception as e:
                log.exception("keel deploy: internal error while streaming %s", cid)
                yield event(ApiError(500, f"internal server error: {type(e).__name__}", kind="server_error").body())
                return
            gate.stats["answered"] += 1
            await record(cid, chat, "".join(parts))
            yield chunk({}, finish_reason(outcome))
            if chat.include_usage:
                yield event({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                             "choices": [], "usage": usage(outcome)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        req = validate(FeedbackRequest, await request.body())
        if store is None:
            raise ApiError(400, "this server records no feedback (no --feedback_db)")
        try:
            found = await asyncio.to_thread(store.add_feedback, req.id, req.rating, req.correction)
        except Exception as e:  # sqlite3.Error (disk full, read-only), OSError
            store_failure[:] = [f"{type(e).__name__}: {e}"]
            log.error("keel deploy: ERROR: could not record a rating in the feedback store %s (%s)",
                      getattr(store, "path", ""), e)
            raise ApiError(503, f"the feedback store cannot be written ({e}); the rating was not recorded",
                           kind="server_error", code="feedback_store_failed") from None
        if not found and store_failure:
            raise ApiError(503, f"no answer with id '{req.id}': the feedback store has been failing "
                           f"({store_failure[0]}), so it may not have been recorded", "id",
                           "feedback_store_failed", kind="server_error")
        if not found:
            raise ApiError(404, f"no answer with id '{req.id}'", "id", kind="not_found_error")
        return {"status": "recorded", "id": req.id}

    return app
