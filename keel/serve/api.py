"""The OpenAI request shapes behind `keel deploy`: strict validation, OpenAI-form errors, HTTP guards.

    chat = parse_chat(await json_body(request), tokenizer, context, system, model_id)   # a Chat, or ApiError (4xx)
    app.add_middleware(Guard, api_key="sekret", max_body=1 << 20, read_timeout=10)

Types are as strict as the OpenAI API's: "0.5" is not a number, 2.9 and 2.0 are not integers, NaN
and Infinity are not numbers, unknown parameters are refused, and a parameter this server cannot
honour (n > 1, penalties, logprobs) is refused rather than ignored, and so is a model this server does not
serve (404, as OpenAI answers). Bodies are parsed by pydantic's JSON parser, which bounds nesting depth and
refuses lone surrogates (`\\ud800`), and only when sent as application/json (415 otherwise). `parse_chat`
tokenizes, so the server runs it in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from keel.core.errors import KeelError
from keel.model.generate import GenerateArgs
from keel.model.template import prompt_ids, with_system

STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class ApiError(Exception):
    """An error the client caused or must wait out, answered in the OpenAI error form."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def join_text_parts(cls, value):
        """OpenAI's content is a string or a list of {"type": "text", "text": ...} parts."""
        if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" and set(p) == {"type", "text"}
                                           and isinstance(p["text"], str) for p in value):
            return "".join(p["text"] for p in value)
        if not isinstance(value, str):
            raise ValueError("expected a string or a list of text parts")
        return value


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = STRICT
    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)
    stop: list[str] | None = Field(None, max_length=4)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=128)
    user: str | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: bool | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def one_stop_is_a_list(cls, value):
        return [value] if isinstance(value, str) else value


class FeedbackRequest(BaseModel):
    model_config = STRICT
    id: str
    rating: Literal["up", "down"]
    correction: str | None = None


def param_name(loc: tuple) -> str | None:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


async def json_body(request) -> bytes:
    """The request's body, if it was sent as JSON: a page on another site can post text/plain or a form to
    127.0.0.1 without the browser asking first, but not application/json (415 otherwise)."""
    body = await request.body()  # read first: a body over the limit is a 413 whatever its type
    sent = request.headers.get("content-type", "")
    if sent.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, f"send the body as JSON (Content-Type: application/json), not '{sent or 'no Content-Type'}'",
                       code="unsupported_media_type")
    return body


