"""`keel sft`: LoRA supervised fine-tuning, ms-swift's flags, one readable loop.

    keel sft --train_type lora --dataset self_cognition.json --num_train_epochs 10 \
        --model_name "Keel Robot" --model_author "Keel Lab"
    keel sft --model Qwen2.5-7B-Instruct --dataset 'AI-ModelScope/alpaca-gpt4-data-zh#500' \
        'AI-ModelScope/alpaca-gpt4-data-en#500' self_cognition.json --gradient_accumulation_steps 16 ...
    torchrun --nproc_per_node 2 -m keel sft ...      # data sharded across processes (gloo on CPU)
    keel sft --config run.yaml --learning_rate 2e-4   # YAML of the same keys; flags win

Output: output_dir/vN-YYYYMMDD-HHMMSS/ with args.json, logging.jsonl, manifest.json, images/ and
checkpoint-N/ folders (PEFT adapter + args.json + training_state.pt for --resume_from_checkpoint).

How a step works: an optimizer step sees per_device_train_batch_size x gradient_accumulation_steps
rows per process, exactly as in ms-swift. Keel packs those rows, padding-free, into forward passes
of at most per_device_train_batch_size x max_length tokens, and divides the summed loss by the
number of label tokens in the whole step, so every answer token weighs the same.
--dataloader_num_workers is accepted for compatibility: rows are tokenized once, in memory.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from keel.ballast import resolve_ballast
from keel.batching import epoch_windows, micro_batches, token_loss
from keel.checkpoint import check_writable, find_resume_dir, load_state
from keel.chat import IGNORE_INDEX
from keel.data.mix import DataArgs, build_datasets, parse_spec
from keel.errors import KeelError
from keel.flags import parse_flags, to_dict
from keel.lora import LoraArgs, apply_lora, use_cheap_dropout
from keel.model import ModelArgs, bf16_frozen_weights, cpu_bf16_training, eval_mode, load_model
from keel.tracking import check_report_to
from keel.training import (Run, close_run, new_run_dir, open_run_dir, optimizer_step, peak_memory_gb, resumed_model,
                           save_step, set_rng_state, write_record)

# Flags that must match for a checkpoint to be resumed by this run.
RESUME_KEYS = ("model", "dataset", "seed", "data_seed", "per_device_train_batch_size",
               "gradient_accumulation_steps", "lora_rank", "max_length", "ballast_loss",
               "ballast_guard")
# --ballast_loss: at how many of a ballast answer's first tokens cross-entropy applies beside the KL (keel/distill.py)
BALLAST_CE_TOKENS = {"kl": 0, "ce+kl": 1 << 30}
BALLAST_LOSSES = ("ce", *BALLAST_CE_TOKENS)


def check_ballast_loss(value: str):
    """--ballast_loss, as keel sft and keel recipe identity both take it."""
    if value not in BALLAST_LOSSES:
        raise KeelError(f"--ballast_loss must be {', '.join(BALLAST_LOSSES[:-1])} or {BALLAST_LOSSES[-1]}, "
                        f"got '{value}'")
# Probe metrics echoed on the eval line (all of them go to logging.jsonl).
SHOWN_PROBES = ("identity_hit", "identity_robustness", "leakage", "drift_kl")


@dataclass
class TrainArgs:
    output_dir: str = "output"
    """Runs are written to OUTPUT_DIR/vN-YYYYMMDD-HHMMSS/."""
    num_train_epochs: float = 3.0
    """Passes over the training mixture."""
    max_steps: int = -1
    """Stop after this many optimizer steps (overrides --num_train_epochs when > 0)."""
    per_device_train_batch_size: int = 1
    """Rows per micro-batch per process."""
    per_device_eval_batch_size: int = 1
    """Rows per evaluation micro-batch per process."""
    gradient_accumulation_steps: int | None = None
    """Micro-batches per optimizer step (default, as ms-swift: ceil(16 / batch size / processes))."""
    learning_rate: float = 1e-4
    """Peak learning rate (AdamW)."""
    lr_scheduler_type: str = "cosine"
    """Learning-rate schedule after warm-up: cosine, linear or constant."""
    warmup_ratio: float = 0.0
    """Share of the steps spent warming the learning rate up from 0."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in the backward pass to save memory (default: on for CUDA, off on CPU, where it costs time)."""
    eval_steps: int = 500
    """Evaluate on the validation rows every N steps (and at the end)."""
    save_steps: int = 500
    """Save a checkpoint every N steps (the final step is always saved)."""
    save_total_limit: int | None = None
    """Keep only the newest N checkpoints, plus the best one."""
    logging_steps: int = 5
    """Print and log metrics every N steps."""
    seed: int = 42
    """Seed for weights init, dropout and data order."""
    resume_from_checkpoint: str | None = None
    """Continue a run from a checkpoint folder, or 'true' for the newest one under --output_dir."""
    dataloader_num_workers: int = 0
    """Accepted for ms-swift compatibility; rows are tokenized once and held in memory."""
    packing: bool = True
    """Pack rows into padding-free sequences (exact; much less wasted compute)."""
    share_prefix: bool = True
    """With packing, rows of a pass that start alike (system prompt, template) compute that start once (exact)."""
    packing_length: int | None = None
    """Tokens per packed forward pass (default: 256 on CPU, the fastest measured there; batch x max_length on GPU)."""
    cpu_autocast_bf16: bool | None = None
    """On CPU, train in bfloat16: frozen base weights stored in bf16, matmuls in bf16 autocast, LoRA weights and optimizer in fp32. Default: on where the CPU has native bf16 (AVX-512 BF16 or AMX: ~1.25x faster, same outcomes over two seeds; docs/performance.md), off elsewhere (emulated bf16 is slower than fp32)."""
    eval_identity: bool = False
    """At every eval: identity hit rate, leakage and drift from the base model (cheap probes)."""
    ballast_loss: str = "ce"
    """How ballast#N rows are learned: ce (cross-entropy on the base model's greedy answer), kl (the base model's top-20 next-token probabilities at each answer token, computed once before training; keel/distill.py) or ce+kl (both)."""
    ballast_guard: float = 0.0
    """Guard rows at this weight (0: none): two ordinary prompts per ballast#N row that no ballast row uses, each followed by the opening of a self-introduction from the training answers that name --model_name ("I am"); the name's first token is learned as unlikely there and the first answer token as the base model's distribution, each position counted W times (keel/distill.py; 4 halved the embedded model's Chinese leakage at a cost in identity, docs/experiment.md)."""
    metric_for_best_model: str = "eval_loss"
    """Which metric picks best_model_checkpoint: eval_loss, identity_hit or identity_robustness (the probe's lowest cell)."""
    max_drift: float | None = None
    """With --eval_identity: a checkpoint whose drift (KL to base) exceeds this cannot be the best."""
    report_to: list[str] = field(default_factory=lambda: ["none"])
    """Also write the logged scalars to tensorboard, wandb and/or swanlab (each needs its package), or none."""
    config: str | None = None
    """A YAML file of these same keys; flags on the command line win."""

    def __post_init__(self):
        check_report_to(self.report_to)
        checks = [(self.learning_rate > 0, f"--learning_rate must be > 0, got {self.learning_rate}"),
                  (self.per_device_train_batch_size >= 1, "--per_device_train_batch_size must be >= 1"),
                  (self.per_device_eval_batch_size >= 1, "--per_device_eval_batch_size must be >= 1"),
                  (self.gradient_accumulation_steps is None or self.gradient_accumulation_steps >= 1,
                   "--gradient_accumulation_steps must be >= 1"),
                  (self.num_train_epochs > 0 or self.max_steps > 0, "--num_train_epochs must be > 0"),
                  (0 <= self.warmup_ratio < 1, "--warmup_ratio must be in [0, 1)"),
                  (self.eval_steps >= 1 and self.save_steps >= 1 and self.logging_steps >= 1,
                   "--eval_steps, --save_steps and --logging_steps must be >= 1"),
                  (self.save_total_limit is None or self.save_total_limit >= 1, "--save_total_limit must be >= 1"),
                  (self.lr_scheduler_type in ("cosine", "linear", "constant"),
                   f"--lr_scheduler_type must be cosine, linear or constant, got '{self.lr_scheduler_type}'"),
                  (self.metric_for_best_model in ("eval_loss", "identity_hit", "identity_robustness"),
                   "--metric_for_best_model must be eval_loss, identity_hit or identity_robustness"),
                  (self.packing_length is None or self.packing_length >= 16, "--packing_length must be >= 16"),
                  (self.ballast_guard >= 0, f"--ballast_guard must be >= 0, got {self.ballast_guard:g}")]
        for ok, msg in checks:
            if not ok:
                raise KeelError(msg)
        check_ballast_loss(self.ballast_loss)


