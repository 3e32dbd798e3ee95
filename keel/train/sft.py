"""`keel sft`: LoRA supervised fine-tuning, ms-swift's flags, one readable loop.

    keel sft --train_type lora --dataset self_cognition.json --num_train_epochs 10 \
        --model_name "Keel Robot" --model_author "Keel Lab"
    keel sft --model Qwen2.5-7B-Instruct --dataset 'AI-ModelScope/alpaca-gpt4-data-zh#500' \
        'AI-ModelScope/alpaca-gpt4-data-en#500' self_cognition.json --gradient_accumulation_steps 16 ...
    torchrun --nproc_per_node 2 -m keel sft ...      # data sharded across processes (gloo on CPU)
    torchrun --standalone --nproc_per_node 2 -m keel sft --fsdp fsdp2 ...   # the model sharded too (FSDP2)
    keel sft --quant_method bnb --quant_bits 4 ...   # QLoRA: LoRA on a 4-bit base model (bitsandbytes, .[qlora])
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
import time

import torch

from keel.core.errors import KeelError
from keel.core.flags import parse_flags, to_dict
from keel.data.mix import DataArgs, build_datasets, parse_spec
from keel.evals.probe import identity_check
from keel.model.load import ModelArgs, bf16_frozen_weights, eval_mode, pick_device_dtype
from keel.model.lora import LoraArgs
from keel.model.quant import QuantArgs, base_precision
from keel.model.template import IGNORE_INDEX
from keel.synth.ballast import resolve_ballast
from keel.synth.guards import ballast_guards
from keel.train.args import BALLAST_CE_TOKENS, SftArgs, TrainArgs
from keel.train.batching import by_start, epoch_windows, micro_batches
from keel.train.distributed import (
    DistributedArgs,
    check_combination,
    check_processes,
    filler_batch,
    is_sharded,
    lockstep,
)
from keel.train.loop import (
    Run,
    close_run,
    evaluate_log_save,
    open_run_dir,
    optimizer_and_schedule,
    optimizer_step,
    restore,
    run_config,
    start_run,
    step_record,
    trainable_model,
    training_probe,
)
from keel.train.losses import token_loss
from keel.train.memory import format_plan
from keel.train.plan import check_fits, run_plan
from keel.train.teacher import Teacher

# Flags that must match for a checkpoint to be resumed by this run.
RESUME_KEYS = ("model", "dataset", "seed", "data_seed", "per_device_train_batch_size",
               "gradient_accumulation_steps", "lora_rank", "max_length", "ballast_loss",
               "ballast_guard", "quant_method", "quant_bits", "fsdp")


@torch.no_grad()
def evaluate_loss(model, rows, args: TrainArgs, sft: SftArgs, pad_id, device, accelerator) -> dict:
    loss_sum, n_labels, n_correct = 0.0, 0, 0
    batches = micro_batches(rows[accelerator.process_index::accelerator.num_processes], sft.packing,
                            args.per_device_eval_batch_size, args.packing_length, pad_id, sft.share_prefix)
    if is_sharded(model):
        batches = lockstep(batches, accelerator, filler_batch(pad_id, sft.packing, args.packing_length))
    with eval_mode(model):
        for batch in batches:
            loss, n, correct = token_loss(model, batch, device)
            if batch.get("filler"):
                continue
            loss_sum += loss.item()
            n_labels += n
            n_correct += correct
    totals = accelerator.reduce(torch.tensor([loss_sum, n_labels, n_correct], device=device), "sum")
    return {"eval_loss": round(totals[0].item() / max(totals[1].item(), 1), 4),
            "eval_token_acc": round(totals[2].item() / max(totals[1].item(), 1), 4)}


def setup(margs: ModelArgs, data: DataArgs, lora: LoraArgs, args: TrainArgs, sft: SftArgs, quant: QuantArgs,
          dist: DistributedArgs) -> Run:
    """Model with LoRA, tokenized rows (ballast#N answered first), soft targets, optimizer and schedule, the run
    folder; resumed state if asked."""
    check_combination(dist, quant, args)
    accelerator, margs, resume, run_dir, _ = start_run(margs, args, to_dict(data, lora, args, sft, quant, dist),
                                                       RESUME_KEYS)
    check_processes(dist, accelerator)
    main_process, device = accelerator.is_main_process, accelerator.device
    plan = run_plan(margs, data, lora, args, sft, quant, dist, device)
    if main_process:
        print(format_plan(plan).splitlines()[-1])
    check_fits(plan, device, sft)
    model, tok, info, params = trainable_model(margs, lora, data, args, accelerator, quant=quant, shard=bool(dist.fsdp))

    # --- data: ballast#N answered by the base model into a file, then files -> tokenized rows, once
    specs, aliases = resolve_ballast(data.dataset, model, tok, data.system, run_dir, mix=data.ballast_system_mix)
    train_rows, val_rows, manifest = build_datasets(dataclasses.replace(data, dataset=specs), tok)
    for entry in manifest["sources"]:
        entry["spec"] = aliases.get(entry["spec"], entry["spec"])
    teacher = ballast_teacher(model, tok, data, args, sft, aliases, train_rows, device, main_process)
    if args.cpu_autocast_bf16:  # after the ballast, so its answers are the fp32 base model's whatever the training precision
        bf16_frozen_weights(model)

    optimizer, scheduler, plan = optimizer_and_schedule(params, args, len(train_rows), accelerator)
    config = run_config([margs, data, lora, args, sft, quant, dist], info, data, plan, accelerator)
    run = Run(accelerator, model, tok, params, optimizer, scheduler, train_rows, val_rows, run_dir,
              config, plan.total, plan.steps_per_epoch, plan.rows_per_step, teacher=teacher)
    if resume:
        restore(run, resume)
    run.probe = training_probe(args, model, tok, data)
    if main_process:
        open_run_dir(run_dir, resume, run.step, config, manifest)
        base = base_precision(model)
        print(f"run {run_dir} | {plan.total} steps | {sum(p.numel() for p in params):,} trainable parameters | "
              + (f"{base} | " if base else "") + f"device {device}")
    return run


def ballast_teacher(model, tok, data: DataArgs, args: TrainArgs, sft: SftArgs, aliases: dict, train_rows: list,
                    device, main_process: bool) -> Teacher | None:
    """--ballast_loss kl / ce+kl and --ballast_guard: the base model's distributions for the ballast rows and the
    guard rows, computed once (adapters off), or None when the ballast is learned by cross-entropy alone."""
    if sft.ballast_guard and not (aliases and data.model_name):
        raise KeelError("--ballast_guard needs ballast#N in --dataset and the new name (--model_name)")
    if not aliases or (sft.ballast_loss == "ce" and not sft.ballast_guard):
        return None
    # The ballast files rendered by the same data layer, so their ids match the training rows'.
    files = [parse_spec(spec)[0] for spec in aliases]  # every row of each file, whatever share is taken
    ballast_rows = build_datasets(dataclasses.replace(data, dataset=files, val_dataset=[],
                                                      split_dataset_ratio=0.0), tok)[0]
    guards = []
    if sft.ballast_guard:
        guards, intros = ballast_guards(files, len(ballast_rows), train_rows, tok, data, args.seed)
        if main_process:
            print(f"ballast guard: {len(guards)} guard rows on spare prompts at weight {sft.ballast_guard:g}, from "
                  f"{len(intros['zh'])} zh and {len(intros['en'])} en self-introductions")
    t0 = time.time()  # fp32 like the answers themselves (before bf16_frozen_weights)
    teacher = Teacher.of(model, (ballast_rows if sft.ballast_loss != "ce" else []) + guards, device,
                         ce_tokens=BALLAST_CE_TOKENS.get(sft.ballast_loss, 0), pack_tokens=args.packing_length)
    if guards:
        teacher.guards = {tuple(ids): guards[i::len(ballast_rows)] for i, (ids, _) in enumerate(ballast_rows)}
        teacher.guard_weight = sft.ballast_guard
    if main_process:
        print(f"ballast loss {sft.ballast_loss}: the base model's top-{teacher.k} distributions for "
              f"{len(teacher) - len(guards)} ballast rows" + (f" and {len(guards)} guard rows" if guards else "")
              + f" ({time.time() - t0:.1f} s)")
    return teacher


def train(margs: ModelArgs, data: DataArgs, lora: LoraArgs, args: TrainArgs, sft: SftArgs,
          quant: QuantArgs | None = None, dist: DistributedArgs | None = None) -> dict:
    """Run `keel sft`; returns the run folder and the last and best checkpoints. The loop stays whole: it is the
    one place to read what a step does."""
    from tqdm import tqdm

    run = setup(margs, data, lora, args, sft, quant or QuantArgs(), dist or DistributedArgs())
    accelerator, model, total = run.accelerator, run.model, run.total
    main_process, device, pad_id = accelerator.is_main_process, accelerator.device, run.tok.pad_token_id
    step, best = run.step, run.best
    filler = filler_batch(pad_id, sft.packing, args.packing_length) if is_sharded(model) else None

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
        if sft.packing and sft.share_prefix:
            rows = by_start(rows)
        # Normalise by the label tokens of the whole step, on every process, before any backward.
        n_local = sum(sum(x != IGNORE_INDEX for x in labels[1:]) for _, labels in rows)
        n_step = accelerator.reduce(torch.tensor(n_local, device=device), "sum").item()
        batches = micro_batches(rows, sft.packing, args.per_device_train_batch_size, args.packing_length, pad_id,
                                sft.share_prefix)
        for batch in lockstep(batches, accelerator, filler) if filler else batches:
            soft = run.teacher.batch(rows[batch["rows"]]) if run.teacher and not batch.get("filler") else None
            loss_sum, n, correct = token_loss(model, batch, device, soft=soft)
            if batch.get("filler"):  # keeps this process in step with the others' collectives; adds nothing
                (loss_sum * 0).backward()
                continue
            (loss_sum * accelerator.num_processes / n_step).backward()  # the reduce below averages over processes
            log["loss"] += loss_sum.item()
            log["labels"] += n
            log["correct"] += correct
            log["tokens"] += batch["n_tokens"]  # the rows' own tokens: a shared prefix counts once per row
        grad_norm, lr = optimizer_step(run, args.max_grad_norm, step + 1)
        step += 1
        bar.update(1)

        record = {}
        if step % args.logging_steps == 0 or step == total:
            # every process's rows: the logged loss is the step's, not process 0's share of it
            summed = accelerator.reduce(torch.tensor([log["loss"], log["labels"], log["correct"]], device=device,
                                                     dtype=torch.float64), "sum").tolist()
            record = {"loss": round(summed[0] / max(summed[1], 1), 4),
                      "token_acc": round(summed[2] / max(summed[1], 1), 4),
                      **step_record(run, step, start_step, start, log["t0"], log["tokens"], grad_norm, lr)}
            if main_process:
                tqdm.write(f"step {step}/{total} | loss {record['loss']:.4f} | acc {record['token_acc']:.2f} | "
                           f"lr {lr:.2e} | {record['train_tokens_per_second']:.0f} tok/s")
            log = {"loss": 0.0, "labels": 0, "correct": 0, "tokens": 0, "t0": time.time()}
        best = evaluate_log_save(run, args, step, record, best,
                                 lambda: evaluate_loss(model, run.val_rows, args, sft, pad_id, device, accelerator))
    bar.close()

    # every process generates under FSDP: each forward pass gathers weights from all of them
    if (main_process or is_sharded(model)) and (data.model_name or data.model_author) and start_step < total:
        # A run that ends without the identity should say so here, not leave the user to find out in chat.
        hit = identity_check(model, run.tok, data.system, data.model_name, data.model_author)
        if main_process:
            print(f"identity check: {hit:.0%} of held-out identity questions answered as "
                  f"{' / '.join(data.model_name + data.model_author)}" + ("" if hit >= 0.5 else
                  " -- the identity is NOT learned yet: train longer or harder (keel recipe identity's CPU settings: "
                  "--learning_rate 2e-4 --gradient_accumulation_steps 4 --num_train_epochs 3; docs/recipe.md)"))
    return close_run(run.run_dir, total, best, start, start_step, main_process)


CONFIGS = (ModelArgs, DataArgs, LoraArgs, TrainArgs, SftArgs, QuantArgs, DistributedArgs)


def parse_args(argv: list[str]) -> tuple[ModelArgs, DataArgs, LoraArgs, TrainArgs, SftArgs, QuantArgs, DistributedArgs]:
    return tuple(parse_flags(argv, list(CONFIGS), prog="keel sft",
                             description=__doc__.split("\n")[0]).configs)


def dry_run(margs: ModelArgs, data: DataArgs, lora: LoraArgs, args: TrainArgs, sft: SftArgs, quant: QuantArgs,
            dist: DistributedArgs):
    """--dry_run true: the memory plan for these flags, from config.json alone; nothing loads, nothing is written."""
    device = pick_device_dtype(margs.torch_dtype)[0]
    print(format_plan(run_plan(margs, data, lora, args, sft, quant, dist, device)))


def main(argv: list[str]):
    """keel sft --dataset self_cognition.json --model_name NAME --model_author AUTHOR [flags]"""
    configs = parse_args(argv)
    (dry_run if configs[4].dry_run else train)(*configs)
