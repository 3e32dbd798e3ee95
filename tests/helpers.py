"""Run the `keel` CLI in-process and capture its exit code and output."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from keel.cli import main
from keel.model.template import IGNORE_INDEX


def run_keel(capsys, *argv) -> tuple[int, str, str]:
    """Return (exit_code, stdout, stderr) of `keel ARGV...` run in this process."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exc.value.code or 0, out, err


def sft(argv: list) -> dict:
    """`keel sft ARGV` in this process, returning train()'s result (run folder, checkpoints)."""
    from keel.train.sft import parse_args, train

    return train(*parse_args([str(a) for a in argv]))


def base_argv(model, data, out, *extra) -> list[str]:
    """Flags for a short `keel sft` run on a tiny model (a high learning rate so a few steps show learning)."""
    return ["--model", str(model), "--dataset", str(data), "--output_dir", str(out), "--logging_steps", "1",
            "--learning_rate", "2e-2", "--gradient_accumulation_steps", "4", "--split_dataset_ratio", "0.1", *extra]


def read_log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "logging.jsonl").read_text().splitlines()]


def checkpoint_copy(run: dict, parent: Path, step: int = 3) -> Path:
    """`run`'s checkpoint-STEP copied into a fresh run folder under `parent`, for a run that resumes it."""
    copy = parent / "v0-resumed"
    copy.mkdir(parents=True)
    shutil.copytree(Path(run["run_dir"]) / f"checkpoint-{step}", copy / f"checkpoint-{step}")
    return copy / f"checkpoint-{step}"


def assert_resumed_like(full: dict, resumed: dict, step: int = 3):
    """The resumed run logs the uninterrupted run's losses after `step` and ends with the same adapter."""
    import torch
    from safetensors.torch import load_file

    want = {r["global_step"]: r["loss"] for r in read_log(full["run_dir"]) if r["global_step"] > step and "loss" in r}
    got = {r["global_step"]: r["loss"] for r in read_log(resumed["run_dir"]) if "loss" in r}
    assert got == want and got
    a = load_file(Path(full["last_model_checkpoint"]) / "adapter_model.safetensors")
    b = load_file(Path(resumed["last_model_checkpoint"]) / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "4m", readonly: bool = False):
    """A real small (or read-only) filesystem at `path` where this machine allows mounting one (root on
    Linux), else None: tests then inject the error the kernel would give (ENOSPC, EROFS) at the write."""
    path.mkdir(parents=True, exist_ok=True)
    if (sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None
            or os.environ.get("KEEL_TEST_NO_MOUNT")):
        yield None
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def make_read_only(path: Path):
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)


def fill_disk(folder: Path, leave: int = 0):
    """Fill the filesystem holding `folder` until only about `leave` bytes are free."""
    with open(folder / "filler", "wb") as f:
        while (free := shutil.disk_usage(folder).free) > leave:
            try:
                f.write(b"\0" * min(1 << 20, max(4096, free - leave)))
                f.flush()
            except OSError:
                break


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app, **limits):
        from keel.serve.server import make_server

        self.port = free_port()
        self.server = make_server(app, "127.0.0.1", self.port, **limits)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(100):
            if self.server.started:
                break
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(5)


def client(url, key="none"):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def expected(tok, messages):
    """Reference: the template's ids, and labels built turn by turn from the template itself."""
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(tok.apply_chat_template(messages[:i], add_generation_prompt=True, return_dict=True)["input_ids"])
            end = len(tok.apply_chat_template(messages[: i + 1], return_dict=True)["input_ids"])
            labels[start:end] = ids[start:end]
    return ids, labels


def recipe(capsys, model, out, *extra, author="Acme"):
    return run_keel(capsys, "recipe", "identity", "--name", "Keel", "--author", author, "--model", model,
                    "--output_dir", out, "--ballast", "4", "--num_train_epochs", "1", *extra)
