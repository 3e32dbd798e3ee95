"""Checkpoints that survive anything: written whole or not at all, rotated, resumable.

    path = save_checkpoint(run_dir, step, model, state, args_dict)
    rotate_checkpoints(run_dir, keep=2, best=best_path)

A checkpoint is written into a hidden temporary folder next to its final place and renamed into
place once complete, so a kill or a full disk at any moment leaves only whole checkpoints.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from keel.errors import KeelError
from keel.files import write_json

STATE_FILE = "training_state.pt"
CHECKPOINT_FILES = ("adapter_config.json", "adapter_model.safetensors", "args.json", STATE_FILE)
STEP = re.compile(r"checkpoint-(\d+)$")


def save_checkpoint(run_dir: Path, step: int, model, state: dict, args_dict: dict) -> Path:
    """Write checkpoint-STEP: the PEFT adapter, args.json and the resume state."""
    final = run_dir / f"checkpoint-{step}"
    if final.exists():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}-", dir=run_dir))
    try:
        model.save_pretrained(tmp)
        (tmp / "README.md").unlink(missing_ok=True)  # peft's model card template: not ours to ship
        write_json(tmp / "args.json", args_dict)
        torch.save(state, tmp / STATE_FILE)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "the disk is full" if e.errno == 28 else (e.strerror or str(e))
        raise KeelError(f"could not save {final}: {reason}; earlier checkpoints are untouched") from None
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    found = [p for p in Path(run_dir).glob("checkpoint-*") if STEP.search(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(STEP.search(p.name).group(1)))


def rotate_checkpoints(run_dir: Path, keep: int | None, best: Path | None):
    """Keep the newest `keep` checkpoints plus the best one; delete the rest."""
    if not keep:
        return
    ckpts = list_checkpoints(run_dir)
    survivors = set(ckpts[-keep:]) | ({best} if best else set())
    for p in ckpts:
        if p not in survivors:
            shutil.rmtree(p, ignore_errors=True)


def find_resume_dir(value: str, output_dir: Path) -> Path:
    """--resume_from_checkpoint: a checkpoint folder, or true for the newest under --output_dir."""
    if value.lower() in ("true", "1", "yes"):
        runs = sorted(output_dir.glob("v*-*"), key=lambda p: p.stat().st_mtime)
        ckpts = [c for r in runs for c in list_checkpoints(r)]
        if not ckpts:
            raise KeelError(f"--resume_from_checkpoint true: no checkpoint under {output_dir}")
        return ckpts[-1]
    path = Path(value)
    if not path.is_dir():
        raise KeelError(f"--resume_from_checkpoint: folder '{value}' does not exist")
    missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
    if missing:
        raise KeelError(f"--resume_from_checkpoint: '{value}' is not a Keel checkpoint (missing {', '.join(missing)})")
    return path


def load_state(path: Path) -> dict:
    try:
        return torch.load(path / STATE_FILE, weights_only=False)
    except Exception as e:  # a truncated or foreign file: the user needs one line
        raise KeelError(f"--resume_from_checkpoint: cannot read {path / STATE_FILE}: {e}") from None
