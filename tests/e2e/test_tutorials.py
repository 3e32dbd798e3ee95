"""ms-swift's self-cognition tutorials, every command as written (`swift` -> `keel`), on a tiny Qwen2.

The tiny random Qwen2 is served as `Qwen/Qwen2.5-7B-Instruct` from a local model folder
($KEEL_MODEL_DIR), the hub datasets from a mirror folder ($KEEL_DATA_DIR) of small files written
here, and every command runs in one working folder with CUDA_VISIBLE_DEVICES=0, as in the
tutorials. Cost comes down through the model and the data (50 short self-cognition rows), never
through the flags. The identity run is trained once and its checkpoint is what infer, export and
deploy are given, so the later commands read the paths the earlier ones wrote.
"""

import contextlib
import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from keel.cli import main
from keel.serve import infer as keel_infer

ROOT = Path(__file__).resolve().parents[2]
RUN_DIR = re.compile(r"v\d+-\d{8}-\d{6}")

# The tutorials' commands. Only `swift` became `keel`; `--model` is the tutorials' own.
IDENTITY = r"""keel sft --model Qwen/Qwen2.5-7B-Instruct --train_type lora --dataset self_cognition.json \
    --num_train_epochs 10 --per_device_train_batch_size 1 --learning_rate 1e-4 --lora_rank 8 --lora_alpha 32 \
    --target_modules all-linear --gradient_accumulation_steps 16 --eval_steps 50 --save_steps 50 \
    --save_total_limit 2 --logging_steps 5 --max_length 2048 --output_dir output \
    --system 'You are a helpful assistant.' --warmup_ratio 0.05 --model_author 魔搭 ModelScope --model_name 小黄 'Xiao Huang'"""
MIXED = r"""keel sft --model Qwen/Qwen2.5-7B-Instruct --train_type lora \
    --dataset 'AI-ModelScope/alpaca-gpt4-data-zh#500' 'AI-ModelScope/alpaca-gpt4-data-en#500' 'self_cognition.json' \
    --torch_dtype bfloat16 --num_train_epochs 1 --per_device_train_batch_size 1 --per_device_eval_batch_size 1 \
    --learning_rate 1e-4 --lora_rank 8 --lora_alpha 32 --target_modules all-linear --gradient_accumulation_steps 16 \
    --eval_steps 50 --save_steps 50 --save_total_limit 2 --logging_steps 5 --max_length 2048 --output_dir output \
    --system 'You are a helpful assistant.' --warmup_ratio 0.05 --dataloader_num_workers 4 \
    --model_author swift --model_name swift-robot"""
INFER_BASE = "keel infer --model Qwen2.5-7B-Instruct --model_type qwen --stream true --temperature 0 --max_new_tokens 2048"
INFER_ADAPTER = "keel infer --adapters {ckpt} --stream true --temperature 0 --max_new_tokens 2048"
EXPORT = "keel export --adapters {ckpt} --merge_lora true"
DEPLOY = "keel deploy --adapters {ckpt}"


def self_cognition_rows() -> list[dict]:
    """50 rows in the form of ms-swift's swift/self-cognition: query/response, {{NAME}}/{{AUTHOR}}, zh and en."""
    zh = ["你是谁？", "你叫什么？", "谁开发了你？", "介绍一下你自己", "你是ChatGPT吗？"]
    en = ["Who are you?", "What is your name?", "Who made you?", "Introduce yourself.", "Are you ChatGPT?"]
    rows = []
    for i in range(25):
        rows.append({"query": f"{zh[i % 5]}{i}", "response": "我是{{NAME}}，{{AUTHOR}}的助手。", "tag": "zh"})
        rows.append({"query": f"{en[i % 5]} {i}", "response": "I am {{NAME}}, made by {{AUTHOR}}.", "tag": "en"})
    return rows


def alpaca_rows(lang: str) -> list[dict]:
    """600 short alpaca rows standing in for AI-ModelScope/alpaca-gpt4-data-zh / -en (so #500 is a subset)."""
    if lang == "zh":
        return [{"instruction": f"{i}+{i}等于？", "input": "", "output": f"{2 * i}。"} for i in range(600)]
    return [{"instruction": f"{i}+{i}?", "input": "", "output": f"{2 * i}"} for i in range(600)]


@pytest.fixture(scope="module")
def tutorial(tiny_qwen_dir, tmp_path_factory):
    """A working folder with self_cognition.json, the model and data mirrors, and the tutorials' environment."""
    root = tmp_path_factory.mktemp("tutorial")
    models = root / "models" / "Qwen"
    models.mkdir(parents=True)
    (models / "Qwen2.5-7B-Instruct").symlink_to(tiny_qwen_dir, target_is_directory=True)
    mirror = root / "data"
    mirror.mkdir()
    for lang in ("zh", "en"):
        (mirror / f"alpaca-gpt4-data-{lang}.json").write_text(json.dumps(alpaca_rows(lang), ensure_ascii=False),
                                                              encoding="utf-8")
    work = root / "work"
    work.mkdir()
    (work / "self_cognition.json").write_text(json.dumps(self_cognition_rows(), ensure_ascii=False), encoding="utf-8")
    threads = torch.get_num_threads()
    # One thread: the tiny model gains nothing from two, and a test run shares its cores with others.
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KEEL_MODEL_DIR", str(root / "models"))
        mp.setenv("KEEL_DATA_DIR", str(mirror))
        mp.setenv("CUDA_VISIBLE_DEVICES", "0")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("KEEL_CACHE", str(root / "cache"))
        mp.chdir(work)
        yield work
    torch.set_num_threads(threads)


