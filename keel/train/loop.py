"""What keel sft and keel rlhf share around their loops: the run folder and resume, the trainable model, the
optimizer and schedule, the optimizer step, and the evaluate-log-save block that ends a step.

Each command keeps its own setup and its own visible loop (sft.py, rlhf.py), built from these steps:

    accelerator, margs, resume, run_dir, saved = start_run(margs, args, mine, RESUME_KEYS)
    model, tok, info, params = trainable_model(margs, lora, data, args, accelerator)
    optimizer, scheduler, plan = optimizer_and_schedule(params, args, len(train_rows), accelerator)
    ...  # the command's loop body: forward, backward, optimizer_step(run, ...)
    best = evaluate_log_save(run, args, step, record, best, evaluate)
"""

from __future__ import annotations

import datetime
import json
import math
import os
import random
import resource
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from keel.core.errors import KeelError
from keel.core.files import write_json
from keel.data.mix import DataArgs, format_manifest
from keel.model.load import ModelArgs, cpu_bf16_training, load_model, read_adapter_args
from keel.model.lora import LoraArgs, apply_lora, use_cheap_dropout
from keel.train.args import TrainArgs, default_accumulation
from keel.train.batching import epoch_windows
from keel.train.checkpoint import (
    check_writable,
    failure_reason,
    find_resume_dir,
    list_checkpoints,
    load_state,
    note_resume,
    rotate_checkpoints,
    save_checkpoint,
)
from keel.train.distributed import gather_state, is_sharded, load_optimizer_state, local_value, shard_model
from keel.train.tracking import report


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


def rng_states(accelerator) -> list[dict]:
    """Every process's random state, in process order (a collective under torchrun; [] for one process)."""
    if accelerator.num_processes < 2:
        return []
    import torch.distributed as tdist

    states = [None] * accelerator.num_processes
    tdist.all_gather_object(states, rng_state())
    return states


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
        from keel.train.plots import plot_run

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


def optimizer_step(run: Run, max_grad_norm: float, step: int) -> tuple[float, float]:
    """Optimizer step `step`: the gradients averaged over processes and clipped, then optimizer and schedule:
    (grad norm, lr used). A non-finite loss or gradient, or an update that leaves non-finite weights, stops the run
    here, before anything of this step is saved."""
    for p in run.params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if run.accelerator.num_processes > 1 and not is_sharded(run.model):  # FSDP2 has reduced its own
            p.grad = run.accelerator.reduce(p.grad, "mean")
    grad_norm = local_value(torch.nn.utils.clip_grad_norm_(run.params, max_grad_norm)).item()
    if not math.isfinite(grad_norm):  # a NaN/inf loss gives NaN gradients: the update would spoil every weight
        stop_not_finite(run, step, f"the loss or a gradient is not finite (gradient norm {grad_norm})")
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if not all_finite(run.params):
        stop_not_finite(run, step, "the update left non-finite adapter weights (the learning rate is too high)")
    return grad_norm, lr


def all_finite(tensors: list) -> bool:
    return bool(torch.stack([t.detach().abs().amax().float() for t in tensors]).isfinite().all())


def stop_not_finite(run: Run, step: int, what: str):
    saved = list_checkpoints(run.run_dir)
    kept = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint had been saved"
    raise KeelError(f"step {step}: {what}; the run stopped and {kept} (lower --learning_rate, keep --max_grad_norm "
                    "finite, or check the data)")


def write_record(run: Run, args: TrainArgs, record: dict, step: int):
    """One line of logging.jsonl, and the same scalars to --report_to (main process)."""
    line = json.dumps({**record, "global_step": step}) + "\n"
    try:
        with open(run.run_dir / "logging.jsonl", "a", encoding="utf-8") as f:
            f.write(line)
    except OSError as e:  # a full disk, a folder gone read-only
        raise KeelError(f"step {step}: could not append to {run.run_dir / 'logging.jsonl'}: "
                        f"{failure_reason(e, run.run_dir)}; the checkpoints saved so far are untouched") from None
    report(args.report_to, run.run_dir, record, step, run.config)


