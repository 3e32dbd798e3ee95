"""keel deploy under hostile requests: strict OpenAI validation, limits (413, 429, time), clients that
leave, shutdown, a failing feedback store, the API key. Servers run in-process on 127.0.0.1.

Where a test needs generations of a known length it replaces the model's generation with a paced
fake (`paced`) that yields one piece per tick until max_tokens or until it is told to stop, and counts
what it produced: the assertions are about behaviour (who was answered, what was generated), never
about how fast this machine is.
"""

import json
import logging
import socket
import sqlite3
import threading
import time

import httpx
import pytest

from keel.model.load import ModelArgs, load_model
from keel.serve.feedback import FeedbackStore
from tests.helpers import LiveServer, fill_disk, make_read_only, run_keel, small_tmpfs

USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(ModelArgs(model=str(tiny_model_dir)))


@pytest.fixture
def serve(tiny):
    """serve(**create_app options) -> a live server; all are stopped at the end of the test."""
    from keel.serve.server import create_app

    started = []

    def start(**kw):
        model, tok, info = tiny
        srv = LiveServer(create_app(model, tok, info, model_id="tiny", **kw))
        srv.chat = srv.url + "/v1/chat/completions"
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def plain(tiny):
    from keel.serve.server import create_app

    model, tok, info = tiny
    srv = LiveServer(create_app(model, tok, info, model_id="tiny"))
    srv.chat = srv.url + "/v1/chat/completions"
    yield srv
    srv.stop()


@pytest.fixture
def paced(monkeypatch):
    """Generation replaced by one piece per tick; `paced.tokens` lists what each generation produced."""
    log = {"tokens": [], "tick": 0.02}

    def fake(model, tok, messages, gen, stop, outcome):
        n = 0
        while n < gen.max_new_tokens and not stop.is_set():
            time.sleep(log["tick"])
            n += 1
            yield "x"
        outcome.update(tokens=n, finish_reason="length" if n >= gen.max_new_tokens else "stop")
        log["tokens"].append(n)

    monkeypatch.setattr("keel.serve.queue.stream_answer", fake)
    return log


def post(url, body=None, raw=None, headers=None):
    content = raw if raw is not None else json.dumps(body)
    return httpx.post(url, content=content, headers={"Content-Type": "application/json", **(headers or {})}, timeout=120)


def health(srv) -> dict:
    return httpx.get(srv.url + "/health", timeout=30).json()


