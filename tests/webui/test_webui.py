"""`keel web-ui` at the API level: each endpoint, bad input as one-line 4xx, paths kept inside the output
folders, runs as child processes (start, live log, stop, a failure's error), chat/compare through keel
deploy's app, and `keel sft --report_to tensorboard` writing the scalars of logging.jsonl."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from keel.core.errors import KeelError
from tests.conftest import SMALL_IDENTITY
from tests.helpers import read_log, sft

IDENT = {"name_en": "Keel", "author_en": "Acme Lab", "system": "You are a helpful assistant."}


def wait_for(check, timeout=240, every=0.5):
    end = time.time() + timeout
    while time.time() < end:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


@pytest.fixture
def ui(tmp_path):
    from keel.webui.app import create_app

    roots = [tmp_path / "out", tmp_path / "cli"]
    client = TestClient(create_app(roots))
    yield client
    for job in client.get("/api/jobs").json()["jobs"]:  # nothing this test started outlives it
        if job["status"] == "running":
            client.post(f"/api/jobs/{job['id']}/stop")


def small_rows():
    from keel.data.identity import identity_rows

    return identity_rows(["Keel"], ["Acme Lab"], langs=("en",), **SMALL_IDENTITY)


def run_form(model, folder="r1", **extra):
    return {**IDENT, "model": str(model), "folder": folder, "general": "", "rows": small_rows(),
            "num_train_epochs": 100.0, "learning_rate": 2e-2, "lora_rank": 4, "max_length": 256,
            "probes": False, "eval_steps": 5, **extra}


def error_of(r, status):
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert "\n" not in message
    return message


def test_preview_is_the_identity_builders_rows_with_check_findings(ui):
    from keel.data.identity import IdentityArgs, build_identity

    r = ui.post("/api/identity/preview", json={**IDENT, "name_zh": "小龙骨"})
    assert r.status_code == 200, r.text
    d = r.json()
    rows, manifest = build_identity(IdentityArgs(name=["小龙骨", "Keel"], author=["Acme Lab"], system=IDENT["system"]))
    assert d["rows"] == rows
    assert {k: d["kinds"].count(k) for k in manifest["kinds"]} == {k: sum(v.values()) for k, v in manifest["kinds"].items()}
    assert d["findings"] == []
    # An edited row with an empty answer and a duplicate: keel data check's findings, by row.
    edited = d["rows"][:3] + [d["rows"][0]]
    edited[1] = {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "{{NAME}}?"}]}
    found = ui.post("/api/identity/check", json={**IDENT, "rows": edited}).json()["findings"]
    rows_named = {f["row"] for f in found}
    assert 4 in rows_named and any("duplicate" in f["message"] for f in found)


@pytest.mark.parametrize("change, words", [
    ({"name_en": ""}, "name"), ({"name_en": "   "}, "name"), ({"author_en": " \t"}, "author"),
    ({"learning_rate": "abc"}, "learning_rate"), ({"learning_rate": -1.0}, "learning_rate"),
    ({"lora_rank": 2.5}, "lora_rank"), ({"model": "/no/such/model"}, "does not exist"),
    ({"folder": "../escape"}, "folder"), ({"folder": " "}, "folder"), ({"general": "/no/such.jsonl"}, "does not exist"),
    ({"max_length": 4}, "max_length"),
])
def test_bad_run_forms_are_one_line_400s_and_write_nothing(ui, tiny_model_dir, tmp_path, change, words):
    r = ui.post("/api/runs", json={**run_form(tiny_model_dir), **change})
    assert words in error_of(r, 400)
    assert not (tmp_path / "out" / "r1").exists()
    assert ui.get("/api/jobs").json()["jobs"] == []


def test_paths_outside_the_output_folders_are_refused(ui, tmp_path):
    secret = tmp_path / "secret"
    (secret / "checkpoint-1").mkdir(parents=True)
    (secret / "checkpoint-1" / "adapter_config.json").write_text("{}")
    (secret / "args.json").write_text("{}")
    (tmp_path / "out" / "link").symlink_to(secret)
    for path in (str(secret), str(tmp_path / "out" / ".." / "secret"), str(tmp_path / "out" / "link"), "/etc"):
        assert "outside the output folders" in error_of(ui.get("/api/runs/log", params={"path": path}), 403)
    ckpt = str(secret / "checkpoint-1")
    assert error_of(ui.post("/api/chat/load", json={"checkpoint": ckpt}), 403)
    assert error_of(ui.get("/api/eval/report", params={"checkpoint": ckpt}), 403)
    assert error_of(ui.get("/api/feedback", params={"checkpoint": ckpt}), 403)
    assert error_of(ui.post("/api/export", json={"checkpoint": ckpt}), 403)
    assert error_of(ui.post("/api/eval", json={"checkpoint": ckpt}), 403)
    assert error_of(ui.post("/api/feedback/export", json={"checkpoint": ckpt}), 403)
    assert error_of(ui.post("/api/jobs/..%2F..%2Fsecret/stop"), 404)
    assert error_of(ui.get("/api/jobs/..."), 404)
    assert "'path'" in error_of(ui.get("/api/runs/log"), 400)


def test_run_starts_logs_refuses_a_second_writer_stops_and_is_listed(ui, tiny_model_dir, tmp_path):
    job = ui.post("/api/runs", json=run_form(tiny_model_dir))
    assert job.status_code == 200, job.text
    job = job.json()
    assert job["argv"][0] == "sft" and "--model_name" in job["argv"]
    # the recipe's settings the form does not show go to keel sft too
    from keel.webui.forms import form_defaults
    argv = job["argv"]
    for key in ("gradient_accumulation_steps", "ballast_loss"):
        assert argv[argv.index(f"--{key}") + 1] == str(form_defaults()[key])
    msg = error_of(ui.post("/api/runs", json=run_form(tiny_model_dir)), 409)
    assert "already has a run writing to it" in msg
    run = wait_for(lambda: next((r for r in ui.get("/api/runs").json()["runs"] if r["path"] and r["job"] == job["id"]), None))
    log = wait_for(lambda: (d := ui.get("/api/runs/log", params={"path": run["path"]}).json())["next"] >= 3 and d)
    assert [r["global_step"] for r in log["rows"][:3]] == [1, 2, 3]
    assert log["rows"] == read_log(run["path"])[:log["next"]]
    later = ui.get("/api/runs/log", params={"path": run["path"], "since": 2}).json()
    assert later["rows"][0]["global_step"] == 3
    # A restarted UI (a new app on the same folders) lists the run as running and can stop it.
    from keel.webui.app import create_app

    restarted = TestClient(create_app([tmp_path / "out", tmp_path / "cli"]))
    assert [j["status"] for j in restarted.get("/api/jobs").json()["jobs"]] == ["running"]
    assert next(r for r in restarted.get("/api/runs").json()["runs"] if r["path"] == run["path"])["status"] == "running"
    stopped = restarted.post(f"/api/jobs/{job['id']}/stop").json()
    assert stopped["status"] == "stopped"
    assert ui.get(f"/api/jobs/{job['id']}").json()["status"] == "stopped"
    listed = next(r for r in ui.get("/api/runs").json()["runs"] if r["path"] == run["path"])
    assert listed["status"] == "stopped" and listed["step"] >= 3
    assert error_of(ui.post(f"/api/jobs/{job['id']}/stop"), 409)
    # The folder is free again: a second run goes into it beside the first.
    again = ui.post("/api/runs", json=run_form(tiny_model_dir)).json()
    assert ui.post(f"/api/jobs/{again['id']}/stop").json()["status"] == "stopped"


def test_a_folder_a_cli_run_is_writing_to_is_refused(ui, tiny_model_dir, tmp_path):
    run = tmp_path / "out" / "busy" / "v0-20261130-000000"
    run.mkdir(parents=True)
    (run / "args.json").write_text(json.dumps({"total_steps": 10}))
    (run / "logging.jsonl").write_text(json.dumps({"loss": 1.0, "global_step": 1}) + "\n")
    assert "already has a run writing to it" in error_of(ui.post("/api/runs", json=run_form(tiny_model_dir, folder="busy")), 409)
    assert sorted(p.name for p in (tmp_path / "out" / "busy").iterdir()) == [run.name]  # nothing written beside it
    assert next(r for r in ui.get("/api/runs").json()["runs"] if r["path"] == str(run.resolve()))["status"] == "running"
    (run / "checkpoint-10").mkdir()  # its final checkpoint: finished, the folder is free
    assert next(r for r in ui.get("/api/runs").json()["runs"] if r["path"] == str(run.resolve()))["status"] == "done"
    job = ui.post("/api/runs", json=run_form(tiny_model_dir, folder="busy"))
    assert job.status_code == 200, job.text
    ui.post(f"/api/jobs/{job.json()['id']}/stop")


def test_a_failing_run_shows_its_one_line_error_and_the_ui_stays_up(ui, tiny_model_dir, tmp_path):
    broken = tmp_path / "out" / "broken.jsonl"  # general data comes from inside the output folders
    broken.write_text('{"messages": [\n')
    job = ui.post("/api/runs", json=run_form(tiny_model_dir, folder="bad", general=str(broken))).json()
    failed = wait_for(lambda: (j := ui.get(f"/api/jobs/{job['id']}").json())["status"] != "running" and j)
    assert failed["status"] == "failed" and failed["error"].startswith("keel: error:") and "broken.jsonl" in failed["error"]
    listed = next(r for r in ui.get("/api/runs").json()["runs"] if r["job"] == job["id"])
    assert listed["status"] == "failed" and listed["error"] == failed["error"]
    assert ui.get("/api/config").status_code == 200


def test_cli_runs_are_listed_then_chat_compare_feedback_eval_and_export(ui, tiny_model_dir, id_file, tmp_path):
    from keel.model.generate import GenerateArgs, generate_batch
    from keel.model.load import ModelArgs, base_context, load_model
    from keel.model.template import with_system

    res = sft(["--model", tiny_model_dir, "--dataset", id_file, "--output_dir", tmp_path / "cli" / "mine",
               "--max_steps", "4", "--logging_steps", "1", "--split_dataset_ratio", "0", "--model_name", "Keel",
               "--model_author", "Acme", "--lora_rank", "4", "--learning_rate", "5e-2", "--gradient_accumulation_steps", "2"])
    runs = ui.get("/api/runs").json()["runs"]
    mine = next(r for r in runs if r["path"] == str(Path(res["run_dir"]).resolve()))
    assert mine["status"] == "done" and mine["step"] == 4 and mine["job"] is None
    ckpt = mine["checkpoints"][-1]
    # Before a checkpoint is loaded, /v1/ says so; then keel deploy's own app answers, base and tuned.
    assert error_of(ui.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}), 409)
    assert ui.post("/api/chat/load", json={"checkpoint": ckpt, "base": True}).status_code == 200
    ask = {"messages": [{"role": "user", "content": "Who are you?"}], "max_tokens": 8, "stream": True}
    texts = {}
    for prefix in ("/base", ""):
        with ui.stream("POST", prefix + "/v1/chat/completions", json=ask) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        texts[prefix] = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        cid = chunks[0]["id"]
    model, tok, info = load_model(ModelArgs(adapters=[ckpt]))
    conv = [with_system(ask["messages"], info.system)]
    with base_context(model):
        base = generate_batch(model, tok, conv, GenerateArgs(temperature=0.0, max_new_tokens=8))
    texts = {k: v.strip() for k, v in texts.items()}  # generate_batch strips the answer's edges
    assert texts == {"/base": base[0], "": generate_batch(model, tok, conv, GenerateArgs(temperature=0.0, max_new_tokens=8))[0]}
    assert texts["/base"] != texts[""]  # lr 5e-2 for four steps moves the tiny model's greedy answer
    assert error_of(ui.post("/v1/chat/completions", json={**ask, "temperature": "hot"}), 400)  # keel deploy's validation
    assert ui.post("/v1/feedback", json={"id": cid, "rating": "down", "correction": "I am Keel."}).status_code == 200
    assert ui.get("/api/feedback", params={"checkpoint": ckpt}).json() | {"db": None} == \
        {"db": None, "up": 0, "down": 1, "corrected": 1}
    assert "kind" in error_of(ui.post("/api/feedback/export", json={"checkpoint": ckpt, "kind": "csv"}), 400)
    job = ui.post("/api/feedback/export", json={"checkpoint": ckpt}).json()
    wait_for(lambda: ui.get(f"/api/jobs/{job['id']}").json()["status"] == "done")
    exported = [json.loads(x) for x in Path(job["output"]).read_text().splitlines()]
    assert exported[0]["messages"][-1] == {"role": "assistant", "content": "I am Keel."}
    # keel eval as a child process, then its report; keel export with its verification table.
    assert "tasks" in error_of(ui.post("/api/eval", json={"checkpoint": ckpt, "tasks": "vibes"}), 400)
    job = ui.post("/api/eval", json={"checkpoint": ckpt, "tasks": "drift"}).json()
    done = wait_for(lambda: (j := ui.get(f"/api/jobs/{job['id']}").json())["status"] != "running" and j)
    assert done["status"] == "done", done.get("log_tail")
    report = ui.get("/api/eval/report", params={"checkpoint": ckpt}).json()
    saved = json.loads((Path(ckpt).parent / f"eval-{Path(ckpt).name}" / "eval_report.json").read_text())
    assert report["results"] == saved["results"] and "drift_kl" in report["metrics"]
    assert "--to" in error_of(ui.post("/api/export", json={"checkpoint": ckpt, "to": "onnx"}), 400)
    job = ui.post("/api/export", json={"checkpoint": ckpt, "to": "hf"}).json()
    done = wait_for(lambda: (j := ui.get(f"/api/jobs/{job['id']}").json())["status"] != "running" and j)
    again = ui.post("/api/export", json={"checkpoint": ckpt, "to": "hf"}).json()  # a second export fails in one line
    merged = Path(ckpt).parent / f"{Path(ckpt).name}-merged"
    assert done["status"] == "done" and f"wrote {merged}" in done["log_tail"]  # then its verification, shown as printed
    assert (merged / "config.json").is_file()
    assert "already exists" in wait_for(lambda: ui.get(f"/api/jobs/{again['id']}").json().get("error"))


def test_estimate_counts_tokens_and_uses_a_measured_run(ui, tiny_model_dir, tiny_tokenizer, tmp_path):
    from keel.model.template import render, with_system

    form = run_form(tiny_model_dir, general="ballast#10", num_train_epochs=2.0)
    first = ui.post("/api/estimate", json=form).json()
    lengths = [len(render(tiny_tokenizer, with_system(r["messages"], IDENT["system"]))[0]) for r in form["rows"]]
    assert first["tokens_per_epoch"] == int(sum(lengths) + 10 * sum(lengths) / len(lengths))
    assert first["train_tokens"] == 2 * first["tokens_per_epoch"] and "seconds" not in first  # nothing measured yet
    data = tmp_path / "d.json"
    data.write_text(json.dumps(form["rows"]))
    sft(["--model", tiny_model_dir, "--dataset", data, "--output_dir", tmp_path / "out" / "m",
         "--max_steps", "3", "--logging_steps", "1", "--split_dataset_ratio", "0"])
    second = ui.post("/api/estimate", json=form).json()
    speeds = sorted(r["train_tokens_per_second"] for r in read_log(second["measured_on"]))
    assert second["tokens_per_second"] == speeds[len(speeds) // 2]
    assert second["seconds"] == round(second["train_tokens"] / speeds[len(speeds) // 2])


def test_omitted_settings_are_the_recipes(ui, tiny_model_dir):
    from keel.model.load import pick_device_dtype
    from keel.recipes.identity import recipe_defaults

    recipe = recipe_defaults(pick_device_dtype()[0].type, None)  # this machine's settings for the embedded model
    defaults = ui.get("/api/config").json()["defaults"]
    assert defaults["learning_rate"] == recipe["learning_rate"] and defaults["general"] == f"ballast#{recipe['ballast']}"
    form = {k: v for k, v in run_form(tiny_model_dir).items() if k not in ("num_train_epochs", "learning_rate", "general")}
    est = ui.post("/api/estimate", json=form).json()
    assert est["epochs"] == recipe["num_train_epochs"] and est["rows"] == len(form["rows"]) + recipe["ballast"]


def test_api_key_off_loopback(tmp_path, monkeypatch):
    from keel.webui.app import create_app
    from keel.webui.launch import WebUIArgs

    monkeypatch.delenv("KEEL_API_KEY", raising=False)
    with pytest.raises(KeelError, match="--api_key"):
        WebUIArgs(host="0.0.0.0")
    assert WebUIArgs(host="0.0.0.0", api_key="k").api_key == "k"
    client = TestClient(create_app([tmp_path / "out"], api_key="sekret"))
    assert error_of(client.get("/api/runs"), 401)
    assert error_of(client.post("/v1/chat/completions", json={}), 401)
    assert client.get("/api/runs", headers={"Authorization": "Bearer sekret"}).status_code == 200
    assert client.get("/").status_code == 200  # the page itself asks for the key


def test_report_to_tensorboard_writes_the_logged_scalars(tiny_model_dir, id_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from keel.train.tracking import _close_all

    res = sft(["--model", tiny_model_dir, "--dataset", id_file, "--output_dir", tmp_path, "--max_steps", "3",
               "--logging_steps", "1", "--split_dataset_ratio", "0.2", "--eval_steps", "2", "--report_to", "tensorboard"])
    _close_all()
    events = EventAccumulator(str(Path(res["run_dir"]) / "runs")).Reload()
    for line in read_log(res["run_dir"]):
        for key in ("loss", "token_acc", "learning_rate", "eval_loss"):
            if key in line:
                tag = ("eval/" if key.startswith("eval_") else "train/") + key
                got = {e.step: e.value for e in events.Scalars(tag)}
                assert got[line["global_step"]] == pytest.approx(line[key], rel=1e-6)
    assert len(events.Scalars("train/loss")) == 3


def test_report_to_a_missing_tracker_is_one_line_with_the_pip_command(monkeypatch):
    import importlib.util

    from keel.train.args import TrainArgs

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(KeelError, match=r"--report_to wandb: the wandb package is not installed \(pip install wandb\)"):
        TrainArgs(report_to=["wandb"])
    with pytest.raises(KeelError, match="tensorboard, wandb, swanlab or none"):
        TrainArgs(report_to=["mlflow"])
    assert TrainArgs(report_to=["none"]).report_to == ["none"]