def validate(model: type[BaseModel], body: bytes):
    """The parsed request, or ApiError(400) naming the first bad parameter as OpenAI does."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        kind, param, msg = err["type"], param_name(err["loc"]), err["msg"].removeprefix("Value error, ")
    if kind == "json_invalid":
        raise ApiError(400, f"We could not parse the JSON body of your request: {msg}", code="invalid_json")
    if kind == "model_type" or param is None:
        raise ApiError(400, "the request body must be a JSON object")
    if kind == "extra_forbidden":
        raise ApiError(400, f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if kind == "missing":
        raise ApiError(400, f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    if kind.endswith("_type") or kind in ("literal_error", "bool_parsing", "int_from_float"):
        raise ApiError(400, f"Invalid type for '{param}': {msg}", param, "invalid_type")
    raise ApiError(400, f"Invalid value for '{param}': {msg}", param, "invalid_value")


@dataclass
class Chat:
    """A validated chat request, ready to generate."""
    messages: list[dict]  # with the server's system prompt when the client sent none
    gen: GenerateArgs
    stop: list[str]
    stream: bool
    include_usage: bool
    n_prompt: int


def unsupported(param: str, what: str):
    raise ApiError(400, f"'{param}': {what} is not supported by this server", param, "unsupported_value")


def parse_chat(body: bytes, tokenizer, context: int, system: str | None, model_id: str | None = None) -> Chat:
    """Validate a /v1/chat/completions body and tokenize its prompt (blocking: run it in a thread)."""
    req = validate(ChatRequest, body)
    if req.model is not None and model_id is not None and req.model != model_id:
        raise ApiError(404, f"The model '{req.model}' does not exist on this server, which serves '{model_id}' "
                       "(GET /v1/models)", "model", "model_not_found")
    if req.n not in (None, 1):
        unsupported("n", "more than one choice per request (n > 1)")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name) not in (None, 0):
            unsupported(name, "a non-zero penalty")
    if req.logprobs:
        unsupported("logprobs", "returning log probabilities")
    if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise ApiError(400, "max_tokens and max_completion_tokens differ; send one of them", "max_tokens", "invalid_value")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in req.messages]
    full = with_system(messages, system)
    try:
        n_prompt = len(prompt_ids(tokenizer, full))
    except KeelError as e:
        raise ApiError(400, str(e), "messages") from None
    if n_prompt >= context:
        raise ApiError(400, f"This model's maximum context length is {context} tokens, but the messages are "
                       f"{n_prompt} tokens. Please shorten the messages.", "messages", "context_length_exceeded")
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    # Not given: as much as the context leaves (at most 512); given: honoured or refused, never cut silently.
    max_tokens = asked if asked is not None else min(512, context - n_prompt)
    if n_prompt + max_tokens > context:
        raise ApiError(400, f"This model's maximum context length is {context} tokens, but {n_prompt} prompt tokens "
                       f"+ max_tokens {max_tokens} exceed it. Please lower max_tokens or shorten the messages.",
                       "max_tokens", "context_length_exceeded")
    temperature = 0.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    if top_p == 0:  # the limit of nucleus sampling: only the most likely token
        temperature, top_p = 0.0, 1.0
    gen = GenerateArgs(temperature=temperature, top_p=top_p, max_new_tokens=max_tokens, seed=req.seed)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Chat(full, gen, req.stop or [], bool(req.stream), include_usage, n_prompt)


class TooLarge(Exception):
    pass


class SlowBody(Exception):
    pass


class Guard:
    """Pure ASGI middleware: the API key on /v1/ (compared in constant time), the body size limit (413) and the
    time a body may take to arrive (408).

    A body announced too large by Content-Length is refused before a byte of it is read; a chunked
    body is counted as it arrives and refused as soon as it passes the limit, so it is never held whole.
    A client that sends its body slower than `read_timeout` seconds allow is answered 408 and its connection
    closed, so slow senders cannot hold the server's connections.
    """

    def __init__(self, app, api_key: str | None, max_body: int, read_timeout: float = 10.0):
        self.app, self.max_body, self.read_timeout = app, max_body, read_timeout
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"].startswith("/v1/") and not hmac.compare_digest(
                headers.get(b"authorization", b""), self.expected):
            return await ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                  kind="authentication_error", code="invalid_api_key").response()(scope, receive, send)
        too_large = ApiError(413, f"the request body is larger than this server's limit of {self.max_body} bytes "
                             "(keel deploy --max_body_kb)", code="request_too_large")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            return await too_large.response()(scope, receive, send)
        started = False

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, self.bounded(receive), watched_send)
        except TooLarge:
            if not started:
                await too_large.response()(scope, receive, send)
        except SlowBody:
            if not started:
                slow = ApiError(408, f"the request body did not arrive within this server's limit of "
                                f"{self.read_timeout:g} s (keel deploy --read_timeout)", code="request_timeout",
                                headers={"Connection": "close"})
                await slow.response()(scope, receive, send)

    def bounded(self, receive):
        """`receive` that counts the body (TooLarge past max_body) and times it (SlowBody past read_timeout);
        once the body is in, what follows (a disconnect, awaited while answering) is not timed."""
        loop = asyncio.get_running_loop()
        deadline, seen, done = loop.time() + self.read_timeout, 0, False

        async def receive_bounded():
            nonlocal seen, done
            if done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise SlowBody from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise TooLarge
            done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return receive_bounded