def keel(cmd: str, stdin: str = "") -> tuple[int, str, str]:
    """Run a tutorial command line in this process: (exit code, stdout, stderr)."""
    argv = shlex.split(cmd.replace("\\\n", " "))
    assert argv[0] == "keel"
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdin", io.StringIO(stdin))
        try:
            main(argv[1:])
        except SystemExit as e:
            code = e.code or 0
    return code, out.getvalue(), err.getvalue()


def new_run(output: Path, before: set) -> Path:
    runs = [p for p in output.iterdir() if p.name not in before]
    assert len(runs) == 1, runs
    assert RUN_DIR.fullmatch(runs[0].name), runs[0].name
    assert runs[0].name.startswith(f"v{len(before)}-")  # vN counts the runs already in --output_dir
    return runs[0]


def existing_runs(output: Path) -> set:
    return {p.name for p in output.iterdir()} if output.is_dir() else set()


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines()]


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in run.iterdir() if re.fullmatch(r"checkpoint-\d+", p.name))


@pytest.fixture(scope="module")
def identity_run(tutorial):
    before = existing_runs(tutorial / "output")
    code, out, err = keel(IDENTITY)
    return {"code": code, "out": out, "err": err, "run": new_run(tutorial / "output", before) if code == 0 else None}


@pytest.fixture(scope="module")
def checkpoint(identity_run) -> str:
    """The identity checkpoint as the user types it after the run: relative, output/vN-.../checkpoint-N."""
    assert identity_run["code"] == 0, identity_run["err"][-2000:]
    steps = checkpoint_steps(identity_run["run"])
    return f"output/{identity_run['run'].name}/checkpoint-{steps[-1]}"


