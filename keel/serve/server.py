"""The OpenAI-compatible HTTP server behind `keel deploy`, with the web chat and feedback.

    app = create_app(model, tokenizer, info, api_key=None, store=FeedbackStore("feedback.sqlite"))
    make_server(app, "127.0.0.1", 8000).run()

Requests are validated as strictly as the OpenAI API does it and tokenized in a worker thread
(keel/serve/api.py), then take turns on the model (keel/serve/queue.py): one generation at a time,
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
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from keel.model.generate import context_length
from keel.serve.api import ApiError, FeedbackRequest, Guard, json_body, parse_chat, validate
from keel.serve.queue import Gone, ModelQueue

STATIC = Path(__file__).resolve().parents[1] / "static"
log = logging.getLogger("keel.serve")


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    hits = [text.index(s) for s in stop if s and s in text]
    return (text[:min(hits)], True) if hits else (text, False)


def finish_reason(outcome: dict) -> str:
    return "stop" if outcome.get("stop_hit") else outcome.get("finish_reason", "stop")


class Server(uvicorn.Server):
    """uvicorn's server; on shutdown (SIGTERM, Ctrl-C) it first stops the running generation and
    answers the waiting requests 503, so stopping takes a token's time, not the whole queue's."""

    async def shutdown(self, sockets=None):
        self.config.app.state.queue.close()
        await super().shutdown(sockets)


def make_server(app: FastAPI, host: str, port: int, max_connections: int = 128) -> Server:
    """uvicorn with its limits set: at most about `max_connections` open at once (503 beyond), an idle kept-alive
    connection closed after 5 s, request heads over 16 KiB refused (h11's default)."""
    return Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10,
                                 limit_concurrency=max_connections, timeout_keep_alive=5))


async def wait_until_gone(request: Request, left: asyncio.Event):
    """Set `left` when the client hangs up (the body is read: what arrives now is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    left.set()


@dataclass
class Served:
    """What the routes share besides the queue: the model, its tokenizer and context, its name, the feedback store."""
    model: object
    tokenizer: object
    info: object
    model_id: str
    store: object | None
    context: int
    store_failure: list[str] = field(default_factory=list)  # the last write error of the feedback store, if any


def create_app(model, tokenizer, info, api_key: str | None = None, store=None, model_id: str = "keel",
               max_body: int = 1 << 20, max_queue: int = 64, request_timeout: float = 300.0,
               read_timeout: float = 10.0) -> FastAPI:
    app = FastAPI(title="Keel")
    app.add_middleware(Guard, api_key=api_key, max_body=max_body, read_timeout=read_timeout)
    app.state.queue = ModelQueue(max_queue, request_timeout)
    app.state.served = Served(model, tokenizer, info, model_id, store, context_length(model, tokenizer))
    add_error_handlers(app)
    app.include_router(routes)
    return app


def add_error_handlers(app: FastAPI):
    """Every error in OpenAI's form; a client that left mid-body gets nobody's answer."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # unknown path, wrong method
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message, code = f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})", "method_not_allowed"
        else:
            message, code = f"Invalid URL ({request.method} {request.url.path})", "unknown_url"
        return ApiError(exc.status_code, message, code=code, headers=exc.headers,
                        kind="not_found_error" if exc.status_code == 404 else "invalid_request_error").response()

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect):
        return Response(status_code=499)  # left while sending its body: nobody to answer

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.exception("keel deploy: internal error on %s", request.url.path)
        return ApiError(500, f"internal server error: {type(exc).__name__}", kind="server_error").response()


routes = APIRouter()


@routes.get("/health")
async def health(request: Request):
    queue, served = request.app.state.queue, request.app.state.served
    return {"status": "shutting_down" if queue.closing else "ok", "model": served.model_id, "generating": queue.busy,
            "waiting": len(queue.waiters), **queue.stats}


@routes.get("/v1/models")
async def models(request: Request):
    model_id = request.app.state.served.model_id
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "keel"}]}


@routes.get("/")
async def page():
    return FileResponse(STATIC / "index.html")


async def answer(queue: ModelQueue, served: Served, chat, left: asyncio.Event, outcome: dict):
    """Yield the answer's text pieces in turn; stop at a stop string (finish_reason "stop")."""
    text = ""
    async with aclosing(queue.generate(served.model, served.tokenizer, chat, left, outcome)) as pieces:
        async for piece in pieces:
            new, hit = cut_at_stop(text + piece, chat.stop)
            if len(new) > len(text):
                yield new[len(text):]
            text = new
            if hit:
                outcome["stop_hit"] = True  # the generation thread may still write its own finish_reason
                break


