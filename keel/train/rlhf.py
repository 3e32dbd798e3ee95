"""`keel rlhf`: preference training on a LoRA adapter: DPO, ORPO or KTO, ms-swift's `swift rlhf` flags.

    keel rlhf --rlhf_type dpo --dataset pairs.jsonl --adapters output/v0-.../checkpoint-150 --beta 0.1
    keel rlhf --rlhf_type dpo --dataset identity_pairs.jsonl --rpo_alpha 1.0 --model_name Keel --model_author "Keel Lab"
    keel rlhf --rlhf_type kto --dataset kto.jsonl --desirable_weight 1.0 --undesirable_weight 1.0
    keel rlhf --rlhf_type orpo --dataset pairs.jsonl --beta 0.1
    keel rlhf --rlhf_type dpo --quant_method bnb --quant_bits 4 ...   # on a 4-bit base (QLoRA, .[qlora])

Every `keel sft` flag that applies works the same (LoRA, learning rate, epochs, accumulation,
save/eval steps, --resume_from_checkpoint, --eval_identity) and the run folder has the same layout:
args.json, logging.jsonl, manifest.json, images/, checkpoint-N/. Data: keel/data/pairs.py.

The reference model costs no memory: it is the same weights with the LoRA adapter disabled (peft's
`disable_adapter()`), or, when continuing from `--adapters`, that starting adapter before any step.
Either way it is fixed, so its log-probs are computed once per row, in one no-grad pass before
training, and kept in the checkpoints' state (a resumed run reads them back; no second model copy).
A pair is one packed sequence [prompt, chosen, rejected]: the prompt is computed once and each
answer attends to it and to itself (the shared-prefix mask of keel/batching.py), so a DPO step costs
about an SFT step over both answers. The losses (keel/preference.py) follow TRL, which
tests/test_rlhf.py checks them against:
- dpo: -logsigmoid(beta * (chosen log-ratio - rejected log-ratio)) (hinge: relu(1 - beta * delta); ipo:
  (delta - 1 / (2 beta))^2 with each log-ratio divided by its answer's token count, as TRL), + rpo_alpha x
  the chosen answers' token-mean NLL;
- orpo: the chosen answers' token-mean NLL - beta * logsigmoid(log odds ratio of the mean token log-probs)
  (TRL's ORPOTrainer also puts the prompt tokens in the NLL; Keel, like the ORPO paper, only the answer);
- kto: desirable_weight * (1 - sigmoid(beta * (log-ratio - KL))) or undesirable_weight *
  (1 - sigmoid(beta * (KL - log-ratio))); KL is estimated, as in TRL, from each prompt paired with the
  previous row's answer, averaged over the step.
Each step normalises over its pairs (and chosen tokens), so accumulation gives the same step as one batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from keel.core.errors import KeelError
from keel.core.flags import parse_flags, to_dict
from keel.data.mix import DataArgs
from keel.data.pairs import KTO, build_pairs
from keel.model.load import ModelArgs, bf16_frozen_weights, eval_mode
from keel.model.lora import LoraArgs
from keel.model.quant import QuantArgs, base_precision, check_quant_training
from keel.train.args import TrainArgs
from keel.train.batching import epoch_windows
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
from keel.train.preference import (
    answer_logps,
    dpo_loss,
    kto_kl,
    kto_loss,
    kto_units,
    orpo_ratio,
    pack_units,
    reference_logps,
    unit_len,
    units_of,
)

RESUME_KEYS = ("model", "dataset", "seed", "data_seed", "per_device_train_batch_size", "gradient_accumulation_steps",
               "lora_rank", "max_length", "rlhf_type", "beta", "loss_type", "quant_method", "quant_bits")
LOSS_TYPES = {"dpo": ("sigmoid", "hinge", "ipo"), "orpo": ("sigmoid",), "kto": ("kto",)}


@dataclass
class RlhfArgs:
    rlhf_type: str = "dpo"
    """Preference objective: dpo (pairs), orpo (pairs, no reference) or kto (answers labelled true/false)."""
    beta: float | None = None
    """Strength of the preference term (DPO/KTO: the KL penalty's beta; ORPO: lambda). Default 0.1."""
    loss_type: str | None = None
    """DPO: sigmoid (default), hinge or ipo (TRL's: log-ratios averaged per answer token). ORPO and KTO have one loss each."""
    rpo_alpha: float | None = None
    """DPO: add rpo_alpha x the chosen answers' NLL (an SFT term, as in RPO). Default: none."""
    desirable_weight: float = 1.0
    """KTO: weight of the loss on answers labelled true."""
    undesirable_weight: float = 1.0
    """KTO: weight of the loss on answers labelled false."""

    def __post_init__(self):
        if self.rlhf_type not in LOSS_TYPES:
            raise KeelError(f"--rlhf_type must be dpo, orpo or kto, got '{self.rlhf_type}'")
        self.beta = 0.1 if self.beta is None else self.beta
        self.loss_type = self.loss_type or LOSS_TYPES[self.rlhf_type][0]
        if self.beta <= 0:
            raise KeelError(f"--beta must be > 0, got {self.beta}")
        if self.loss_type not in LOSS_TYPES[self.rlhf_type]:
            raise KeelError(f"--loss_type for --rlhf_type {self.rlhf_type} must be "
                            f"{' or '.join(LOSS_TYPES[self.rlhf_type])}, got '{self.loss_type}'")
        if self.rpo_alpha is not None and (self.rpo_alpha < 0 or self.rlhf_type != "dpo"):
            raise KeelError("--rpo_alpha must be >= 0 and goes with --rlhf_type dpo")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise KeelError("--desirable_weight and --undesirable_weight must be > 0")


def step_objective(model, rows, idx, reference, pref: RlhfArgs, budget: int, device, kl=None, backward=True):
    """Run the step's rows (indices idx) in packed passes; backward each pass's share of the step loss.

    Returns summed statistics of the step: loss, rewards, log-probs, counts.
    """
    kind = KTO if pref.rlhf_type == "kto" else "pair"
    stats = {"loss": 0.0, "chosen_rewards": 0.0, "rejected_rewards": 0.0, "correct": 0.0, "chosen_logps": 0.0,
             "rejected_logps": 0.0, "n_chosen": 0, "n_rejected": 0, "tokens": 0}
    n_rows = len(idx)
    n_chosen_tokens = sum(len(rows[i]["chosen"]) for i in idx) if kind == "pair" else 0
    units = units_of([rows[i] for i in idx], kind)
    for group in pack_units(units, budget):
        sums, counts = answer_logps(model, [units[g] for g in group], device)
        ref = reference[[idx[g] for g in group]].to(device)
        if kind == KTO:
            labels = torch.tensor([rows[idx[g]]["label"] for g in group], device=device)
            losses, rewards = kto_loss(sums[:, 0], ref[:, 0], labels, kl, pref.beta, pref.desirable_weight,
                                       pref.undesirable_weight)
            loss = losses.sum() / n_rows
            for lab, key in ((labels, "chosen"), (~labels, "rejected")):
                stats[f"{key}_rewards"] += rewards[lab].sum().item()
                stats[f"{key}_logps"] += sums[lab, 0].sum().item()
                stats[f"n_{key}"] += int(lab.sum())
        else:
            chosen, rejected = sums[:, 0], sums[:, 1]
            nll = -chosen.sum() / n_chosen_tokens
            if pref.rlhf_type == "dpo":
                losses, cr, rr = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], pref.beta, pref.loss_type,
                                          counts[:, 0], counts[:, 1])
                loss = losses.sum() / n_rows + (pref.rpo_alpha or 0.0) * nll
            else:
                ratio, cr, rr = orpo_ratio(chosen / counts[:, 0], rejected / counts[:, 1], pref.beta)
                loss = nll - pref.beta * ratio.sum() / n_rows
                chosen, rejected = chosen / counts[:, 0], rejected / counts[:, 1]  # ORPO reports mean log-probs
            stats["chosen_rewards"] += cr.sum().item()
            stats["rejected_rewards"] += rr.sum().item()
            stats["correct"] += (cr > rr).sum().item()
            stats["chosen_logps"] += chosen.sum().item()
            stats["rejected_logps"] += rejected.sum().item()
            stats["n_chosen"] += len(group)
            stats["n_rejected"] += len(group)
        if backward:
            loss.backward()
        stats["loss"] += loss.item()
        stats["tokens"] += sum(unit_len(units[g]) for g in group)  # computed tokens: a pair's prompt once
    return stats


