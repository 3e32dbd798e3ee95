"""The OpenAI-compatible HTTP server behind `keel deploy`, with the web chat and feedback.

    app = create_app(model, tokenizer, info, api_key=None, store=FeedbackStore("feedback.sqlite"))

One model, one generation at a time: requests wait their turn on an asyncio lock (a 135 M model
on 2 cores has nothing to gain from interleaving). A streaming client that disconnects stops its
generation and frees the slot. Every answer is recorded so a rating can refer to it by id.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from keel.chat import prompt_ids, with_system
from keel.generate import GenerateArgs, stream_answer

STATIC = Path(__file__).resolve().parents[1] / "static"


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


async def read_json(request: Request):
    """The parsed body, or a 400 response saying it is not JSON."""
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return error(400, "the request body is not valid JSON")


def context_length(model, tokenizer) -> int:
    return int(getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length)


def parse_request(body, ctx: int, tokenizer, system):
    """(messages, GenerateArgs, stop strings, stream) or an error response."""
    if not isinstance(body, dict):
        return error(400, "the request body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return error(400, "'messages' is required: a non-empty list of {role, content}", "messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            return error(400, f"messages[{i}] must be {{role: system|user|assistant, content: string}}", "messages")
    msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
    full = with_system(msgs, system)
    n_prompt = len(prompt_ids(tokenizer, full))
    if n_prompt >= ctx:
        return error(400, f"the messages are {n_prompt} tokens; this model's context is {ctx}", "messages",
                     "context_length_exceeded")
    asked = body.get("max_tokens") or body.get("max_completion_tokens")
    try:
        # Not given: as much as the context leaves (at most 512); given: honoured or refused, never cut silently.
        max_tokens = int(asked) if asked is not None else min(512, ctx - n_prompt)
        gen = GenerateArgs(temperature=float(body.get("temperature", 0.0) or 0.0), top_p=float(body.get("top_p", 1.0) or 1.0),
                           max_new_tokens=max_tokens, seed=body.get("seed"))
    except Exception as e:  # a wrong type or range: the reason goes back to the client
        return error(400, f"bad sampling parameter: {e}")
    if n_prompt + max_tokens > ctx:
        return error(400, f"max_tokens {max_tokens} + {n_prompt} prompt tokens exceed the context of {ctx}", "max_tokens")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        return error(400, "'stop' must be a string or a list of strings", "stop")
    return full, gen, stop, bool(body.get("stream")), n_prompt


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    hits = [text.index(s) for s in stop if s and s in text]
    return (text[:min(hits)], True) if hits else (text, False)


def create_app(model, tokenizer, info, api_key: str | None = None, store=None, model_id: str = "keel") -> FastAPI:
    app = FastAPI(title="Keel")
    lock = asyncio.Lock()
    ctx = context_length(model, tokenizer)
    system = info.system

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/") and request.headers.get("authorization") != f"Bearer {api_key}":
            return error(401, "missing or wrong API key (send Authorization: Bearer KEY)", kind="authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "keel"}]}

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html")

    async def generate(full, gen, stop, request: Request):
        """Yield text pieces under the lock; stop early on a stop string or a disconnect."""
        halt = threading.Event()
        async with lock:
            pieces = stream_answer(model, tokenizer, full, gen, halt)
            text = ""
            try:
                while True:
                    piece = await asyncio.to_thread(next, pieces, None)
                    if piece is None:
                        break
                    new, hit = cut_at_stop(text + piece, stop)
                    if len(new) > len(text):
                        yield new[len(text):]
                    text = new
                    if hit or await request.is_disconnected():
                        break
            finally:
                halt.set()
                await asyncio.to_thread(pieces.close)

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        body = await read_json(request)
        if isinstance(body, JSONResponse):
            return body
        parsed = parse_request(body, ctx, tokenizer, system)
        if isinstance(parsed, JSONResponse):
            return parsed
        full, gen, stop, stream, n_prompt = parsed
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        user_msgs = [m for m in full if m["role"] != "system"]

        def record(answer: str):
            if store is not None:
                store.record_completion(cid, model_id, system if full[0]["role"] != "system" else full[0]["content"],
                                        user_msgs, answer)

        if not stream:
            answer = "".join([p async for p in generate(full, gen, stop, request)])
            record(answer)
            n_out = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
            return {"id": cid, "object": "chat.completion", "created": created, "model": model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                 "finish_reason": "length" if n_out >= gen.max_new_tokens else "stop"}],
                    "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}}

        def chunk(delta: dict, finish=None) -> str:
            return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                                          "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]},
                                         ensure_ascii=False) + "\n\n"

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            parts = []
            async for piece in generate(full, gen, stop, request):
                parts.append(piece)
                yield chunk({"content": piece})
            record("".join(parts))
            yield chunk({}, "stop")
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        body = await read_json(request)
        if isinstance(body, JSONResponse):
            return body
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            return error(400, "'id' (the chat completion id) is required", "id")
        if body.get("rating") not in ("up", "down"):
            return error(400, "'rating' must be 'up' or 'down'", "rating")
        correction = body.get("correction")
        if correction is not None and not isinstance(correction, str):
            return error(400, "'correction' must be a string", "correction")
        if store is None:
            return error(400, "this server records no feedback (no --feedback_db)")
        if not await asyncio.to_thread(store.add_feedback, body["id"], body["rating"], correction):
            return error(404, f"no answer with id '{body['id']}'", "id", "not_found_error")
        return {"status": "recorded", "id": body["id"]}

    return app
