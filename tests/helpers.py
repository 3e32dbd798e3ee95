"""Run the `keel` CLI in-process and capture its exit code and output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keel.cli import main


def run_keel(capsys, *argv) -> tuple[int, str, str]:
    """Return (exit_code, stdout, stderr) of `keel ARGV...` run in this process."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exc.value.code or 0, out, err


def sft(argv: list) -> dict:
    """`keel sft ARGV` in this process, returning train()'s result (run folder, checkpoints)."""
    from keel.train import parse_args, train

    return train(*parse_args([str(a) for a in argv]))


def base_argv(model, data, out, *extra) -> list[str]:
    """Flags for a short `keel sft` run on a tiny model (a high learning rate so a few steps show learning)."""
    return ["--model", str(model), "--dataset", str(data), "--output_dir", str(out), "--logging_steps", "1",
            "--learning_rate", "2e-2", "--gradient_accumulation_steps", "4", "--split_dataset_ratio", "0.1", *extra]


def read_log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "logging.jsonl").read_text().splitlines()]