def default_accumulation(batch_size: int, processes: int) -> int:
    """ms-swift's default: about 16 rows per optimizer step whatever the batch size and process count."""
    return max(1, math.ceil(16 / batch_size / processes))



@torch.no_grad()
def evaluate_loss(model, rows, args: TrainArgs, pad_id, device, accelerator) -> dict:
    loss_sum, n_labels, n_correct = 0.0, 0, 0
    with eval_mode(model):
        for batch in micro_batches(rows[accelerator.process_index::accelerator.num_processes], args.packing,
                                   args.per_device_eval_batch_size, args.packing_length, pad_id, args.share_prefix):
            loss, n, correct = token_loss(model, batch, device)
            loss_sum += loss.item()
            n_labels += n
            n_correct += correct
    totals = accelerator.reduce(torch.tensor([loss_sum, n_labels, n_correct], device=device), "sum")
    return {"eval_loss": round(totals[0].item() / max(totals[1].item(), 1), 4),
            "eval_token_acc": round(totals[2].item() / max(totals[1].item(), 1), 4)}



def setup(margs: ModelArgs, data: DataArgs, lora: LoraArgs, args: TrainArgs) -> Run:
    """Model with LoRA, tokenized rows, optimizer and schedule, the run folder; resumed state if asked."""
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list, set_seed
    from transformers import get_scheduler

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main_process, device = accelerator.is_main_process, accelerator.device
    set_seed(args.seed)
    if args.gradient_accumulation_steps is None:
        args.gradient_accumulation_steps = default_accumulation(args.per_device_train_batch_size,
                                                                accelerator.num_processes)

    # --- where the run goes, and what it resumes from
    output_dir = check_writable(Path(args.output_dir))  # created once the model and data have loaded
    resume = find_resume_dir(args.resume_from_checkpoint, output_dir) if args.resume_from_checkpoint else None
    if resume:
        margs, _ = resumed_model(resume, margs, to_dict(data, lora, args), RESUME_KEYS)
        run_dir = resume.parent
    else:
        run_dir = new_run_dir(output_dir) if main_process else None
        run_dir = Path(broadcast_object_list([run_dir])[0])

    # --- model: base weights frozen, LoRA adapters trainable
    model, tok, info = load_model(margs, trainable_adapter=bool(margs.adapters), device=device)
    if not margs.adapters:
        model = apply_lora(model, lora)
    use_cheap_dropout(model)  # new, resumed or continued adapter alike, so a resumed run draws the same masks
    data.model_name = data.model_name or info.model_name or []
    data.model_author = data.model_author or info.model_author or []
    if data.system is None:
        data.system = info.system
    use_ckpt = args.gradient_checkpointing if args.gradient_checkpointing is not None else device.type == "cuda"
    if use_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if args.packing_length is None:  # on CPU long packed passes get slower per token (docs/performance.md)
        args.packing_length = 256 if device.type == "cpu" else args.per_device_train_batch_size * data.max_length
    cpu_bf16 = cpu_bf16_training(args.cpu_autocast_bf16, device, warn=main_process)
    args.cpu_autocast_bf16 = cpu_bf16  # args.json says what ran

    # --- data: ballast#N answered by the base model into a file, then files -> tokenized rows, once
    specs, aliases = resolve_ballast(data.dataset, model, tok, data.system, run_dir,
                                    mix=data.ballast_system_mix)
    train_rows, val_rows, manifest = build_datasets(dataclasses.replace(data, dataset=specs), tok)
    for entry in manifest["sources"]:
        entry["spec"] = aliases.get(entry["spec"], entry["spec"])
    teacher, ballast_rows = None, []
    if aliases and (args.ballast_loss != "ce" or args.ballast_guard):
        # The ballast files rendered by the same data layer, so their ids match the training rows'.
        files = [parse_spec(spec)[0] for spec in aliases]  # every row of each file, whatever share is taken
        ballast_rows = build_datasets(dataclasses.replace(data, dataset=files, val_dataset=[],
                                                          split_dataset_ratio=0.0), tok)[0]
    if args.ballast_guard and not (aliases and data.model_name):
        raise KeelError("--ballast_guard needs ballast#N in --dataset and the new name (--model_name)")
    guards = []
    if args.ballast_guard:
        from keel.distill import ballast_guards

        guards, intros = ballast_guards(files, len(ballast_rows), train_rows, tok, data, args.seed)
        if main_process:
            print(f"ballast guard: {len(guards)} guard rows on spare prompts at weight {args.ballast_guard:g}, from "
                  f"{len(intros['zh'])} zh and {len(intros['en'])} en self-introductions")
    if (args.ballast_loss != "ce" and aliases) or guards:
        from keel.distill import Teacher

        t0 = time.time()  # fp32 like the answers themselves (before bf16_frozen_weights)
        teacher = Teacher.of(model, (ballast_rows if args.ballast_loss != "ce" else []) + guards, device,
                             ce_tokens=BALLAST_CE_TOKENS.get(args.ballast_loss, 0), pack_tokens=args.packing_length)
        if guards:
            teacher.guards = {tuple(ids): guards[i::len(ballast_rows)] for i, (ids, _) in enumerate(ballast_rows)}
            teacher.guard_weight = args.ballast_guard
        if main_process:
            print(f"ballast loss {args.ballast_loss}: the base model's top-{teacher.k} distributions for "
                  f"{len(teacher) - len(guards)} ballast rows" + (f" and {len(guards)} guard rows" if guards else "")
                  + f" ({time.time() - t0:.1f} s)")
    if cpu_bf16:  # after the ballast, so its answers are the fp32 base model's whatever the training precision
        bf16_frozen_weights(model)
    rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
    steps_per_epoch = len(epoch_windows(len(train_rows), rows_per_step, args.seed, 0, 0, accelerator.num_processes))
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    if args.save_steps > total and main_process:
        # ms-swift runs such a command and saves the final checkpoint; so does Keel, and says so.
        print(f"note: --save_steps {args.save_steps} exceeds the run ({total} steps): only the final checkpoint "
              "will be written" + (" and evaluated" if args.eval_steps > total else ""))

    # --- optimizer and schedule
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(args.warmup_ratio * total),
                              num_training_steps=total)
    config = {**to_dict(margs, data, lora, args), "model": info.model, "base_model_path": info.path,
              "system": data.system, "total_steps": total, "world_size": accelerator.num_processes}
    config.pop("resume_from_checkpoint", None)
    run = Run(accelerator, model, tok, params, optimizer, scheduler, train_rows, val_rows, run_dir,
              config, total, steps_per_epoch, rows_per_step, teacher=teacher)
    if resume:
        state = load_state(resume)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        run.step, run.best = state["step"], state["best"]
    if args.eval_identity:
        from keel.evals.probe import TrainingProbe
        run.probe = TrainingProbe(model, tok, data.system, data.model_name, data.model_author)

    if main_process:
        open_run_dir(run_dir, resume, run.step, config, manifest)
        print(f"run {run_dir} | {total} steps | {sum(p.numel() for p in params):,} trainable parameters | "
              f"device {device}")
    return run