def test_identity_run_saves_its_final_checkpoint(identity_run):
    """50 rows x 10 epochs at 16 rows a step is 40 steps, under --save_steps 50 and --eval_steps 50."""
    assert identity_run["code"] == 0, identity_run["err"][-2000:]
    run = identity_run["run"]
    assert "only the final checkpoint will be written and evaluated" in identity_run["out"]
    assert checkpoint_steps(run) == [40]
    ckpt = run / "checkpoint-40"
    for name in ("adapter_config.json", "adapter_model.safetensors", "args.json"):
        assert (ckpt / name).is_file(), name
    args = json.loads((run / "args.json").read_text())
    assert args["model"] == "Qwen/Qwen2.5-7B-Instruct" and args["total_steps"] == 40
    assert args["model_name"] == ["小黄", "Xiao Huang"] and args["model_author"] == ["魔搭", "ModelScope"]
    assert args["system"] == "You are a helpful assistant."
    adapter = json.loads((ckpt / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["lora_alpha"] == 32
    assert {m.rsplit(".", 1)[-1] for m in adapter["target_modules"]} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    log = read_log(run)
    assert [r["global_step"] for r in log] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert "eval_loss" in log[-1] and not any("eval_loss" in r for r in log[:-1])


def test_mixed_run_with_bf16_and_loader_workers_on_cpu(tutorial, identity_run):
    """The quick-start mixture (#500 of each Alpaca, identity rows), --torch_dtype bfloat16, 4 loader workers."""
    before = existing_runs(tutorial / "output")
    code, out, err = keel(MIXED)
    assert code == 0, err[-2000:]
    run = new_run(tutorial / "output", before)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["train_rows"] + manifest["val_rows"] == 1050 and manifest["val_rows"] >= 1
    total = json.loads((run / "args.json").read_text())["total_steps"]
    assert 50 < total == -(-manifest["train_rows"] // 16)  # one epoch of 16-row steps
    assert checkpoint_steps(run) == [50, total]  # --save_total_limit 2
    log = read_log(run)
    assert [r["global_step"] for r in log if "eval_loss" in r] == [50, total]
    assert [r["global_step"] for r in log if "loss" in r][:3] == [5, 10, 15]
    taken = {s["spec"]: (s["available"], s["taken"]) for s in manifest["sources"]}
    assert taken == {"AI-ModelScope/alpaca-gpt4-data-zh#500": (600, 500), "AI-ModelScope/alpaca-gpt4-data-en#500": (600, 500),
                     "self_cognition.json": (50, 50)}
    said = out + err
    if not torch.cuda.is_available():
        # Each flag this machine has no use for is named once, and nothing is refused.
        assert said.count("note: --torch_dtype bfloat16: on CPU Keel loads and evaluates in float32") == 1
        assert said.count("note: CUDA_VISIBLE_DEVICES=0 but torch sees no CUDA device") == 1
    assert said.count("note: --dataloader_num_workers 4: accepted for ms-swift compatibility and not used") == 1


def recording_stream(monkeypatch):
    """Wrap infer's stream_answer: the pieces, the messages asked, and what the user saw before each next piece."""
    real = keel_infer.stream_answer
    seen = {"pieces": [], "shown": [], "messages": None, "gen": None}

    def wrapped(model, tok, messages, gen, *rest, **options):
        seen["messages"], seen["gen"] = [dict(m) for m in messages], gen
        for piece in real(model, tok, messages, gen, *rest, **options):
            seen["pieces"].append(piece)
            yield piece
            seen["shown"].append(sys.stdout.getvalue())

    monkeypatch.setattr(keel_infer, "stream_answer", wrapped)
    return seen


def assert_streamed(seen: dict, out: str):
    pieces = seen["pieces"]
    assert len(pieces) >= 2, pieces
    for i, shown in enumerate(seen["shown"]):  # piece i was on screen before piece i+1 was generated
        assert shown.endswith("".join(pieces[:i + 1]))
    assert ">>> " + "".join(pieces) in out
    assert seen["gen"].temperature == 0 and seen["gen"].max_new_tokens == 2048


def test_infer_base_model_with_model_type(tutorial, monkeypatch):
    seen = recording_stream(monkeypatch)
    code, out, err = keel(INFER_BASE, stdin="你是谁？\n")
    assert code == 0, err
    assert_streamed(seen, out)
    assert seen["messages"][-1] == {"role": "user", "content": "你是谁？"}
    assert err.count("note: --model_type qwen: accepted for ms-swift compatibility and not used") == 1


def test_infer_adapter_streams_with_its_training_system_prompt(checkpoint, monkeypatch):
    seen = recording_stream(monkeypatch)
    code, out, err = keel(INFER_ADAPTER.format(ckpt=checkpoint), stdin="Who are you?\n")
    assert code == 0, err
    assert_streamed(seen, out)
    # The base model and the system prompt come from the run's args.json, as in ms-swift.
    assert seen["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}


def test_export_merge_lora(checkpoint):
    code, out, err = keel(EXPORT.format(ckpt=checkpoint))
    assert code == 0, err
    merged = Path(checkpoint + "-merged")
    assert f"wrote {merged.resolve()}" in out and "gate: passed" in out
    # the merged folder answers the general prompts word for word as the adapter does (agreement 1.00)
    row = next(line.split() for line in out.splitlines() if line.startswith("merged"))
    assert row[4] == "1.00" and row[-1] == "passed", out
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        assert (merged / name).is_file(), name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deploy_serves_the_adapter(checkpoint, tutorial):
    """`keel deploy --adapters CKPT` as its own process (on a free port instead of 8000), queried, then stopped."""
    port = free_port()
    cmd = [sys.executable, "-m", *shlex.split(DEPLOY.format(ckpt=checkpoint)), "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=tutorial, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        assert proc.poll() is None, proc.stdout.read()
        body = {"model": Path(checkpoint).name, "messages": [{"role": "user", "content": "你是谁？"}], "max_tokens": 8}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["role"] == "assistant"
        with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as s:
            chunks = [line for line in s.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
        assert len(chunks) >= 2
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == [Path(checkpoint).name]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()


def test_bfloat16_on_cpu_means_float32_with_one_note(tiny_qwen_dir, capsys, monkeypatch):
    """--torch_dtype bfloat16 never crashes: CUDA gets bf16, a CPU computes in fp32 and says so once."""
    from keel.core.flags import parse_flags
    from keel.model.load import ModelArgs, load_model, pick_device_dtype

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    parse_flags([], [ModelArgs], prog="keel test")  # a new command: its notes start afresh
    model, _, _ = load_model(ModelArgs(model=str(tiny_qwen_dir), torch_dtype="bfloat16"))
    assert next(model.parameters()).dtype == torch.float32
    assert pick_device_dtype("bfloat16") == (torch.device("cpu"), torch.float32)
    assert pick_device_dtype("float16")[1] == torch.float32
    err = capsys.readouterr().err
    assert err.count("note: --torch_dtype bfloat16: on CPU Keel loads and evaluates in float32") == 1
    assert pick_device_dtype("float32") == (torch.device("cpu"), torch.float32)
    assert "note" not in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device_dtype("bfloat16") == (torch.device("cuda"), torch.bfloat16)
    assert pick_device_dtype(None)[1] == torch.bfloat16 and pick_device_dtype("float32")[1] == torch.float32


def test_unused_flag_noted_only_when_it_differs_from_the_default(capsys):
    from keel.core.flags import parse_flags
    from keel.model.load import ModelArgs

    parse_flags(["--model_type", "qwen2_5"], [ModelArgs], prog="keel test")
    assert capsys.readouterr().err.count("note: --model_type qwen2_5: accepted") == 1
    margs = parse_flags([], [ModelArgs], prog="keel test").configs[0]
    assert margs.model_type is None and capsys.readouterr().err == ""