def open_request(srv, body: dict) -> socket.socket:
    """Send a chat request on a raw connection and leave it open: closing it is the client hanging up."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(data) + data)
    return sock


def wait_for(check, what: str, limit: float = 120):
    end = time.monotonic() + limit
    while not check():
        assert time.monotonic() < end, f"never happened: {what}"
        time.sleep(0.02)


def in_background(fn, *args) -> tuple[threading.Thread, dict]:
    out = {}

    def run():
        try:
            out["r"] = fn(*args)
        except Exception as e:  # a client that gave up
            out["e"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


MSG = '"messages": [{"role": "user", "content": "x"}]'


@pytest.mark.parametrize("raw,param,code", [
    ('{' + MSG + ', "seed": "abc"}', "seed", "invalid_type"),
    ('{' + MSG + ', "seed": 100000000000000000000000}', "seed", "invalid_value"),
    ('{' + MSG + ', "temperature": "0.5"}', "temperature", "invalid_type"),
    ('{' + MSG + ', "temperature": NaN}', "temperature", "invalid_value"),
    ('{' + MSG + ', "top_p": Infinity}', "top_p", "invalid_value"),
    ('{' + MSG + ', "max_tokens": 0}', "max_tokens", "invalid_value"),
    ('{' + MSG + ', "max_tokens": 2.9}', "max_tokens", "invalid_type"),
    ('{' + MSG + ', "max_tokens": "8"}', "max_tokens", "invalid_type"),
    ('{' + MSG + ', "stream": 1}', "stream", "invalid_type"),
    ('{' + MSG + ', "n": 2}', "n", "unsupported_value"),
    ('{' + MSG + ', "presence_penalty": 1.5}', "presence_penalty", "unsupported_value"),
    ('{' + MSG + ', "frobnicate": true}', "frobnicate", "unknown_parameter"),
    ('{"messages": [{"role": "user", "content": "\\ud800"}]}', None, "invalid_json"),
    ('{"messages": [{"role": "user", "content": 5}]}', "messages[0].content", "invalid_value"),
    ('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}", None, "invalid_json"),
])
def test_types_are_as_strict_as_openai(plain, raw, param, code):
    r = post(plain.chat, raw=raw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["code"] == code and err["message"]


def test_context_length_error_has_its_code(plain):
    r = post(plain.chat, {"messages": [{"role": "user", "content": "word " * 800}]})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["type"] == "invalid_request_error"
    r = post(plain.chat, {"messages": USER, "max_tokens": 100_000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_cut_by_max_tokens_says_length_streamed_or_not(plain):
    r = post(plain.chat, {"messages": USER, "max_tokens": 3}).json()
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 3
    with httpx.stream("POST", plain.chat, json={"messages": USER, "max_tokens": 3, "stream": True,
                                                "stream_options": {"include_usage": True}}, timeout=120) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 3


def test_a_bad_seed_is_refused_before_a_stream_starts(plain):
    body = {"messages": USER, "max_tokens": 6, "temperature": 1.0, "seed": 7}
    a, b = post(plain.chat, body).json(), post(plain.chat, body).json()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    with httpx.stream("POST", plain.chat, json={**body, "stream": True}, timeout=120) as s:
        assert [line for line in s.iter_lines() if line.startswith("data: ")][-1] == "data: [DONE]"
    with httpx.stream("POST", plain.chat, json={**body, "seed": 10**23, "stream": True}, timeout=120) as s:
        assert s.status_code == 400  # not a 200 whose stream breaks off before [DONE]


def test_surrogate_in_a_feedback_correction_is_a_400(plain):
    cid = post(plain.chat, {"messages": USER, "max_tokens": 2}).json()["id"]
    r = post(plain.url + "/v1/feedback", raw='{"id": "' + cid + '", "rating": "down", "correction": "\\udc80"}')
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_body_over_the_limit_is_413_before_it_is_read(serve):
    srv = serve(max_body=64 * 1024)
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 100_000}]}).encode()
    r = post(srv.chat, raw=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    r = httpx.post(srv.chat, content=chunks(), timeout=120)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    assert post(srv.chat, {"messages": USER, "max_tokens": 2}).status_code == 200


def test_tokenization_runs_off_the_event_loop(plain, monkeypatch):
    """/health answers while a request's prompt is being tokenized (here: held until /health answered)."""
    import keel.serve.api as api

    entered, release = threading.Event(), threading.Event()
    real = api.prompt_ids

    def held(tok, messages):
        entered.set()
        release.wait(60)
        return real(tok, messages)

    monkeypatch.setattr(api, "prompt_ids", held)
    t, out = in_background(post, plain.chat, {"messages": USER, "max_tokens": 2})
    assert entered.wait(60)
    try:
        assert httpx.get(plain.url + "/health", timeout=10).json()["status"] == "ok"
    finally:
        release.set()
        t.join(120)
    assert out["r"].status_code == 200


def test_full_queue_gets_429_with_retry_after(serve, paced):
    srv = serve(max_queue=1)
    running, _ = in_background(post, srv.chat, {"messages": USER, "max_tokens": 200})
    wait_for(lambda: health(srv)["generating"], "the first request generates")
    waiting, _ = in_background(post, srv.chat, {"messages": USER, "max_tokens": 2})
    wait_for(lambda: health(srv)["waiting"] == 1, "the second request waits")
    r = post(srv.chat, {"messages": USER, "max_tokens": 2})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    running.join(120)
    waiting.join(120)


