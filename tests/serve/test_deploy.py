"""keel deploy with the official openai client against a live server on the tiny model."""

import asyncio
import sqlite3
import time

import httpx
import pytest

from keel.model.load import ModelArgs, load_model
from keel.serve.feedback import FeedbackStore
from tests.helpers import LiveServer, client, run_keel


@pytest.fixture(scope="module")
def servers(tiny_model_dir, tmp_path_factory):
    from keel.serve.server import create_app

    model, tok, info = load_model(ModelArgs(model=str(tiny_model_dir)))
    db = tmp_path_factory.mktemp("fb") / "feedback.sqlite"
    store = FeedbackStore(db)
    open_srv = LiveServer(create_app(model, tok, info, store=store, model_id="tiny"))
    keyed = LiveServer(create_app(model, tok, info, api_key="sekret", store=store, model_id="tiny"))
    yield {"open": open_srv, "keyed": keyed, "db": db}
    open_srv.stop()
    keyed.stop()


def test_completion_and_stream(servers):
    c = client(servers["open"].url)
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Who are you?"}], max_tokens=8)
    assert r.choices[0].message.role == "assistant" and r.usage.prompt_tokens > 0 and r.id.startswith("chatcmpl-")
    pieces = [ch.choices[0].delta.content or "" for ch in
              c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, stream=True)]
    assert len(pieces) >= 2
    assert [m.id for m in c.models.list().data] == ["tiny"]
    assert httpx.get(servers["open"].url + "/health").json()["status"] == "ok"


def test_auth_required(servers):
    from openai import AuthenticationError

    with pytest.raises(AuthenticationError):
        client(servers["keyed"].url, "wrong").chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
    ok = client(servers["keyed"].url, "sekret").chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert ok.choices


@pytest.mark.parametrize("body,param", [("{not json", None), ('{"model": "tiny"}', "messages"),
                                        ('{"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}', "max_tokens"),
                                        ('{"messages": [{"role": "user", "content": "' + "word " * 800 + '"}]}', "messages")])
def test_bad_requests_get_400(servers, body, param):
    r = httpx.post(servers["open"].url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param


def test_twenty_concurrent_streams(servers):
    async def one(i):
        async with httpx.AsyncClient(timeout=120) as ac:
            async with ac.stream("POST", servers["open"].url + "/v1/chat/completions",
                                 json={"messages": [{"role": "user", "content": f"Count {i}"}], "max_tokens": 4,
                                       "stream": True}) as r:
                lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        return lines[-1] == "data: [DONE]"

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(20)))

    assert all(asyncio.run(all_of_them()))


def test_disconnect_frees_the_slot(servers):
    with httpx.stream("POST", servers["open"].url + "/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "Talk"}], "max_tokens": 400, "stream": True}) as r:
        next(r.iter_lines())  # read the first chunk, then hang up mid-stream
    start = time.time()
    r = client(servers["open"].url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert r.choices and time.time() - start < 30


def test_feedback_roundtrip_and_export(servers, tmp_path, capsys):
    url = servers["open"].url
    r = client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Who made you?"}], max_tokens=4)
    bad = httpx.post(url + "/v1/feedback", json={"id": r.id, "rating": "down", "correction": "Acme Lab made me."})
    assert bad.status_code == 200
    assert httpx.post(url + "/v1/feedback", json={"id": "chatcmpl-nope", "rating": "up"}).status_code == 404
    row = sqlite3.connect(servers["db"]).execute(
        "SELECT f.rating, f.correction, c.messages FROM feedback f JOIN completions c ON c.id = f.completion_id "
        "WHERE c.id = ?", (r.id,)).fetchone()
    assert row[0] == "down" and row[1] == "Acme Lab made me." and "Who made you?" in row[2]
    out = tmp_path / "bad_cases.jsonl"
    code, stdout, err = run_keel(capsys, "feedback", "export", "--db", servers["db"], "-o", out)
    assert code == 0, err
    from keel.data.formats import load_records
    rows = load_records(out)
    assert any(r["messages"][-1]["content"] == "Acme Lab made me." for r in rows)


def test_refuses_public_host_without_key_and_corrupt_db(tmp_path, capsys, tiny_model_dir):
    code, _, err = run_keel(capsys, "deploy", "--model", tiny_model_dir, "--host", "0.0.0.0")
    assert code == 2 and "--api_key" in err
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    before = bad.read_bytes()
    code, _, err = run_keel(capsys, "deploy", "--model", tiny_model_dir, "--feedback_db", bad)
    assert code == 2 and "untouched" in err and bad.read_bytes() == before


def test_feedback_export_reads_only_and_names_a_missing_folder(servers, tmp_path, capsys):
    code, _, err = run_keel(capsys, "feedback", "export", "--db", servers["db"], "-o", tmp_path / "no" / "such" / "x.jsonl")
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    code, _, err = run_keel(capsys, "feedback", "export", "--db", empty, "-o", tmp_path / "x.jsonl")
    assert code == 2 and "not a feedback database" in err and empty.read_bytes() == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.sqlite"]  # no -wal, -shm or output written


def damaged_store(path):
    """A feedback database with 300 rated answers whose pages' cell pointers were flipped: SQLite opens it and its
    integrity check reports thousands of characters of problems."""
    import random

    store = FeedbackStore(path)
    for i in range(300):
        store.record_completion(f"c{i}", "m", "sys", [{"role": "user", "content": "q" * 200}], "a" * 300)
        store.add_feedback(f"c{i}", "down", "fix" * 50)
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.db.close()
    data, rng = bytearray(path.read_bytes()), random.Random(0)
    for page in range(3, len(data) // 4096):
        for _ in range(2):
            data[page * 4096 + 8 + rng.randrange(0, 30)] ^= 0x01
    path.write_bytes(bytes(data))
    return path


def test_a_damaged_database_is_one_short_line_for_deploy_and_export(tmp_path, capsys, tiny_model_dir):
    db = damaged_store(tmp_path / "feedback.sqlite")
    before = db.read_bytes()
    code, _, err = run_keel(capsys, "deploy", "--model", tiny_model_dir, "--feedback_db", db)
    assert code == 2 and "untouched" in err and len(err.strip().splitlines()) == 1 and len(err) < 400, err
    code, _, err = run_keel(capsys, "feedback", "export", "--db", db, "-o", tmp_path / "rows.jsonl")
    assert code == 2 and "damaged" in err and len(err.strip().splitlines()) == 1 and len(err) < 400, err
    assert db.read_bytes() == before and not (tmp_path / "rows.jsonl").exists()
