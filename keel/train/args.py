"""The flags of `keel sft` and `keel rlhf`: TrainArgs (both commands: schedule, steps, saving, evaluation) and
SftArgs (keel sft only: packing and how ballast rows are learned). Each field's docstring is its --help text."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from keel.core.errors import KeelError
from keel.train.tracking import check_report_to

# --ballast_loss: at how many of a ballast answer's first tokens cross-entropy applies beside the KL (keel/distill.py)
BALLAST_CE_TOKENS = {"kl": 0, "ce+kl": 1 << 30}


BALLAST_LOSSES = ("ce", *BALLAST_CE_TOKENS)


def check_ballast_loss(value: str):
    """--ballast_loss, as keel sft and keel recipe identity both take it."""
    if value not in BALLAST_LOSSES:
        raise KeelError(f"--ballast_loss must be {', '.join(BALLAST_LOSSES[:-1])} or {BALLAST_LOSSES[-1]}, "
                        f"got '{value}'")


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
    """Recompute activations in the backward pass to save memory (default: on for CUDA and for a quantized base (QLoRA), off otherwise on CPU, where it costs time)."""
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
    packing_length: int | None = None
    """Tokens per packed forward pass (default: 256 on CPU, batch x max_length on GPU; docs/performance.md)."""
    cpu_autocast_bf16: bool | None = None
    """On CPU, train in bfloat16: frozen base weights stored in bf16, matmuls in bf16 autocast, LoRA weights and optimizer in fp32. Default: on where the CPU has native bf16 (AVX-512 BF16 or AMX), off elsewhere, where bf16 is emulated and slower (docs/performance.md)."""
    eval_identity: bool = False
    """At every eval: identity hit rate, leakage and drift from the base model (cheap probes)."""
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
        finite = math.isfinite  # inf and nan would train a run of NaN weights without a word (or never end)
        checks = [(finite(self.learning_rate) and self.learning_rate > 0,
                   f"--learning_rate must be > 0 and finite, got {self.learning_rate}"),
                  (finite(self.max_grad_norm) and self.max_grad_norm > 0,
                   f"--max_grad_norm must be > 0 and finite, got {self.max_grad_norm}"),
                  (finite(self.weight_decay) and self.weight_decay >= 0,
                   f"--weight_decay must be >= 0 and finite, got {self.weight_decay}"),
                  (finite(self.num_train_epochs), f"--num_train_epochs must be > 0 and finite, got {self.num_train_epochs}"),
                  (0 <= self.seed < 2**32, f"--seed must be between 0 and {2**32 - 1} (numpy's range), got {self.seed}"),
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
                  (self.packing_length is None or self.packing_length >= 16, "--packing_length must be >= 16")]
        for ok, msg in checks:
            if not ok:
                raise KeelError(msg)


def default_accumulation(batch_size: int, processes: int) -> int:
    """ms-swift's default: about 16 rows per optimizer step whatever the batch size and process count."""
    return max(1, math.ceil(16 / batch_size / processes))


@dataclass
class SftArgs:
    packing: bool = True
    """Pack rows into padding-free sequences (exact; much less wasted compute)."""
    share_prefix: bool = True
    """With packing, rows of a pass that start alike (system prompt, template) compute that start once (exact)."""
    ballast_loss: str = "ce"
    """How ballast#N rows are learned: ce (cross-entropy on the base model's greedy answer), kl (the base model's top-20 next-token probabilities at each answer token, computed once before training; docs/training.md) or ce+kl (both)."""
    ballast_guard: float = 0.0
    """Guard rows at this weight (0: none): two ordinary prompts per ballast#N row that no ballast row uses, each followed by the opening of a self-introduction that names --model_name; there the name's first token is learned as unlikely and the first answer token as the base model's distribution, each position counted W times (docs/training.md)."""

    dry_run: bool = False
    """Print the memory plan for these flags (from the model's config.json alone: no weights, no data; rows assumed --max_length long) and exit."""
    ignore_memory_plan: bool = False
    """Start even when the memory plan exceeds the device's free memory (the plan is printed at the start of every run)."""

    def __post_init__(self):
        if not self.ballast_guard >= 0:
            raise KeelError(f"--ballast_guard must be >= 0, got {self.ballast_guard:g}")
        check_ballast_loss(self.ballast_loss)
