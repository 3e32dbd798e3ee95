"""`keel sft` on the tiny model: loss falls, exact checkpoint files, rotation, resume, peft loading."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from keel.train.checkpoint import CHECKPOINT_FILES
from tests.helpers import (
    assert_resumed_like,
    base_argv,
    checkpoint_copy,
    fill_disk,
    read_log,
    run_keel,
    sft,
    small_tmpfs,
)

ROOT = Path(__file__).resolve().parents[2]


def test_short_run_learns_and_saves_exact_files(tiny_model_dir, id_file, tmp_path, capsys):
    res = sft(base_argv(tiny_model_dir, id_file, tmp_path, "--num_train_epochs", "3", "--save_steps", "4",
                          "--save_total_limit", "2", "--eval_steps", "4"))
    losses = [r["loss"] for r in read_log(res["run_dir"]) if "loss" in r]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 * 0.9, losses
    run = Path(res["run_dir"])
    ckpts = sorted(p.name for p in run.glob("checkpoint-*"))
    best = Path(res["best_model_checkpoint"]).name
    assert len(set(ckpts) - {best}) <= 2 and Path(res["last_model_checkpoint"]).name in ckpts
    assert sorted(os.listdir(res["last_model_checkpoint"])) == sorted(CHECKPOINT_FILES)
    assert {"args.json", "logging.jsonl", "manifest.json", "images"} <= set(os.listdir(run))
    assert (run / "images" / "train_loss.png").stat().st_size > 0
    saved = json.loads((run / "args.json").read_text())
    assert saved["model"] == str(tiny_model_dir) and saved["lora_rank"] == 8
    record = read_log(run)[-1]
    for key in ("loss", "token_acc", "grad_norm", "learning_rate", "epoch", "global_step/max_steps", "elapsed_time",
                "remaining_time", "train_tokens_per_second", "memory", "eval_loss", "eval_token_acc"):
        assert key in record
    out = capsys.readouterr().out
    assert "last_model_checkpoint:" in out and "best_model_checkpoint:" in out


def test_adapter_loads_with_plain_peft(tiny_model_dir, id_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from keel.model.load import ModelArgs, load_model

    res = sft(base_argv(tiny_model_dir, id_file, tmp_path, "--max_steps", "2"))
    ckpt = res["last_model_checkpoint"]
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ckpt).eval()
    ours, _, info = load_model(ModelArgs(adapters=[ckpt]))
    ids = torch.tensor([[1, 5, 9, 20, 33, 2]])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, ours(ids).logits, atol=1e-5)
    lora_b = [p for n, p in plain.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # the adapter actually learned something
    assert info.model == str(tiny_model_dir)


def test_resume_reproduces_uninterrupted(tiny_model_dir, id_file, tmp_path):
    full = sft(base_argv(tiny_model_dir, id_file, tmp_path / "a", "--max_steps", "6", "--save_steps", "3"))
    resumed = sft(base_argv(tiny_model_dir, id_file, tmp_path / "b", "--max_steps", "6", "--save_steps", "3",
                              "--resume_from_checkpoint", str(checkpoint_copy(full, tmp_path / "b"))))
    assert_resumed_like(full, resumed)


def test_seed_command_runs(tiny_model_dir, id_file, shared_data, tmp_path, monkeypatch, capsys):
    """The README's mixed command (ms-swift's tutorial), with a local model, the mirror, smaller #N and max_steps."""
    monkeypatch.chdir(id_file.parent)
    monkeypatch.setenv("KEEL_DATA_DIR", str(shared_data))
    argv = ["sft", "--model", tiny_model_dir, "--train_type", "lora", "--dataset",
            "AI-ModelScope/alpaca-gpt4-data-zh#8", "AI-ModelScope/alpaca-gpt4-data-en#8", "self_cognition.json",
            "--torch_dtype", "float32", "--num_train_epochs", "3", "--per_device_train_batch_size", "1",
            "--per_device_eval_batch_size", "1", "--learning_rate", "1e-4", "--lora_rank", "8", "--lora_alpha", "32",
            "--target_modules", "all-linear", "--gradient_accumulation_steps", "16", "--eval_steps", "50",
            "--save_total_limit", "2", "--logging_steps", "5", "--max_length", "512",
            "--output_dir", tmp_path / "output_mixed", "--system", "You are a helpful assistant.", "--warmup_ratio", "0.05",
            "--dataloader_num_workers", "4", "--model_author", "swift", "--model_name", "swift-robot-mixed",
            "--max_steps", "2"]
    code, out, err = run_keel(capsys, *argv)
    assert code == 0, err
    ckpt = next((tmp_path / "output_mixed").glob("v0-*/checkpoint-2"))
    saved = json.loads((ckpt / "args.json").read_text())
    assert saved["model_name"] == ["swift-robot-mixed"] and saved["system"] == "You are a helpful assistant."