def save_step(run: Run, args: TrainArgs, step: int, record: dict, best: dict, **state) -> dict:
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
    adapter, optimizer = gather_state(run.model, run.optimizer) if is_sharded(run.model) else (None, None)
    rngs = rng_states(run.accelerator)
    if run.accelerator.is_main_process:
        state = {"optimizer": optimizer or run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                 "rng": rng_state(), "rng_ranks": rngs, "step": step, "best": best, **state}
        save_checkpoint(run.run_dir, step, run.accelerator.unwrap_model(run.model), state, run.config,
                        state_dict=adapter)
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


# Probe metrics echoed on the eval line (all of them go to logging.jsonl).
SHOWN_PROBES = ("identity_hit", "identity_robustness", "leakage", "drift_kl")


def start_run(margs: ModelArgs, args: TrainArgs, mine: dict, resume_keys) -> tuple:
    """The processes, the seed, the default accumulation, and where the run goes: (accelerator, model args,
    checkpoint resumed or None, run folder, the resumed checkpoint's saved args). Nothing is created on disk yet."""
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list, set_seed

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(args.seed)
    if args.gradient_accumulation_steps is None:
        args.gradient_accumulation_steps = default_accumulation(args.per_device_train_batch_size,
                                                                accelerator.num_processes)
    output_dir = check_writable(Path(args.output_dir))  # created once the model and data have loaded
    resume = find_resume_dir(args.resume_from_checkpoint, output_dir) if args.resume_from_checkpoint else None
    saved = {}
    if resume:
        margs, saved = resumed_model(resume, margs, mine, resume_keys)
        run_dir = resume.parent
    else:
        run_dir = new_run_dir(output_dir) if accelerator.is_main_process else None
        run_dir = Path(broadcast_object_list([run_dir])[0])
    return accelerator, margs, resume, run_dir, saved


def trainable_model(margs: ModelArgs, lora: LoraArgs, data: DataArgs, args: TrainArgs, accelerator, quant=None,
                    shard: bool = False) -> tuple:
    """(model, tokenizer, info, trainable parameters): base weights frozen, LoRA trainable (a new adapter, or the one
    --adapters continues), in train mode. Fills what the model's files know: the identity, the system prompt, and
    the defaults of --packing_length and --cpu_autocast_bf16 (so args.json says what ran).

    quant (QuantArgs): the base model loaded in 4/8 bits (QLoRA). shard (--fsdp fsdp2): loaded into host memory,
    then sharded across the processes onto their device (keel/train/distributed.py)."""
    device = accelerator.device
    model, tok, info = load_model(margs, trainable_adapter=bool(margs.adapters),
                                  device=torch.device("cpu") if shard else device, quant=quant)
    quantized = quant is not None and quant.enabled
    if not margs.adapters:
        model = apply_lora(model, lora)
    use_cheap_dropout(model)  # new, resumed or continued adapter alike, so a resumed run draws the same masks
    data.model_name = data.model_name or info.model_name or []
    data.model_author = data.model_author or info.model_author or []
    if data.system is None:
        data.system = info.system
    # on by default where memory is the limit: a GPU, or a quantized base (QLoRA)
    if args.gradient_checkpointing if args.gradient_checkpointing is not None else device.type == "cuda" or quantized:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    if shard:
        model = shard_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if args.packing_length is None:  # on CPU long packed passes get slower per token (docs/performance.md)
        args.packing_length = 256 if device.type == "cpu" else args.per_device_train_batch_size * data.max_length
    # a quantized base computes in its own dtype; FSDP2 gathers weights in the dtype they were sharded in
    args.cpu_autocast_bf16 = False if quantized or shard else cpu_bf16_training(args.cpu_autocast_bf16, device,
                                                                                 warn=accelerator.is_main_process)
    return model, tok, info, params


@dataclass
class StepPlan:
    """How many rows make an optimizer step, how many steps an epoch, and the run's total."""
    rows_per_step: int
    steps_per_epoch: int
    total: int


