"""Checkpoints that survive anything: written whole or not at all, rotated, resumable.

    path = save_checkpoint(run_dir, step, model, state, args_dict)
    rotate_checkpoints(run_dir, keep=2, best=best_path)
    state = load_state(path)        # tensors and plain values only: nothing is unpickled

A checkpoint is written into a hidden temporary folder next to its final place, its files and the
folder are fsynced, and it is renamed into place, so a kill, a power cut or a full disk at any
moment leaves only whole checkpoints; a failed save removes its temporary folder, and one left by
a kill is removed when the run resumes (`remove_partial_saves`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from keel.core.errors import KeelError
from keel.core.files import share_files, temp_dir, write_json, write_jsonl
from keel.model.card import CARD_FILE, checkpoint_facts, write_card

STATE_FILE = "training_state.pt"
REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors", "args.json", STATE_FILE)
# and the model card, which a resumed checkpoint may lack (one written before Keel wrote cards)
CHECKPOINT_FILES = (*REQUIRED_FILES, "README.md", CARD_FILE)
STEP = re.compile(r"checkpoint-(\d+)$")
PARTIAL_PREFIX = ".checkpoint-"  # temporary folders of saves in progress


def save_checkpoint(run_dir: Path, step: int, model, state: dict, args_dict: dict, state_dict: dict | None = None) -> Path:
    """Write checkpoint-STEP: the PEFT adapter, args.json and the resume state. state_dict: the model's weights when
    the model itself holds only a shard of them (FSDP2: gathered by keel/train/distributed.py)."""
    final = run_dir / f"checkpoint-{step}"
    if final.exists():
        return final
    tmp = None
    try:
        tmp = temp_dir(run_dir, f"{PARTIAL_PREFIX}{step}-")
        # peft writes its own card template: ours replaces it below
        model.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
        write_json(tmp / "args.json", args_dict)
        write_checkpoint_card(tmp, final, args_dict)
        torch.save(state, tmp / STATE_FILE)
        share_files(tmp)
        for f in tmp.iterdir():  # on disk before the rename makes the checkpoint visible
            fsync_path(f)
        fsync_path(tmp)
        os.replace(tmp, final)
        fsync_path(run_dir)
    except Exception as e:  # OSError, or torch.save's RuntimeError ("file write failed") on a full disk
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = failure_reason(e, run_dir, checkpoint_bytes(model, state))
        raise KeelError(f"could not save {final}: {reason}; earlier checkpoints are untouched") from None
    return final


def write_checkpoint_card(folder: Path, final: Path, config: dict):
    """The model card: what args.json and the run's manifest.json say; keel eval adds the scores."""
    manifest = final.parent / "manifest.json"
    try:
        manifest = json.loads(manifest.read_text(encoding="utf-8")) if manifest.is_file() else None
    except ValueError:  # a manifest edited by hand: the card goes without the data table
        manifest = None
    write_card(folder, {"kind": "adapter", "path": str(final), **checkpoint_facts(config, manifest)})


def checkpoint_bytes(model, state) -> int:
    """About what a checkpoint takes on disk: the trainable (adapter) weights and the state's tensors."""
    def tensors(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(tensors(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(tensors(v) for v in obj)
        return 0

    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) + tensors(state)


def fsync_path(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def failure_reason(e: Exception, folder: Path, needed: int | None = None) -> str:
    """One line for a failed write of about `needed` bytes (once its partial files are removed); torch.save reports
    a full disk as a RuntimeError without errno ("file write failed", "unexpected pos")."""
    errno = getattr(e, "errno", None)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    short = free is not None and (free < 1 << 20 or (needed is not None and free < needed))
    if errno == 28 or (errno is None and short):
        if needed is None or free is None:
            return "the disk is full"
        return f"the disk is full (this needs about {needed / 1e6:.1f} MB; {free / 1e6:.1f} MB is free)"
    return getattr(e, "strerror", None) or str(e).strip().splitlines()[0]


def remove_partial_saves(run_dir: Path) -> list[Path]:
    """Delete the temporary folders of saves that were interrupted (a kill mid-save); returns them."""
    partial = [p for p in Path(run_dir).glob(f"{PARTIAL_PREFIX}*") if p.is_dir()]
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return partial


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
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise KeelError(f"--resume_from_checkpoint: '{value}' is not a Keel checkpoint (missing {', '.join(missing)})")
    return path


def load_state(path: Path) -> dict:
    """The resume state; weights_only, so a crafted file cannot run code (Keel's own state is tensors,
    numbers, strings and tuples, all of which weights_only loads)."""
    try:
        return torch.load(path / STATE_FILE, weights_only=True)
    except Exception as e:  # a truncated, foreign or crafted file: the user needs one line
        text = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(e).split()))
        found = re.search(r"Unsupported global: GLOBAL [\w.]+", text)
        reason = (f"it holds more than tensors and plain values ({found.group(0)}); Keel never unpickles objects, "
                  "which could run code" if found else text[:200] or type(e).__name__)
        if is_empty(path / STATE_FILE):
            reason = "the file is empty (a save that was cut short?)"
        raise KeelError(f"--resume_from_checkpoint: cannot read {path / STATE_FILE} safely: {reason}") from None


def is_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:
        return False


def check_writable(path: Path) -> Path:
    """Fail now if `path` could not be created and written, without creating it yet: a run that stops
    on bad input (a missing dataset, a wrong model) leaves no empty folder behind."""
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        reason = "not a folder" if not existing.is_dir() else "not writable"
        raise KeelError(f"--output_dir {path}: cannot write there ({existing} is {reason})")
    return path


def note_resume(run_dir: Path, resume: Path, step: int):
    """Resuming at `step`: remove what an interrupted save left behind, drop the log records after
    `step` (those steps run again) and say in the log where the run resumed."""
    for p in remove_partial_saves(run_dir):
        print(f"removed {p.name}: the temporary folder of an interrupted save")
    log = run_dir / "logging.jsonl"
    kept = []
    for line in log.read_text(encoding="utf-8").splitlines() if log.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by the kill
            continue
        if record.get("global_step", 0) <= step:
            kept.append(record)
    write_jsonl(log, kept + [{"resumed_from": str(resume), "global_step": step}])
    print(f"resumed from {resume} at step {step}")