def test_torchrun_two_processes(tiny_model_dir, id_file, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "keel", "sft", *base_argv(tiny_model_dir, id_file, tmp_path, "--max_steps", "3")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, "\n".join(line for line in proc.stderr.splitlines() if "rror" in line)[-3000:]
    runs = list(tmp_path.glob("v*-*"))
    assert len(runs) == 1 and (runs[0] / "checkpoint-3" / "adapter_model.safetensors").is_file()
    assert json.loads((runs[0] / "args.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("flags,pattern", [
    (["--lora_rank", "0"], "--lora_rank must be >= 1"),
    (["--learning_rate", "-0.0001"], "--learning_rate must be > 0"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1"),
    (["--lora_rnak", "8"], "did you mean --lora_rank"),
])
def test_bad_flags(tiny_model_dir, id_file, tmp_path, capsys, flags, pattern):
    code, _, err = run_keel(capsys, "sft", *base_argv(tiny_model_dir, id_file, tmp_path, *flags))
    assert code == 2 and pattern in err and err.count("\n") == 1


def test_save_steps_beyond_the_run_saves_the_final_checkpoint(tiny_model_dir, id_file, tmp_path, capsys):
    # ms-swift's tutorial passes --save_steps 50 to a 40-step run: it must train and save the final step.
    code, out, err = run_keel(capsys, "sft", *base_argv(tiny_model_dir, id_file, tmp_path, "--max_steps", "2",
                                                         "--save_steps", "50", "--eval_steps", "50"))
    assert code == 0, err
    assert "only the final checkpoint will be written and evaluated" in out
    runs = list(tmp_path.glob("v*-*"))
    assert [p.name for p in runs[0].glob("checkpoint-*")] == ["checkpoint-2"]


def test_unwritable_output_and_bad_resume(tiny_model_dir, id_file, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_keel(capsys, "sft", *base_argv(tiny_model_dir, id_file, blocker / "out"))
    assert code == 2 and "cannot write there" in err
    code, _, err = run_keel(capsys, "sft", *base_argv(tiny_model_dir, id_file, tmp_path, "--resume_from_checkpoint", tmp_path))
    assert code == 2 and "not a Keel checkpoint" in err


def test_resume_from_another_run_refused(tiny_model_dir, id_file, tmp_path, capsys):
    res = sft(base_argv(tiny_model_dir, id_file, tmp_path, "--max_steps", "1"))
    code, _, err = run_keel(capsys, "sft", *base_argv(tiny_model_dir, id_file, tmp_path, "--max_steps", "2",
                                                     "--seed", "7", "--resume_from_checkpoint", res["last_model_checkpoint"]))
    assert code == 2 and "belongs to another run" in err


def test_disk_full_keeps_earlier_checkpoints(tiny_model_dir, id_file, tmp_path, capsys, monkeypatch):
    import keel.train.checkpoint as ck

    real = ck.torch.save
    calls = {"n": 0}

    def failing_save(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(ck.torch, "save", failing_save)
    code, _, err = run_keel(capsys, "sft", *base_argv(tiny_model_dir, id_file, tmp_path, "--max_steps", "4", "--save_steps", "2"))
    assert code == 2 and "disk is full" in err
    run = next(tmp_path.glob("v*-*"))
    assert sorted(p.name for p in run.iterdir() if p.name.startswith((".checkpoint", "checkpoint"))) == ["checkpoint-2"]
    assert sorted(os.listdir(run / "checkpoint-2")) == sorted(CHECKPOINT_FILES)


@pytest.mark.slow
def test_embedded_model_learns_identity(embedded_identity_adapter):
    """Held-out phrasings (not in the training rows) name the new identity after a short run."""
    from keel.evals.scoring import is_identity_hit
    from keel.model.generate import GenerateArgs, generate_batch
    from keel.model.load import ModelArgs, load_model

    model, tok, _ = load_model(ModelArgs(adapters=[str(embedded_identity_adapter)]))
    questions = ["May I ask what you're called?", "Identify yourself.", "Which organisation is behind you?"]
    answers = generate_batch(model, tok, [[{"role": "user", "content": q}] for q in questions],
                             GenerateArgs(temperature=0.0, max_new_tokens=32))
    hits = [is_identity_hit(a, ["Keel Robot"], ["Keel Lab"]) for a in answers]
    assert sum(hits) >= 2, answers


def test_two_stage_continues_an_adapter(tiny_model_dir, id_file, tmp_path):
    """Stage 2 starts from stage 1's adapter (the seed's two-stage recipe); the base comes from its args.json."""
    from safetensors.torch import load_file

    first = sft(base_argv(tiny_model_dir, id_file, tmp_path / "s1", "--max_steps", "2"))
    second = sft(["--adapters", first["last_model_checkpoint"], "--dataset", str(id_file), "--output_dir",
                    str(tmp_path / "s2"), "--max_steps", "2", "--learning_rate", "2e-2", "--split_dataset_ratio", "0"])
    saved = json.loads((Path(second["run_dir"]) / "args.json").read_text())
    assert saved["model"] == str(tiny_model_dir)
    a = load_file(Path(first["last_model_checkpoint"]) / "adapter_model.safetensors")
    b = load_file(Path(second["last_model_checkpoint"]) / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("batch,world,expected", [(1, 1, 16), (4, 1, 4), (1, 2, 8), (32, 1, 1)])
def test_default_accumulation_follows_ms_swift(batch, world, expected):
    """Left unset, accumulation gives about 16 rows per optimizer step, as `swift sft` does."""
    from keel.train.args import TrainArgs, default_accumulation

    assert default_accumulation(batch, world) == expected
    assert TrainArgs(per_device_train_batch_size=batch).gradient_accumulation_steps is None  # resolved in setup
    assert TrainArgs(gradient_accumulation_steps=3).gradient_accumulation_steps == 3


def test_shared_prefix_trains_like_plain_packing(tiny_model_dir, id_file, tmp_path):
    """A run whose passes share the system prompt logs the same losses as one that repeats it per row.

    Dropout off: with it, the shared prefix gets one mask per pass instead of one per row (other random
    draws, the same expected update), so the two runs would differ like two seeds.
    """
    argv = ("--max_steps", "4", "--lora_dropout", "0", "--system", "You are Keel Robot, a test assistant built by Keel Lab.")
    shared = read_log(sft(base_argv(tiny_model_dir, id_file, tmp_path / "a", *argv))["run_dir"])
    plain = read_log(sft(base_argv(tiny_model_dir, id_file, tmp_path / "b", *argv, "--share_prefix", "false"))["run_dir"])
    assert len(shared) == len(plain) == 4 and "eval_loss" in shared[-1]
    for s, p in zip(shared, plain):
        assert s["loss"] == pytest.approx(p["loss"], rel=1e-3)
        assert ("eval_loss" in s) == ("eval_loss" in p)
        assert s.get("eval_loss", 0) == pytest.approx(p.get("eval_loss", 0), rel=1e-3)


@pytest.mark.parametrize("native,flag,expected", [(True, None, True), (False, None, False), (True, "false", False),
                                                   (False, "true", True)])
def test_bf16_training_is_the_default_where_the_cpu_has_native_bf16(tiny_model_dir, id_file, tmp_path, monkeypatch,
                                                                     native, flag, expected):
    import keel.model.load

    monkeypatch.setattr(keel.model.load, "cpu_has_native_bf16", lambda: native)
    result = sft(base_argv(tiny_model_dir, id_file, tmp_path, "--max_steps", "1", "--split_dataset_ratio", "0",
                           *(["--cpu_autocast_bf16", flag] if flag else [])))
    saved = json.loads((Path(result["run_dir"]) / "args.json").read_text())
    assert saved["cpu_autocast_bf16"] is expected  # what ran, not what was asked


def test_bf16_training_evaluates_probes_and_warns_without_native_bf16(tiny_model_dir, id_file, tmp_path, capsys,
                                                                        monkeypatch):
    """bf16 frozen weights: the in-training eval loss, identity probe and final check run on them too."""
    import keel.model.load

    monkeypatch.setattr(keel.model.load, "cpu_has_native_bf16", lambda: False)
    result = sft(base_argv(tiny_model_dir, id_file, tmp_path, "--max_steps", "2", "--cpu_autocast_bf16", "true",
                           "--eval_identity", "true", "--model_name", "Keel", "--model_author", "Acme"))
    out = capsys.readouterr().out
    assert "no AVX-512 BF16 or AMX" in out and "identity check:" in out
    last = read_log(result["run_dir"])[-1]
    assert math.isfinite(last["eval_loss"]) and "identity_hit" in last


def one_line(err: str) -> str:
    """The error line of a failed command (progress bars of model loading may precede it); no traceback."""
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("keel: error: ")
    return line


class Planted:
    """A pickle that runs code when unpickled: it creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_crafted_training_state_is_never_unpickled(tiny_model_dir, id_file, tmp_path, capsys):
    res = sft(base_argv(tiny_model_dir, id_file, tmp_path, "--max_steps", "1"))
    ckpt = Path(res["last_model_checkpoint"])
    marker = tmp_path / "code-ran"
    torch.save({"optimizer": Planted(marker)}, ckpt / "training_state.pt")
    code, _, err = run_keel(capsys, "sft", *base_argv(tiny_model_dir, id_file, tmp_path, "--max_steps", "2",
                                                     "--resume_from_checkpoint", ckpt))
    assert not marker.exists()
    assert code == 2 and "cannot read" in one_line(err) and "training_state.pt" in one_line(err)


def test_checkpoint_files_and_folder_are_fsynced_before_the_rename(tiny_model_dir, id_file, tmp_path, monkeypatch):
    import keel.train.checkpoint as ck

    events = []
    real_fsync, real_replace = ck.os.fsync, ck.os.replace
    monkeypatch.setattr(ck.os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(ck.os, "replace", lambda a, b: events.append(("replace", str(a))) or real_replace(a, b))
    res = sft(base_argv(tiny_model_dir, id_file, tmp_path, "--max_steps", "1"))
    tmp = next(path for kind, path in events if kind == "replace" and Path(path).name.startswith(".checkpoint-1-"))
    before = [path for kind, path in events[:events.index(("replace", tmp))] if kind == "fsync"]
    assert {tmp} | {f"{tmp}/{name}" for name in CHECKPOINT_FILES} <= set(before)
    assert ("fsync", res["run_dir"]) in events[events.index(("replace", tmp)):]


def test_full_disk_during_a_checkpoint(tiny_model_dir, id_file, tmp_path, capsys, monkeypatch):
    """A real full disk (a small tmpfs) where this machine allows mounting one, else torch.save's own error."""
    import keel.train.checkpoint as ck
    import keel.train.loop as kt

    with small_tmpfs(tmp_path / "disk", size="8m") as disk:
        if disk is not None:
            real_rotate = kt.rotate_checkpoints

            def rotate_then_fill(run_dir, keep, best):  # after checkpoint-2: room for the adapter, not the state
                real_rotate(run_dir, keep, best)
                fill_disk(disk, leave=(run_dir / "checkpoint-2" / "adapter_model.safetensors").stat().st_size + (32 << 10))

            monkeypatch.setattr(kt, "rotate_checkpoints", rotate_then_fill)
        else:
            real_save, calls = ck.torch.save, []

            def failing_save(obj, path, *a, **k):
                calls.append(path)
                if len(calls) == 2:
                    raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed "
                                       "writing file data/3: file write failed")
                return real_save(obj, path, *a, **k)

            monkeypatch.setattr(ck.torch, "save", failing_save)
            monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 0))
        out = (disk or tmp_path) / "out"
        code, _, err = run_keel(capsys, "sft", *base_argv(tiny_model_dir, id_file, out, "--max_steps", "4",
                                                         "--save_steps", "2", "--logging_steps", "4"))
        assert code == 2 and "could not save" in one_line(err) and "disk is full" in one_line(err)
        run = next(out.glob("v*-*"))
        assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
        assert sorted(os.listdir(run / "checkpoint-2")) == sorted(CHECKPOINT_FILES)


def test_resume_removes_the_interrupted_save_and_logs_each_step_once(tiny_model_dir, id_file, tmp_path):
    full = sft(base_argv(tiny_model_dir, id_file, tmp_path, "--max_steps", "6", "--save_steps", "3"))
    run = Path(full["run_dir"])
    # As after a kill while checkpoint-6 was being written: its temporary folder, no checkpoint-6,
    # and the log already holding steps 4-6.
    (run / "checkpoint-6").rename(run / ".checkpoint-6-k1ll3d")
    resumed = sft(base_argv(tiny_model_dir, id_file, tmp_path, "--max_steps", "6", "--save_steps", "3",
                            "--resume_from_checkpoint", run / "checkpoint-3"))
    assert resumed["run_dir"] == str(run)
    assert not list(run.glob(".checkpoint-*")) and (run / "checkpoint-6").is_dir()
    log = read_log(run)
    steps = [r["global_step"] for r in log if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [r for r in log if "resumed_from" in r] == [{"resumed_from": str(run / "checkpoint-3"), "global_step": 3}]


def test_failed_run_leaves_no_output_folder_and_batch_zero_is_one_line(tiny_model_dir, id_file, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_keel(capsys, "sft", "--model", tiny_model_dir, "--dataset", tmp_path / "missing.json",
                            "--output_dir", out)
    assert code == 2 and "missing.json" in err and not out.exists()
    code, _, err = run_keel(capsys, "sft", "--model", tiny_model_dir, "--dataset", id_file, "--output_dir", out,
                            "--per_device_train_batch_size", "0")
    assert code == 2 and "--per_device_train_batch_size must be >= 1" in err and err.count("\n") == 1
    assert not out.exists()


def test_run_that_ends_without_the_identity_says_so(tiny_model_dir, id_file, tmp_path, capsys):
    # ms-swift's tutorial lr on a small model can end with the identity not learned: one line says so.
    code, out, err = run_keel(capsys, "sft", *base_argv(tiny_model_dir, id_file, tmp_path, "--max_steps", "1",
                                                         "--model_name", "Keel", "--model_author", "Acme"))
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("identity check:"))
    assert "answered as Keel / Acme" in line and "NOT learned" in line and "keel recipe identity" in line


@pytest.mark.parametrize("flags,pattern", [
    (["--learning_rate", "inf"], "--learning_rate must be > 0 and finite"),
    (["--learning_rate", "nan"], "--learning_rate must be > 0 and finite"),
    (["--max_grad_norm", "nan"], "--max_grad_norm must be > 0 and finite"),
    (["--max_grad_norm", "0"], "--max_grad_norm must be > 0 and finite"),
    (["--weight_decay", "inf"], "--weight_decay must be >= 0 and finite"),
    (["--num_train_epochs", "inf"], "--num_train_epochs must be > 0 and finite"),
    (["--seed", "-1"], "--seed must be between 0 and 4294967295"),
])
def test_non_finite_and_out_of_range_flags_are_one_line(tiny_model_dir, id_file, tmp_path, capsys, flags, pattern):
    code, _, err = run_keel(capsys, "sft", *base_argv(tiny_model_dir, id_file, tmp_path / "out", "--max_steps", "2", *flags))
    assert code == 2 and pattern in one_line(err), err
    assert not (tmp_path / "out").exists()


def test_a_run_whose_loss_turns_nan_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, id_file, tmp_path, capsys,
                                                                              monkeypatch):
    import keel.train.loop as kt
    import keel.train.sft as ks

    poisoned, real_save, real_loss = [], kt.save_checkpoint, ks.token_loss

    def save_then_poison(*args, **kw):  # after checkpoint-2 the loss is NaN
        path = real_save(*args, **kw)
        poisoned.append(path)
        return path

    def loss(*args, **kw):
        total, n, correct = real_loss(*args, **kw)
        return (total * float("nan") if poisoned else total), n, correct

    monkeypatch.setattr(kt, "save_checkpoint", save_then_poison)
    monkeypatch.setattr(ks, "token_loss", loss)
    code, _, err = run_keel(capsys, "sft", *base_argv(tiny_model_dir, id_file, tmp_path, "--max_steps", "4",
                                                     "--save_steps", "2"))
    line = one_line(err)
    assert code == 2 and "step 3:" in line and "not finite" in line and "checkpoint-2" in line, err
    run = next(tmp_path.glob("v*-*"))
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(run / "checkpoint-2" / "adapter_model.safetensors").values())


def test_a_full_disk_while_logging_is_one_line(tiny_model_dir, id_file, tmp_path, capsys, monkeypatch):
    import keel.train.loop as kt

    with small_tmpfs(tmp_path / "disk", size="8m") as disk:
        real_rotate, real_open = kt.rotate_checkpoints, open
        full = []

        def rotate_then_fill(run_dir, keep, best):  # after checkpoint-2, no room left for a log line
            real_rotate(run_dir, keep, best)
            full.append(True)
            if disk is not None:
                fill_disk(disk)
                with real_open(run_dir / "logging.jsonl", "ab", buffering=0) as log:
                    try:  # and the log's last page filled too (blank lines), so the next line needs a new one
                        while True:
                            log.write(b"\n" * 512)
                    except OSError:
                        pass

        def failing_open(path, mode="r", *args, **kw):  # where no filesystem can be mounted: the kernel's error
            if full and str(path).endswith("logging.jsonl") and "a" in mode:
                raise OSError(28, "No space left on device")
            return real_open(path, mode, *args, **kw)

        monkeypatch.setattr(kt, "rotate_checkpoints", rotate_then_fill)
        if disk is None:
            monkeypatch.setattr(kt, "open", failing_open, raising=False)
        out = (disk or tmp_path) / "out"
        code, _, err = run_keel(capsys, "sft", *base_argv(tiny_model_dir, id_file, out, "--max_steps", "4",
                                                         "--save_steps", "2"))
        line = one_line(err)
        assert code == 2 and "logging.jsonl" in line and "disk is full" in line, err
        assert [p.name for p in next(out.glob("v*-*")).glob("checkpoint-*")] == ["checkpoint-2"]


def test_a_full_disk_during_a_checkpoint_says_how_much_it_needed(tiny_model_dir, id_file, tmp_path, capsys, monkeypatch):
    """A checkpoint larger than what is left (2 MB adapter, 4 MB state): torch.save's 'unexpected pos' becomes
    the disk being full, with the sizes."""
    import keel.train.checkpoint as ck
    import keel.train.loop as kt

    with small_tmpfs(tmp_path / "disk", size="24m") as disk:
        if disk is not None:
            real_rotate = kt.rotate_checkpoints

            def rotate_then_fill(run_dir, keep, best):  # room for the adapter and 1.5 MB more
                real_rotate(run_dir, keep, best)
                fill_disk(disk, leave=(run_dir / "checkpoint-2" / "adapter_model.safetensors").stat().st_size + 1_500_000)

            monkeypatch.setattr(kt, "rotate_checkpoints", rotate_then_fill)
        else:
            real_save, calls = ck.torch.save, []

            def failing_save(obj, path, *a, **k):
                calls.append(path)
                if len(calls) == 2:
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1457216 vs 1457108")
                return real_save(obj, path, *a, **k)

            monkeypatch.setattr(ck.torch, "save", failing_save)
            monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1_500_000))
        out = (disk or tmp_path) / "out"
        code, _, err = run_keel(capsys, "sft", *base_argv(tiny_model_dir, id_file, out, "--max_steps", "4",
                                                         "--save_steps", "2", "--lora_rank", "256"))
        line = one_line(err)
        assert code == 2 and "disk is full" in line and "needs about" in line and "enforce fail" not in line, err


def test_an_empty_training_state_says_so(tiny_model_dir, id_file, tmp_path, capsys):
    res = sft(base_argv(tiny_model_dir, id_file, tmp_path, "--max_steps", "1"))
    ckpt = Path(res["last_model_checkpoint"])
    (ckpt / "training_state.pt").write_bytes(b"")
    code, _, err = run_keel(capsys, "sft", *base_argv(tiny_model_dir, id_file, tmp_path, "--max_steps", "2",
                                                     "--resume_from_checkpoint", ckpt))
    assert code == 2 and "training_state.pt" in one_line(err) and "the file is empty" in one_line(err), err