def summarise(stats: dict, prefix: str = "", digits: int | None = 4) -> dict:
    """Step (or eval) statistics -> logged metrics under TRL's names (rounded to `digits` unless None)."""
    r = (lambda v: round(v, digits)) if digits is not None else (lambda v: v)  # noqa: E731
    out = {f"{prefix}loss": r(stats["loss"])}
    for key in ("chosen", "rejected"):
        if stats[f"n_{key}"]:
            out[f"{prefix}rewards/{key}"] = r(stats[f"{key}_rewards"] / stats[f"n_{key}"])
            out[f"{prefix}logps/{key}"] = r(stats[f"{key}_logps"] / stats[f"n_{key}"])
    if stats["n_chosen"] and stats["n_rejected"]:
        out[f"{prefix}rewards/margins"] = r(stats["chosen_rewards"] / stats["n_chosen"]
                                            - stats["rejected_rewards"] / stats["n_rejected"])
    if "kl" in stats:
        out[f"{prefix}kl"] = r(stats["kl"])
    elif stats["n_chosen"]:
        out[f"{prefix}rewards/accuracies"] = r(stats["correct"] / stats["n_chosen"])
    return out


def evaluate_pairs(model, rows, reference, pref: RlhfArgs, budget, device) -> dict:
    with torch.no_grad(), eval_mode(model):
        idx = list(range(len(rows)))
        kl = kto_kl(model, rows, idx, reference, budget, device) if pref.rlhf_type == "kto" else None
        stats = step_objective(model, rows, idx, reference, pref, budget, device, kl, backward=False)
    return summarise(stats, "eval_")


