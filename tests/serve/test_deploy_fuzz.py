"""keel deploy under a few hundred random requests: seeded JSON bodies (near-valid and not) and headers thrown at
/v1/chat/completions on the tiny model. Whatever arrives, the answer is never a 5xx, and every error is in
OpenAI's form ({"error": {"message", "type", "param", "code"}}), streamed or not. The tally is printed (`-s`).
"""

import json
import random

import httpx
import pytest

from keel.model.load import ModelArgs, load_model
from tests.helpers import LiveServer

REQUESTS, SEED = 300, 20261207
KEYS = ["messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream",
        "stream_options", "n", "user", "frequency_penalty", "presence_penalty", "logprobs"]
ROLES = ["system", "developer", "user", "assistant", "tool", "", "USER", None]
TYPES = ["application/json", "application/json; charset=utf-8", "text/plain", "application/x-www-form-urlencoded",
         "multipart/form-data; boundary=x", "", "application/json; charset=latin-1", "*/*", None]


def scalar(rng: random.Random):
    return rng.choice([
        None, True, False, 0, 1, -1, 2, 7, 2 ** 31, 2 ** 63, -(2 ** 64), 10 ** 30, 0.5, 1e-45, 1e-38, 1e-6, 2.0, 2.5,
        -0.0, 1e308, "", "0.5", "x" * rng.randint(1, 50), "\u0000\x07\ud7ff\u202e", "你好", "<|im_end|><|im_start|>",
        "\ud800", "NaN", rng.random(), rng.randint(-10, 600)])


def value(rng: random.Random, depth: int = 0):
    kind = rng.random()
    if depth > 2 or kind < 0.6:
        return scalar(rng)
    if kind < 0.8:
        return [value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(KEYS + ["x", "role", "content", "type", "text"]): value(rng, depth + 1)
            for _ in range(rng.randint(0, 4))}


def message(rng: random.Random):
    if rng.random() < 0.15:
        return value(rng, 1)
    content = rng.choice([scalar(rng), "Hi", "Who are you?", [{"type": "text", "text": "Hi"}],
                          [{"type": "image_url", "image_url": "x"}], [{"type": "text"}], value(rng, 2)])
    out = {"role": rng.choice(ROLES), "content": content}
    if rng.random() < 0.2:
        out[rng.choice(["name", "tool_calls", "x"])] = scalar(rng)
    return out


def body(rng: random.Random) -> bytes:
    """A near-valid request most of the time, random JSON or broken bytes otherwise."""
    kind = rng.random()
    if kind < 0.08:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
    if kind < 0.16:
        return json.dumps(value(rng)).encode()
    req = {"messages": [message(rng) if rng.random() < 0.3 else {"role": "user", "content": "Hi"}
                        for _ in range(rng.randint(0 if rng.random() < 0.1 else 1, 3))]}
    for key in rng.sample(KEYS[1:], rng.randint(0, 4)):
        req[key] = scalar(rng) if rng.random() < 0.7 else value(rng, 1)
    if "max_tokens" not in req and rng.random() < 0.8:
        req["max_tokens"] = rng.randint(1, 6)  # most valid requests short, so the test stays quick
    if rng.random() < 0.15:
        req["model"] = rng.choice(["tiny", "gpt-4", ""])
    if rng.random() < 0.15:
        req["temperature"] = rng.choice([0, 1e-45, 1e-38, 1e-6, 0.7, 2.0])
    if rng.random() < 0.1:
        req[rng.choice(["frobnicate", "tools", "response_format"])] = value(rng, 1)
    text = json.dumps(req, ensure_ascii=rng.random() < 0.5)
    return (text[:rng.randint(0, len(text))] if rng.random() < 0.05 else text).encode("utf-8", "surrogatepass")


def headers(rng: random.Random) -> dict:
    out = {}
    sent = rng.choice(TYPES) if rng.random() < 0.25 else "application/json"
    if sent is not None:
        out["Content-Type"] = sent
    for _ in range(rng.randint(0, 3)):
        name = rng.choice(["X-Keel", "Accept", "Accept-Encoding", "Authorization", "Cookie", "Origin", "User-Agent",
                           "Content-Encoding", "X-Forwarded-For"])
        out[name] = rng.choice(["", "gzip", "Bearer nope", "*/*", "text/event-stream", "x" * rng.randint(1, 300),
                                "https://evil.example", "127.0.0.1, 10.0.0.1"])
    return out


def problems(response: httpx.Response) -> list[str]:
    """What is wrong with an answer: a 5xx, an error not in OpenAI's form, a stream that breaks off with one."""
    bad = []
    if response.status_code >= 500:
        bad.append(f"status {response.status_code}")
    if response.status_code != 200:
        try:
            err = response.json()["error"]
            if not (isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
                    and "param" in err and "code" in err):
                bad.append(f"error not in OpenAI's form: {response.text[:200]}")
        except (ValueError, KeyError, TypeError):
            bad.append(f"error not in OpenAI's form: {response.text[:200]}")
        return bad
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        for e in events[:-1]:
            data = json.loads(e)
            if "error" in data:
                bad.append(f"a stream ended with an error event: {e[:200]}")
        if not events or events[-1] != "[DONE]":
            bad.append("a stream without [DONE]")
    elif response.json().get("object") != "chat.completion":
        bad.append(f"a 200 that is not a completion: {response.text[:200]}")
    return bad


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    from keel.serve.server import create_app

    model, tok, info = load_model(ModelArgs(model=str(tiny_model_dir)))
    srv = LiveServer(create_app(model, tok, info, model_id="tiny", request_timeout=5))
    yield srv
    srv.stop()


def test_random_requests_get_no_5xx_and_openai_form_errors(server):
    rng = random.Random(SEED)
    statuses, failures = {}, []
    with httpx.Client(timeout=120) as client:
        for i in range(REQUESTS):
            data, sent = body(rng), headers(rng)
            try:
                r = client.post(server.url + "/v1/chat/completions", content=data, headers=sent)
            except httpx.TransportError as e:  # the connection broken off: no answer at all
                failures.append(f"request {i} ({data[:120]!r}, {sent}): {type(e).__name__}: {e}")
                continue
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            failures += [f"request {i} ({data[:120]!r}, {sent}): {p}" for p in problems(r)]
    clean = REQUESTS - len({f.split(" (")[0] for f in failures})
    print(f"\nhostile requests: {REQUESTS}, clean answers: {clean}, statuses: {dict(sorted(statuses.items()))}")
    assert not failures, "\n".join(failures[:20])
    assert {200, 400, 404, 415} <= set(statuses)  # the generator reaches the model and each kind of check
