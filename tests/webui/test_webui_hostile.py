"""`keel web-ui` under hostile requests: form fields bounded to what a person types, slow work kept off the lock
other requests need, paths kept inside the output folders (links followed), NUL bytes and absurd values refused
before anything is written, and no 500 that shows the server's paths."""

from __future__ import annotations

import json
import threading

import pytest
from fastapi.testclient import TestClient

from tests.webui.test_webui import IDENT, error_of, run_form


@pytest.fixture
def roots(tmp_path):
    return [tmp_path / "out", tmp_path / "cli"]


@pytest.fixture
def ui(roots):
    """One event loop for every request (as uvicorn runs it), so concurrent requests share the app's lock."""
    from keel.webui.app import create_app

    with TestClient(create_app(roots)) as client:
        yield client
        for job in client.get("/api/jobs").json()["jobs"]:
            if job["status"] == "running":
                client.post(f"/api/jobs/{job['id']}/stop")


def written(roots) -> list[str]:
    """Everything under the output folders (the UI's own empty job folder aside)."""
    return sorted(str(p.relative_to(r)) for r in roots for p in r.rglob("*") if p.name not in (".webui", "jobs"))


@pytest.mark.parametrize("field, size", [("system", 100_000), ("name_en", 1000), ("author_zh", 1000)])
def test_identity_fields_are_bounded(ui, field, size):
    r = ui.post("/api/identity/preview", json={**IDENT, field: "x" * size})
    assert "at most" in error_of(r, 400) and r.json()["error"]["param"] == field


def test_rows_are_bounded(ui):
    row = {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Keel."}]}
    r = ui.post("/api/identity/check", json={**IDENT, "rows": [row] * 5000})
    assert r.json()["error"]["param"] == "rows" and error_of(r, 400)
    long = {"messages": [{"role": "user", "content": "x" * 100_000}, {"role": "assistant", "content": "Keel."}]}
    assert "at most" in error_of(ui.post("/api/identity/check", json={**IDENT, "rows": [long]}), 400)


def test_a_slow_check_holds_no_other_request_up(ui, roots, monkeypatch):
    """While one preview's check runs (held here until the end), another request's check goes through."""
    import keel.webui.forms as forms

    real, entered, release = forms.findings, threading.Event(), threading.Event()

    def first_call_held(*args):
        if not entered.is_set():
            entered.set()
            release.wait(120)
        return real(*args)

    monkeypatch.setattr(forms, "findings", first_call_held)
    slow = {}
    first = threading.Thread(target=lambda: slow.update(r=ui.post("/api/identity/preview", json=IDENT)))
    first.start()
    try:
        assert entered.wait(120)
        other = {}
        second = threading.Thread(target=lambda: other.update(r=ui.post("/api/identity/check", json={
            **IDENT, "rows": [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi"}]}]})))
        second.start()
        second.join(60)
        assert not second.is_alive() and other["r"].status_code == 200, "the second check waited for the first"
    finally:
        release.set()
        first.join(120)
    assert slow["r"].status_code == 200
    assert not list((roots[0] / ".webui").glob("check*"))  # scratch files removed


def test_a_run_folder_that_links_outside_is_refused(ui, roots, tmp_path, tiny_model_dir):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (roots[0] / "link").symlink_to(outside)
    r = ui.post("/api/runs", json=run_form(tiny_model_dir, folder="link"))
    assert "outside" in error_of(r, 403) and r.json()["error"]["param"] == "folder"
    assert list(outside.iterdir()) == [] and ui.get("/api/jobs").json()["jobs"] == []


def test_general_data_must_lie_inside_the_allowed_folders(roots, tmp_path, tiny_model_dir):
    from keel.webui.app import create_app

    data = tmp_path / "data"
    data.mkdir()
    rows = data / "general.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi"}]}))
    inside = roots[0] / "general.jsonl"
    roots[0].mkdir(parents=True)
    inside.write_text(rows.read_text())
    with TestClient(create_app(roots)) as ui:
        for path in ("/etc/passwd", str(rows), str(roots[0] / ".." / "data" / "general.jsonl")):
            r = ui.post("/api/runs", json=run_form(tiny_model_dir, general=path))
            assert "outside" in error_of(r, 403) and r.json()["error"]["param"] == "general"
        assert ui.get("/api/jobs").json()["jobs"] == []
        assert ui.post("/api/estimate", json=run_form(tiny_model_dir, general=f"{inside}#1")).status_code == 200
    with TestClient(create_app(roots, data_dirs=[data])) as ui:  # keel web-ui --allow_data_dir DATA
        assert ui.post("/api/estimate", json=run_form(tiny_model_dir, general=str(rows))).status_code == 200


@pytest.mark.parametrize("change, param", [
    ({"folder": "bad\x00name"}, "folder"), ({"name_en": "Ke\x00el"}, "name_en"), ({"system": "a\x00b"}, "system"),
    ({"general": "x\x00.jsonl"}, "general"), ({"num_train_epochs": 1e9}, "num_train_epochs"),
    ({"learning_rate": 1e9}, "learning_rate"), ({"lora_rank": 10**9}, "lora_rank"),
])
def test_nul_bytes_and_absurd_values_are_400s_that_write_nothing(ui, roots, tiny_model_dir, change, param):
    before = written(roots)
    r = ui.post("/api/runs", json={**run_form(tiny_model_dir), **change})
    assert error_of(r, 400) and r.json()["error"]["param"] == param
    assert written(roots) == before and ui.get("/api/jobs").json()["jobs"] == []


def test_long_ids_and_paths_are_short_4xx_lines(ui, roots):
    for r in (ui.get("/api/jobs/" + "a" * 5000), ui.post("/api/jobs/" + "a" * 5000 + "/stop")):
        assert str(roots[0]) not in error_of(r, 404) and len(r.json()["error"]["message"]) < 300
    for r in (ui.get("/api/runs/log", params={"path": "/" + "a" * 5000}),
              ui.get("/api/eval/report", params={"checkpoint": "a/" * 3000})):
        assert r.status_code in (400, 403), r.text
        assert len(r.json()["error"]["message"]) < 500


def test_form_bodies_must_be_json(ui):
    r = ui.post("/api/identity/preview", content=json.dumps(IDENT), headers={"Content-Type": "text/plain"})
    assert r.json()["error"]["code"] == "unsupported_media_type" and error_of(r, 415)