def optimizer_and_schedule(params: list, args: TrainArgs, n_rows: int, accelerator) -> tuple:
    """(AdamW, the warm-up + decay schedule, StepPlan) for `n_rows` training rows; says when --save_steps
    exceeds the run."""
    from transformers import get_scheduler

    rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
    steps_per_epoch = len(epoch_windows(n_rows, rows_per_step, args.seed, 0, 0, accelerator.num_processes))
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    if args.save_steps > total and accelerator.is_main_process:
        # ms-swift runs such a command and saves the final checkpoint; so does Keel, and says so.
        print(f"note: --save_steps {args.save_steps} exceeds the run ({total} steps): only the final checkpoint "
              "will be written" + (" and evaluated" if args.eval_steps > total else ""))
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(args.warmup_ratio * total),
                              num_training_steps=total)
    return optimizer, scheduler, StepPlan(rows_per_step, steps_per_epoch, total)


def run_config(configs: list, info, data: DataArgs, plan: StepPlan, accelerator, **extra) -> dict:
    """args.json: every flag as it ran, plus what the model's files and the data decided."""
    from keel.core.flags import to_dict

    config = {**to_dict(*configs), "model": info.model, "base_model_path": info.path, "system": data.system,
              "total_steps": plan.total, "world_size": accelerator.num_processes, "command": command_line(configs),
              **extra}
    config.pop("resume_from_checkpoint", None)
    return config


def command_line(configs: list) -> str:
    """The command that reruns this training: every flag whose value differs from its default, as it ran (what the
    model's files decided included), for the model card."""
    from keel.core.flags import to_argv

    argv, skip = [], False
    for a in to_argv(*configs):
        skip = a == "--resume_from_checkpoint" or (skip and not a.startswith("--"))
        if not skip:
            argv.append(a)
    prog = "keel rlhf" if any(hasattr(c, "rlhf_type") for c in configs) else "keel sft"
    return f"{prog} {shlex.join(argv)}"


def restore(run: Run, resume: Path) -> dict:
    """Optimizer, schedule, random state, step and best from a checkpoint; returns the whole saved state."""
    state = load_state(resume)
    if is_sharded(run.model):
        load_optimizer_state(run.model, run.optimizer, state["optimizer"])
    else:
        run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    ranks = state.get("rng_ranks") or []
    # each process's own random state where the run had as many processes, so its dropout masks continue
    set_rng_state(ranks[run.accelerator.process_index] if len(ranks) == run.accelerator.num_processes else state["rng"])
    run.step, run.best = state["step"], state["best"]
    return state


def training_probe(args: TrainArgs, model, tok, data: DataArgs):
    """--eval_identity: the identity, leakage and drift probe run at every eval, else None."""
    if not args.eval_identity:
        return None
    from keel.evals.probe import TrainingProbe

    return TrainingProbe(model, tok, data.system, data.model_name, data.model_author)


def step_record(run: Run, step: int, start_step: int, start: float, since: float, tokens: int, grad_norm: float,
                lr: float) -> dict:
    """The logged fields both loops share: schedule, progress, speed since the last record, and peak memory."""
    elapsed, dt = time.time() - start, max(time.time() - since, 1e-9)
    return {"grad_norm": round(grad_norm, 4), "learning_rate": lr, "epoch": round(step / run.steps_per_epoch, 3),
            "global_step/max_steps": f"{step}/{run.total}", "elapsed_time": round(elapsed, 1),
            "remaining_time": round(elapsed / (step - start_step) * (run.total - step), 1),
            "train_tokens_per_second": round(tokens * run.accelerator.num_processes / dt, 1),
            "memory": round(peak_memory_gb(run.accelerator.device), 3)}


def evaluate_log_save(run: Run, args: TrainArgs, step: int, record: dict, best: dict, evaluate, **state) -> dict:
    """The end of a step: evaluate (validation rows, then the probe) at eval and save steps, write the record, save
    a checkpoint (with `state`) at save steps and the last; returns the best checkpoint so far."""
    from tqdm import tqdm

    save = step % args.save_steps == 0 or step == run.total
    main_process = run.accelerator.is_main_process
    if run.val_rows and (step % args.eval_steps == 0 or save):
        record.update(evaluate())
        if run.probe is not None:
            record.update(run.probe.probe(run.model))
        if main_process:
            tqdm.write(f"eval {step}/{run.total} | " + " | ".join(
                f"{k} {v}" for k, v in record.items() if k.startswith("eval_") or k in SHOWN_PROBES))
    if record and main_process:
        write_record(run, args, record, step)
    if save:
        best = save_step(run, args, step, record, best, **state)
    return best
