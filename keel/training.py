"""What keel sft and keel rlhf share around their loops: the Run, its folder, the optimizer step, records, checkpoints.

Each recipe keeps its own setup and its own visible loop (keel/train.py, keel/rlhf.py); these are the
pieces that would otherwise be written out twice, word for word.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from keel.checkpoint import note_resume, rotate_checkpoints, save_checkpoint
from keel.data.mix import format_manifest
from keel.errors import KeelError
from keel.files import write_json
from keel.model import ModelArgs, read_adapter_args
from keel.tracking import report

if TYPE_CHECKING:
    from keel.train import TrainArgs


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB


def new_run_dir(output_dir: Path) -> Path:
    n = len([p for p in output_dir.glob("v*-*") if p.is_dir()])
    return output_dir / f"v{n}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        # One probe per process: under torchrun every rank checks the same folder at once.
        probe = path / f".keel-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise KeelError(f"--output_dir {path}: cannot write there ({e.strerror})") from None
    return path


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def open_run_dir(run_dir: Path, resume: Path | None, step: int, config: dict, manifest: dict):
    """The run folder's opening (main process): args.json and manifest.json written, the manifest printed."""
    writable_dir(run_dir)
    if resume:
        note_resume(run_dir, resume, step)
    write_json(run_dir / "args.json", config)
    write_json(run_dir / "manifest.json", manifest)
    print(format_manifest(manifest))


def close_run(run_dir: Path, total: int, best: dict, start: float, start_step: int, main_process: bool) -> dict:
    """The result keel sft and keel rlhf return; the curves drawn and the checkpoints printed (main process)."""
    last_ckpt = str(run_dir / f"checkpoint-{total}")
    result = {"run_dir": str(run_dir), "last_model_checkpoint": last_ckpt,
              "best_model_checkpoint": best["path"] or last_ckpt,
              "train_seconds": round(time.time() - start, 1), "steps": total - start_step}
    if main_process:
        from keel.plots import plot_run

        plot_run(run_dir)
        print(f"last_model_checkpoint: {result['last_model_checkpoint']}")
        print(f"best_model_checkpoint: {result['best_model_checkpoint']}")
    return result


def resumed_model(resume: Path, margs: ModelArgs, mine: dict, keys) -> tuple[ModelArgs, dict]:
    """The checkpoint must belong to this run (the `keys` of its args.json equal `mine`); returns the model
    args that load its adapter on its base model, and its saved args."""
    saved = read_adapter_args(resume)
    mine = {**mine, "model": margs.model or saved.get("model")}
    clash = [k for k in keys if k in saved and saved[k] != mine.get(k)]
    if clash:
        raise KeelError(f"--resume_from_checkpoint {resume}: it belongs to another run "
                        f"(--{clash[0]} was {saved[clash[0]]!r}, now {mine.get(clash[0])!r})")
    return ModelArgs(model=saved.get("model"), adapters=[str(resume)], torch_dtype=margs.torch_dtype,
                     num_threads=margs.num_threads), saved


def optimizer_step(run: "Run", max_grad_norm: float) -> tuple[float, float]:
    """The step's gradients averaged over processes and clipped, then optimizer and schedule: (grad norm, lr used)."""
    for p in run.params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if run.accelerator.num_processes > 1:
            p.grad = run.accelerator.reduce(p.grad, "mean")
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, max_grad_norm).item()
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def write_record(run: "Run", args: "TrainArgs", record: dict, step: int):
    """One line of logging.jsonl, and the same scalars to --report_to (main process)."""
    with open(run.run_dir / "logging.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({**record, "global_step": step}) + "\n")
    report(args.report_to, run.run_dir, record, step, run.config)


def save_step(run: "Run", args: "TrainArgs", step: int, record: dict, best: dict, **state) -> dict:
    """A checkpoint with its resume state; returns the best so far (--metric_for_best_model, never a
    checkpoint over --max_drift)."""
    metric = record.get(args.metric_for_best_model)
    if args.max_drift is not None and record.get("drift_kl", 0) > args.max_drift:
        metric = None  # over the drift budget: never the best
    better = metric is not None and (best["metric"] is None or (
        metric < best["metric"] if args.metric_for_best_model == "eval_loss" else metric > best["metric"]))
    path = run.run_dir / f"checkpoint-{step}"
    if better:
        best = {"metric": float(metric), "path": str(path)}  # plain values: load_state is weights_only
    if run.accelerator.is_main_process:
        state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                 "rng": rng_state(), "step": step, "best": best, **state}
        save_checkpoint(run.run_dir, step, run.accelerator.unwrap_model(run.model), state, run.config)
        rotate_checkpoints(run.run_dir, args.save_total_limit, Path(best["path"]) if best["path"] else None)
    run.accelerator.wait_for_everyone()
    return best


@dataclass
class Run:
    """Everything the loop needs, built once by `setup`."""
    accelerator: object
    model: object
    tok: object
    params: list
    optimizer: object
    scheduler: object
    train_rows: list
    val_rows: list
    run_dir: Path
    config: dict
    total: int
    steps_per_epoch: int
    rows_per_step: int
    step: int = 0
    best: dict = field(default_factory=lambda: {"metric": None, "path": None})
    probe: object = None
    teacher: object = None  # --ballast_loss kl: the base model's distributions for the ballast rows