def test_clients_that_leave_free_their_place_streamed_or_not(serve, paced, tmp_path):
    """Non-streamed clients hang up (one generating, two waiting), a streamed one hangs up while it
    waits: nothing more is generated for them, nothing of theirs is stored, the next client is answered."""
    srv = serve(store=FeedbackStore(tmp_path / "fb.sqlite"))
    quitters = [open_request(srv, {"messages": USER, "max_tokens": 400})]
    wait_for(lambda: health(srv)["generating"], "the first quitter generates")
    quitters += [open_request(srv, {"messages": USER, "max_tokens": 400}) for _ in range(2)]
    quitters += [open_request(srv, {"messages": USER, "max_tokens": 400, "stream": True})]
    wait_for(lambda: health(srv)["waiting"] == 3, "three quitters wait")
    for q in quitters:
        q.close()
    wait_for(lambda: not health(srv)["generating"] and health(srv)["waiting"] == 0, "the quitters are gone")
    r = post(srv.chat, {"messages": USER, "max_tokens": 3}).json()
    assert r["usage"]["completion_tokens"] == 3
    stats = health(srv)
    assert stats["abandoned_waiting"] + stats["abandoned_generating"] == 4 and stats["answered"] == 1
    assert sum(paced["tokens"][:-1]) < 400  # all the quitters together: less than one full answer
    stored = sqlite3.connect(tmp_path / "fb.sqlite").execute("SELECT COUNT(*) FROM completions").fetchone()[0]
    assert stored == 1


def test_request_time_limit_cuts_generation_and_waiting(serve, paced):
    srv = serve(request_timeout=1.0)
    paced["tick"] = 0.05  # 400 pieces: 20 s, far past the limit
    first, out1 = in_background(post, srv.chat, {"messages": USER, "max_tokens": 400})
    wait_for(lambda: health(srv)["generating"], "the first request generates")
    second, out2 = in_background(post, srv.chat, {"messages": USER, "max_tokens": 400})
    first.join(120)
    second.join(120)
    cut = out1["r"].json()
    assert cut["choices"][0]["finish_reason"] == "length" and cut["usage"]["completion_tokens"] < 400
    # The second either timed out waiting (503, Retry-After) or was itself cut by the limit.
    r2 = out2["r"]
    assert (r2.status_code == 503 and r2.json()["error"]["code"] == "timeout" and "Retry-After" in r2.headers) or (
        r2.status_code == 200 and r2.json()["usage"]["completion_tokens"] < 400)


def test_shutdown_stops_the_generation_and_empties_the_queue(serve, paced):
    srv = serve()
    paced["tick"] = 0.05
    first, out1 = in_background(post, srv.chat, {"messages": USER, "max_tokens": 400})
    wait_for(lambda: health(srv)["generating"], "the first request generates")
    queued = [in_background(post, srv.chat, {"messages": USER, "max_tokens": 400}) for _ in range(3)]
    wait_for(lambda: health(srv)["waiting"] == 3, "three requests wait")
    srv.stop()  # what SIGTERM does: uvicorn's should_exit
    first.join(120)
    assert not srv.thread.is_alive()
    cut = out1["r"].json()
    assert cut["choices"][0]["finish_reason"] == "length" and cut["usage"]["completion_tokens"] < 400
    for t, out in queued:
        t.join(120)
        assert out["r"].status_code == 503 and out["r"].json()["error"]["code"] == "shutting_down"
    assert len(paced["tokens"]) == 1  # nothing generated for the queue


def test_unwritable_store_refuses_to_start(tmp_path, capsys, tiny_model_dir):
    with small_tmpfs(tmp_path / "mnt") as mnt:
        if mnt is None:  # no mount here: a folder that cannot be made gives the same refusal
            (tmp_path / "file").write_text("x")
            db = tmp_path / "file" / "feedback.sqlite"
        else:
            FeedbackStore(mnt / "feedback.sqlite").db.close()
            make_read_only(mnt)
            db = mnt / "feedback.sqlite"
        code, _, err = run_keel(capsys, "deploy", "--model", tiny_model_dir, "--feedback_db", db)
    assert code == 2 and "cannot write there" in err and len(err.strip().splitlines()) == 1