def setup(margs: ModelArgs, data: DataArgs, lora: LoraArgs, args: TrainArgs, pref: RlhfArgs,
          quant: QuantArgs | None = None) -> Run:
    """As keel sft's setup: model with LoRA, rendered pairs, optimizer, run folder; plus the fixed reference."""
    quant = quant or QuantArgs()
    check_quant_training(quant, args.cpu_autocast_bf16)
    continued = bool(margs.adapters)  # the reference is the starting adapter, not the base weights
    accelerator, margs, resume, run_dir, saved = start_run(margs, args, to_dict(data, lora, args, pref, quant),
                                                           RESUME_KEYS)
    main_process, device = accelerator.is_main_process, accelerator.device
    model, tok, info, params = trainable_model(margs, lora, data, args, accelerator, quant=quant)
    if args.cpu_autocast_bf16:  # before the reference pass: policy and reference alike
        bf16_frozen_weights(model)

    # --- data: pairs (or KTO rows) rendered once; their kind must fit --rlhf_type
    train_rows, val_rows, manifest = build_pairs(data, tok)
    if (manifest["kind"] == KTO) != (pref.rlhf_type == "kto"):
        want = "KTO rows (messages + label)" if pref.rlhf_type == "kto" else "preference pairs (chosen + rejected)"
        raise KeelError(f"--rlhf_type {pref.rlhf_type} trains on {want}; --dataset {data.dataset[0]} holds the other kind")

    optimizer, scheduler, plan = optimizer_and_schedule(params, args, len(train_rows), accelerator)
    reference = ("starting adapter" if continued or (resume and saved.get("reference") == "starting adapter")
                 else "base weights (adapter disabled)")
    config = run_config([margs, data, lora, args, pref, quant], info, data, plan, accelerator, reference=reference)
    run = Run(accelerator, model, tok, params, optimizer, scheduler, train_rows, val_rows, run_dir,
              config, plan.total, plan.steps_per_epoch, plan.rows_per_step)

    # --- the reference log-probs, once per row: from the resumed state, or one no-grad pass now
    if resume:
        state = restore(run, resume)
        run.reference = (state["reference"], state["val_reference"])
    elif pref.rlhf_type == "orpo":  # ORPO has no reference model
        run.reference = (torch.zeros(len(train_rows), 2), torch.zeros(len(val_rows), 2))
    else:
        make = kto_units if pref.rlhf_type == "kto" else (lambda rows: units_of(rows, "pair"))
        run.reference = tuple(reference_logps(model, make(rows), args.packing_length, device, base=not continued)
                              if rows else torch.zeros(0, 2) for rows in (train_rows, val_rows))
    run.probe = training_probe(args, model, tok, data)
    if main_process:
        open_run_dir(run_dir, resume, run.step, config, manifest)
        base = base_precision(model)
        print(f"run {run_dir} | {pref.rlhf_type} | {plan.total} steps | {sum(p.numel() for p in params):,} trainable "
              f"parameters | reference: {reference} | " + (f"{base} | " if base else "") + f"device {device}")
    return run