async def record(served: Served, cid: str, chat, answer_text: str):
    """Store the answer for ratings; a failing store is logged loudly and never costs the client its answer."""
    if served.store is None:
        return
    first = chat.messages[0]
    try:
        await asyncio.to_thread(served.store.record_completion, cid, served.model_id,
                                first["content"] if first["role"] == "system" else None,
                                [m for m in chat.messages if m["role"] != "system"], answer_text)
    except Exception as e:  # sqlite3.Error (disk full, read-only), OSError
        served.store_failure[:] = [f"{type(e).__name__}: {e}"]
        log.error("keel deploy: ERROR: could not record answer %s in the feedback store %s (%s); "
                  "the answer was delivered, its rating cannot be", cid, getattr(served.store, "path", ""), e)


@dataclass
class Reply:
    """One request's answer in the making: its id, its time, and the usage it reports."""
    chat: object
    model_id: str
    cid: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self, outcome: dict) -> dict:
        n_out = outcome.get("tokens", 0)
        return {"prompt_tokens": self.chat.n_prompt, "completion_tokens": n_out,
                "total_tokens": self.chat.n_prompt + n_out}

    def event(self, data: dict) -> str:
        return "data: " + json.dumps(data, ensure_ascii=False) + "\n\n"

    def chunk(self, delta: dict, finish=None) -> str:
        return self.event({"id": self.cid, "object": "chat.completion.chunk", "created": self.created,
                           "model": self.model_id, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


@routes.post("/v1/chat/completions")
async def completions(request: Request):
    queue, served = request.app.state.queue, request.app.state.served
    queue.admit()  # refuse before reading a body when the queue is already full
    chat = await asyncio.to_thread(parse_chat, await json_body(request), served.tokenizer, served.context,
                                   served.info.system, served.model_id)
    queue.admit()
    reply = Reply(chat, served.model_id)
    if chat.stream:
        return StreamingResponse(stream_events(queue, served, reply), media_type="text/event-stream")
    return await complete_once(request, queue, served, reply)


async def complete_once(request: Request, queue: ModelQueue, served: Served, reply: Reply):
    """The whole answer in one body; a client that hangs up stops its generation (499, nothing recorded)."""
    left, outcome = asyncio.Event(), {}
    watcher = asyncio.ensure_future(wait_until_gone(request, left))
    try:
        async with aclosing(answer(queue, served, reply.chat, left, outcome)) as pieces:
            text = "".join([p async for p in pieces])
    except Gone:
        return Response(status_code=499)  # nobody is listening
    finally:
        watcher.cancel()
    if left.is_set():
        return Response(status_code=499)  # generation stopped when the client left; nothing recorded
    queue.stats["answered"] += 1
    await record(served, reply.cid, reply.chat, text)
    return {"id": reply.cid, "object": "chat.completion", "created": reply.created, "model": served.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason(outcome)}],
            "usage": reply.usage(outcome)}


async def stream_events(queue: ModelQueue, served: Served, reply: Reply):
    """The answer as server-sent events. A client that leaves makes Starlette cancel this generator, which
    stops the generation or takes the request out of the queue."""
    outcome, parts = {}, []
    yield reply.chunk({"role": "assistant", "content": ""})
    try:
        async with aclosing(answer(queue, served, reply.chat, asyncio.Event(), outcome)) as pieces:
            async for piece in pieces:
                parts.append(piece)
                yield reply.chunk({"content": piece})
    except ApiError as e:  # the status line is sent: the error goes in the stream, as OpenAI does
        yield reply.event(e.body())
        return
    except Exception as e:
        log.exception("keel deploy: internal error while streaming %s", reply.cid)
        yield reply.event(ApiError(500, f"internal server error: {type(e).__name__}", kind="server_error").body())
        return
    queue.stats["answered"] += 1
    await record(served, reply.cid, reply.chat, "".join(parts))
    yield reply.chunk({}, finish_reason(outcome))
    if reply.chat.include_usage:
        yield reply.event({"id": reply.cid, "object": "chat.completion.chunk", "created": reply.created,
                           "model": served.model_id, "choices": [], "usage": reply.usage(outcome)})
    yield "data: [DONE]\n\n"


@routes.post("/v1/feedback")
async def feedback(request: Request):
    served = request.app.state.served
    req = validate(FeedbackRequest, await json_body(request))
    if served.store is None:
        raise ApiError(400, "this server records no feedback (no --feedback_db)")
    try:
        found = await asyncio.to_thread(served.store.add_feedback, req.id, req.rating, req.correction)
    except Exception as e:  # sqlite3.Error (disk full, read-only), OSError
        served.store_failure[:] = [f"{type(e).__name__}: {e}"]
        log.error("keel deploy: ERROR: could not record a rating in the feedback store %s (%s)",
                  getattr(served.store, "path", ""), e)
        raise ApiError(503, f"the feedback store cannot be written ({e}); the rating was not recorded",
                       kind="server_error", code="feedback_store_failed") from None
    if not found and served.store_failure:
        raise ApiError(503, f"no answer with id '{req.id}': the feedback store has been failing "
                       f"({served.store_failure[0]}), so it may not have been recorded", "id",
                       "feedback_store_failed", kind="server_error")
    if not found:
        raise ApiError(404, f"no answer with id '{req.id}'", "id", kind="not_found_error")
    return {"status": "recorded", "id": req.id}