def train(margs: ModelArgs, data: DataArgs, lora: LoraArgs, args: TrainArgs) -> dict:
    """Run `keel sft`; returns the run folder and the last and best checkpoints."""
    from tqdm import tqdm

    run = setup(margs, data, lora, args)
    accelerator, model, total = run.accelerator, run.model, run.total
    main_process, device, pad_id = accelerator.is_main_process, accelerator.device, run.tok.pad_token_id
    step, best = run.step, run.best

    bar = tqdm(total=total, initial=step, disable=not main_process, dynamic_ncols=True, leave=False)
    log = {"loss": 0.0, "labels": 0, "correct": 0, "tokens": 0, "t0": time.time()}
    start, start_step, windows = time.time(), step, {}
    while step < total:
        epoch, index = divmod(step, run.steps_per_epoch)
        if epoch not in windows:
            windows = {epoch: epoch_windows(len(run.train_rows), run.rows_per_step, args.seed, epoch,
                                            accelerator.process_index, accelerator.num_processes)}
        rows = [run.train_rows[i] for i in windows[epoch][index]]
        if run.teacher:
            rows = run.teacher.with_guards(rows)
        # Normalise by the label tokens of the whole step, on every process, before any backward.
        n_local = sum(sum(x != IGNORE_INDEX for x in labels[1:]) for _, labels in rows)
        n_step = accelerator.reduce(torch.tensor(n_local, device=device), "sum").item()
        for batch in micro_batches(rows, args.packing, args.per_device_train_batch_size, args.packing_length, pad_id,
                                   args.share_prefix):
            soft = run.teacher.batch(rows[batch["rows"]]) if run.teacher else None
            loss_sum, n, correct = token_loss(model, batch, device, soft=soft)
            (loss_sum * accelerator.num_processes / n_step).backward()  # the reduce below averages over processes
            log["loss"] += loss_sum.item()
            log["labels"] += n
            log["correct"] += correct
            log["tokens"] += batch["n_tokens"]  # the rows' own tokens: a shared prefix counts once per row
        grad_norm, lr = optimizer_step(run, args.max_grad_norm)
        step += 1
        bar.update(1)

        last = step == total
        record = {}
        if step % args.logging_steps == 0 or last:
            elapsed = time.time() - start
            dt = max(time.time() - log["t0"], 1e-9)
            record = {"loss": round(log["loss"] / max(log["labels"], 1), 4),
                      "token_acc": round(log["correct"] / max(log["labels"], 1), 4),
                      "grad_norm": round(grad_norm, 4), "learning_rate": lr,
                      "epoch": round(step / run.steps_per_epoch, 3), "global_step/max_steps": f"{step}/{total}",
                      "elapsed_time": round(elapsed, 1),
                      "remaining_time": round(elapsed / (step - start_step) * (total - step), 1),
                      "train_tokens_per_second": round(log["tokens"] * accelerator.num_processes / dt, 1),
                      "memory": round(peak_memory_gb(device), 3)}
            if main_process:
                tqdm.write(f"step {step}/{total} | loss {record['loss']:.4f} | acc {record['token_acc']:.2f} | "
                           f"lr {lr:.2e} | {record['train_tokens_per_second']:.0f} tok/s")
            log = {"loss": 0.0, "labels": 0, "correct": 0, "tokens": 0, "t0": time.time()}
        save = step % args.save_steps == 0 or last
        if run.val_rows and (step % args.eval_steps == 0 or save):
            record.update(evaluate_loss(model, run.val_rows, args, pad_id, device, accelerator))
            if run.probe is not None:
                record.update(run.probe.probe(model))
            if main_process:
                tqdm.write(f"eval {step}/{total} | " + " | ".join(
                    f"{k} {v}" for k, v in record.items() if k.startswith("eval_") or k in SHOWN_PROBES))
        if record and main_process:
            write_record(run, args, record, step)
        if save:
            best = save_step(run, args, step, record, best)
    bar.close()

    if main_process and (data.model_name or data.model_author) and start_step < total:
        # A run that ends without the identity should say so here, not leave the user to find out in chat.
        from keel.evals.probe import identity_check

        hit = identity_check(model, run.tok, data.system, data.model_name, data.model_author)
        print(f"identity check: {hit:.0%} of held-out identity questions answered as "
              f"{' / '.join(data.model_name + data.model_author)}" + ("" if hit >= 0.5 else
              " -- the identity is NOT learned yet: train longer or harder (keel recipe identity's CPU settings: "
              "--learning_rate 2e-4 --gradient_accumulation_steps 4 --num_train_epochs 3; docs/experiment.md)"))
    return close_run(run.run_dir, total, best, start, start_step, main_process)


CONFIGS = (ModelArgs, DataArgs, LoraArgs, TrainArgs)  # this command's flags, in --help order (scripts/gen_reference.py reads it)


def parse_args(argv: list[str]) -> tuple[ModelArgs, DataArgs, LoraArgs, TrainArgs]:
    return tuple(parse_flags(argv, CONFIGS, prog="keel sft",
                             description=__doc__.split("\n")[0]).configs)


def main(argv: list[str]):
    """keel sft --dataset self_cognition.json --model_name NAME --model_author AUTHOR [flags]"""
    train(*parse_args(argv))