def rlhf(margs: ModelArgs, data: DataArgs, lora: LoraArgs, args: TrainArgs, pref: RlhfArgs,
         quant: QuantArgs | None = None) -> dict:
    """Run `keel rlhf`; returns the run folder and the last and best checkpoints."""
    from tqdm import tqdm

    run = setup(margs, data, lora, args, pref, quant)
    accelerator, model, total = run.accelerator, run.model, run.total
    main_process, device, budget = accelerator.is_main_process, accelerator.device, args.packing_length
    reference, val_reference = run.reference
    step, best = run.step, run.best
    bar = tqdm(total=total, initial=step, disable=not main_process, dynamic_ncols=True, leave=False)
    log, t0 = [], time.time()
    start, start_step, windows = time.time(), step, {}
    while step < total:
        epoch, index = divmod(step, run.steps_per_epoch)
        if epoch not in windows:
            windows = {epoch: epoch_windows(len(run.train_rows), run.rows_per_step, args.seed, epoch,
                                            accelerator.process_index, accelerator.num_processes)}
        idx = windows[epoch][index]
        kl = kto_kl(model, run.train_rows, idx, reference, budget, device) if pref.rlhf_type == "kto" else None
        stats = step_objective(model, run.train_rows, idx, reference, pref, budget, device, kl)
        if kl is not None:
            stats["kl"] = kl.item()
        grad_norm, lr = optimizer_step(run, args.max_grad_norm, step + 1)
        step += 1
        bar.update(1)
        log.append(stats)

        record = {}
        if step % args.logging_steps == 0 or step == total:
            summed = {k: sum(s.get(k, 0) for s in log) for k in log[0]}
            summed["loss"] /= len(log)  # each step's loss is already a mean
            if "kl" in summed:
                summed["kl"] /= len(log)
            record = {**summarise(summed), **step_record(run, step, start_step, start, t0, summed["tokens"], grad_norm, lr)}
            if main_process:
                third = f"kl {record['kl']:.4f}" if "kl" in record else f"acc {record['rewards/accuracies']:.2f}"
                tqdm.write(f"step {step}/{total} | loss {record['loss']:.4f} | margin "
                           f"{record.get('rewards/margins', float('nan')):.4f} | {third} | lr {lr:.2e} | "
                           f"{record['train_tokens_per_second']:.0f} tok/s")
            log, t0 = [], time.time()
        # the reference log-probs go with the checkpoint: a resumed run needs no base pass
        best = evaluate_log_save(run, args, step, record, best,
                                 lambda: evaluate_pairs(model, run.val_rows, val_reference, pref, budget, device),
                                 reference=reference, val_reference=val_reference)
    bar.close()

    return close_run(run.run_dir, total, best, start, start_step, main_process)


CONFIGS = (ModelArgs, DataArgs, LoraArgs, TrainArgs, RlhfArgs, QuantArgs)


def parse_args(argv: list[str]) -> tuple[ModelArgs, DataArgs, LoraArgs, TrainArgs, RlhfArgs, QuantArgs]:
    return tuple(parse_flags(argv, list(CONFIGS), prog="keel rlhf",
                             description=__doc__.split("\n")[0]).configs)


def main(argv: list[str]):
    """keel rlhf --rlhf_type dpo|orpo|kto --dataset pairs.jsonl [--adapters SFT_CHECKPOINT] [keel sft flags]"""
    rlhf(*parse_args(argv))
