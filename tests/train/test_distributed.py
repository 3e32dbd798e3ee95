"""`keel sft --fsdp fsdp2` under torchrun (2 processes, gloo): the same steps as one process on the same global
batch, every parameter split in half, exact resume, and the combinations that are refused."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import assert_resumed_like, base_argv, read_log, run_keel, sft

ROOT = Path(__file__).resolve().parents[2]
# 4 steps, checkpoints at 2 and 4; fp32 in the one-process run too (a sharded run is fp32 on a CPU)
COMMON = ("--max_steps", "4", "--save_steps", "2", "--eval_steps", "2", "--cpu_autocast_bf16", "false")


def torchrun(tmp_path: Path, out: Path, *argv) -> dict:
    """keel sft ARGV on 2 processes through tests/train/fsdp_worker.py; returns the run like sft() does, plus each
    process's shard record."""
    shards = tmp_path / f"shards-{out.name}"
    shards.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "train" / "fsdp_worker.py"), str(shards), "sft", *[str(a) for a in argv]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, "\n".join(line for line in proc.stderr.splitlines() if "rror" in line)[-3000:]
    run = next(d for d in out.glob("v*-*") if (d / "logging.jsonl").is_file())
    last = max(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return {"run_dir": str(run), "last_model_checkpoint": str(last),
            "shards": [json.loads((shards / f"rank{r}.json").read_text()) for r in range(2)]}


def test_two_sharded_processes_train_like_one(tiny_model_dir, id_file, tmp_path):
    """Same global batch (2 processes x 2 rows a step vs 1 x 4): the same losses, gradient norms (a gloo average
    that summed would double them) and eval losses as logged (4 decimals), and the same adapter to 1e-3 of each
    tensor's norm (float sums in another order, through 4 Adam steps at lr 2e-2)."""
    sharded = torchrun(tmp_path, tmp_path / "fsdp", *base_argv(tiny_model_dir, id_file, tmp_path / "fsdp", *COMMON,
                       "--gradient_accumulation_steps", "2", "--lora_dropout", "0", "--fsdp", "fsdp2"))
    single = sft(base_argv(tiny_model_dir, id_file, tmp_path / "one", *COMMON, "--gradient_accumulation_steps", "4",
                           "--lora_dropout", "0"))
    keys = ("loss", "grad_norm", "token_acc", "eval_loss", "eval_token_acc")
    got = [{k: r.get(k) for k in keys} for r in read_log(sharded["run_dir"])]
    want = [{k: r.get(k) for k in keys} for r in read_log(single["run_dir"])]
    assert len(got) == 4 and all(abs(a[k] - b[k]) <= 2e-4 for a, b in zip(got, want) for k in keys
                                 if b[k] is not None), (got, want)
    a = load_file(Path(sharded["last_model_checkpoint"]) / "adapter_model.safetensors")
    b = load_file(Path(single["last_model_checkpoint"]) / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 28  # 7 linear layers x 2 blocks x (A, B): the usual PEFT layout
    assert all((a[k] - b[k]).norm() <= 1e-3 * b[k].norm() for k in a)
    assert json.loads((Path(sharded["run_dir"]) / "args.json").read_text())["fsdp"] == "fsdp2"

    # every parameter (base and LoRA) split across the two processes, about half each; each block its own unit
    (r0, r1) = sharded["shards"]
    for name, (held0, total) in r0["shares"].items():
        held1 = r1["shares"][name][0]
        assert held0 + held1 == total and abs(held0 - total / 2) <= max(total / 64, 1), (name, held0, held1)
    assert sum(name.endswith(f"layers.{i}") for name in r0["units"] for i in range(2)) == 2, r0["units"]


def test_sharded_run_resumes_exactly(tiny_model_dir, id_file, tmp_path):
    """With LoRA dropout (each process draws its own masks): resumed at step 2, the run logs the uninterrupted
    run's steps 3 and 4 and ends with the same adapter, bit for bit."""
    argv = (*COMMON, "--gradient_accumulation_steps", "2", "--fsdp", "fsdp2")
    full = torchrun(tmp_path, tmp_path / "a", *base_argv(tiny_model_dir, id_file, tmp_path / "a", *argv))
    ckpt = tmp_path / "b" / "v0-resumed" / "checkpoint-2"
    shutil.copytree(Path(full["run_dir"]) / "checkpoint-2", ckpt)
    resumed = torchrun(tmp_path, tmp_path / "b", *base_argv(tiny_model_dir, id_file, tmp_path / "b", *argv,
                                                            "--resume_from_checkpoint", ckpt))
    assert_resumed_like(full, resumed, step=2)


@pytest.mark.parametrize("flags,pattern", [
    (["--fsdp", "fsdp1"], "--fsdp must be fsdp2"),
    (["--fsdp", "fsdp2"], "--fsdp fsdp2 shards the model across processes: launch with torchrun"),
    (["--fsdp", "fsdp2", "--quant_method", "bnb"], "--fsdp fsdp2 with --quant_method bnb is not supported"),
    (["--fsdp", "fsdp2", "--cpu_autocast_bf16", "true"], "--cpu_autocast_bf16 true with --fsdp fsdp2 is not supported"),
])
def test_refused_combinations_are_one_line(tiny_model_dir, id_file, tmp_path, capsys, flags, pattern):
    code, _, err = run_keel(capsys, "sft", *base_argv(tiny_model_dir, id_file, tmp_path, *flags))
    assert code == 2 and pattern in err and err.count("\n") == 1, err
    assert not list(tmp_path.glob("v*-*"))


def test_rlhf_does_not_take_fsdp(tiny_model_dir, tmp_path, capsys):
    code, _, err = run_keel(capsys, "rlhf", "--model", tiny_model_dir, "--dataset", tmp_path / "p.jsonl",
                            "--fsdp", "fsdp2")
    assert code == 2 and "unknown flag --fsdp" in err and err.count("\n") == 1, err


def test_lockstep_pads_with_passes_that_add_nothing(tiny_model_dir, monkeypatch):
    """A process with fewer passes than the others runs filler passes: their loss is multiplied by 0."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from keel.train.distributed import filler_batch, lockstep
    from keel.train.losses import token_loss

    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: t.fill_(3))  # the most passes of any process: 3
    filler = filler_batch(0, True, 256)
    padded = lockstep([{"n": 1}], SimpleNamespace(device=torch.device("cpu")), filler)
    assert padded[0] == {"n": 1} and padded[1:] == [filler, filler]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loss, n, _ = token_loss(model, filler, torch.device("cpu"))
    (loss * 0).backward()
    assert n == 1 and all(p.grad is None or not p.grad.any() for p in model.parameters())