def test_failing_store_keeps_answering_and_fails_only_feedback(serve, tmp_path, caplog):
    with small_tmpfs(tmp_path / "mnt", size="1m") as mnt:
        store = FeedbackStore((mnt or tmp_path) / "feedback.sqlite")
        srv = serve(store=store)
        ok = post(srv.chat, {"messages": USER, "max_tokens": 2}).json()["id"]
        if mnt is not None:
            fill_disk(mnt)  # a real full disk
        else:
            store.db.execute("PRAGMA query_only = 1")  # SQLite's own "attempt to write a readonly database"
        with caplog.at_level(logging.ERROR, logger="keel.serve"):
            r = post(srv.chat, {"messages": USER, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
        assert "could not record answer" in caplog.text
        lost = post(srv.url + "/v1/feedback", {"id": r.json()["id"], "rating": "down", "correction": "z" * 5000})
        assert lost.status_code == 503 and lost.json()["error"]["code"] == "feedback_store_failed"
        rated = post(srv.url + "/v1/feedback", {"id": ok, "rating": "down", "correction": "z" * 20000})
        assert rated.status_code == 503 and "not recorded" in rated.json()["error"]["message"]
        assert post(srv.chat, {"messages": USER, "max_tokens": 2}).status_code == 200
        srv.stop()
        store.db.close()


def test_api_key_is_compared_in_constant_time(serve, monkeypatch):
    import keel.serve.api as api

    calls = []
    real = api.hmac.compare_digest
    monkeypatch.setattr(api.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    srv = serve(api_key="sekret")
    assert post(srv.chat, {"messages": USER, "max_tokens": 2}, headers={"Authorization": "Bearer nope"}).status_code == 401
    odd = post(srv.chat, {"messages": USER}, headers={"Authorization": "Bearer s\xe9kret".encode("latin-1")})
    assert odd.status_code == 401 and odd.json()["error"]["type"] == "authentication_error"
    assert post(srv.chat, {"messages": USER, "max_tokens": 2}, headers={"Authorization": "Bearer sekret"}).status_code == 200
    assert len(calls) == 3


def long_prompt(tok, system, tokens: int) -> list[dict]:
    """A user message whose prompt (template and system prompt included) is about `tokens` tokens long."""
    from keel.model.template import prompt_ids, with_system

    words = 1
    while len(prompt_ids(tok, with_system([{"role": "user", "content": "fox " * words}], system))) < tokens:
        words += 8
    return [{"role": "user", "content": "fox " * words}]


@pytest.fixture
def slow_reading(tiny, monkeypatch):
    """The model made slow per token it reads (10 ms), prompts read in chunks of 16: `read` lists the tokens of
    each forward pass, so a test sees how much of a prompt was read before the model stopped."""
    import keel.model.generate as generate

    monkeypatch.setattr(generate, "PREFILL_CHUNK", 16, raising=False)
    read = []

    def slow(module, args, kwargs):
        n = kwargs["input_ids"].shape[1]
        read.append(n)
        time.sleep(0.01 * n)

    handle = tiny[0].register_forward_pre_hook(slow, with_kwargs=True)
    yield read
    handle.remove()


def test_a_long_prompt_is_read_within_the_time_limit(serve, tiny, slow_reading):
    """Read in one pass, a 450-token prompt costs 4.5 s here; with a 1 s limit most of it is never read."""
    srv = serve(request_timeout=1.0)
    messages = long_prompt(tiny[1], tiny[2].system, 450)
    r = post(srv.chat, {"messages": messages, "max_tokens": 8})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    n_prompt = r.json()["usage"]["prompt_tokens"]
    assert n_prompt >= 450 and sum(slow_reading) < n_prompt / 2, (n_prompt, slow_reading)


def test_a_client_that_leaves_stops_the_reading_of_its_prompt(serve, tiny, slow_reading):
    srv = serve()
    sock = open_request(srv, {"messages": long_prompt(tiny[1], tiny[2].system, 450), "max_tokens": 8})
    wait_for(lambda: slow_reading, "the prompt is being read")
    sock.close()
    wait_for(lambda: not health(srv)["generating"], "the model is free again")
    assert sum(slow_reading) < 450 / 2, slow_reading


@pytest.mark.parametrize("stream", [False, True])
def test_a_vanishing_temperature_is_greedy(plain, stream):
    greedy = post(plain.chat, {"messages": USER, "max_tokens": 6}).json()["choices"][0]["message"]["content"]
    body = {"messages": USER, "max_tokens": 6, "temperature": 1e-40}
    if not stream:
        r = post(plain.chat, body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == greedy
        return
    with httpx.stream("POST", plain.chat, json={**body, "stream": True}, timeout=120) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and not any("error" in c for c in chunks), events
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == greedy


def test_unknown_routes_and_methods_answer_in_openai_form(plain):
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
        r = httpx.request(method, plain.chat, timeout=30)
        err = r.json()["error"]
        assert r.status_code == 405 and err["code"] == "method_not_allowed" and err["message"], r.text
        assert "POST" in r.headers["allow"]
    assert httpx.head(plain.chat, timeout=30).status_code == 405
    for method, path in (("GET", "/v1/nope"), ("POST", "/v1/completions"), ("GET", "/v1/chat/completions/x")):
        r = httpx.request(method, plain.url + path, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error", r.text
        assert path in r.json()["error"]["message"]


def test_an_unknown_model_is_404_and_only_json_bodies_are_read(plain):
    r = post(plain.chat, {"messages": USER, "model": "gpt-4", "max_tokens": 2})
    err = r.json()["error"]
    assert r.status_code == 404 and err["code"] == "model_not_found" and err["param"] == "model" and "tiny" in err["message"]
    assert post(plain.chat, {"messages": USER, "model": "tiny", "max_tokens": 2}).status_code == 200
    body = json.dumps({"messages": USER, "max_tokens": 2})
    for sent in ({"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}, {}):
        r = httpx.post(plain.chat, content=body, headers=sent, timeout=60)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
    r = httpx.post(plain.url + "/v1/feedback", content='{"id": "x", "rating": "up"}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    r = httpx.post(plain.chat, content=body, headers={"Content-Type": "application/json; charset=utf-8"}, timeout=60)
    assert r.status_code == 200


def test_a_slow_body_gets_408_and_its_connection_is_closed(serve):
    srv = serve(read_timeout=1.0)
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.settimeout(60)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"messages\": ")  # and then nothing more
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk  # until the server closes the connection
    sock.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["error"]["code"] == "request_timeout", reply
    assert post(srv.chat, {"messages": USER, "max_tokens": 2}).status_code == 200


def test_connections_beyond_the_limit_get_503(tiny):
    from keel.serve.server import create_app
    from tests.helpers import LiveServer

    model, tok, info = tiny
    srv = LiveServer(create_app(model, tok, info, model_id="tiny"), max_connections=4)
    idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(4)]
    try:
        wait_for(lambda: len(srv.server.server_state.connections) == 4, "the idle connections are open")
        assert httpx.get(srv.url + "/health", timeout=30).status_code == 503
    finally:
        for sock in idle:
            sock.close()
    wait_for(lambda: httpx.get(srv.url + "/health", timeout=30).status_code == 200, "the server answers again")
    srv.stop()


def test_a_damaged_gguf_is_one_line(tmp_path, capsys):
    import struct

    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + bytes(range(256)) * 2)  # a GGUF header, then garbage
    code, _, err = run_keel(capsys, "deploy", "--model", bad, "--feedback_db", tmp_path / "feedback.sqlite")
    assert code == 2 and "not a readable GGUF file" in err and len(err.strip().splitlines()) == 1, err
