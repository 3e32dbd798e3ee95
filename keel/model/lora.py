"""LoRA configuration and how it is put on a model (through peft).

    model = apply_lora(model, LoraArgs(lora_rank=8, lora_alpha=32, target_modules=["all-linear"]))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from keel.core.errors import KeelError


@dataclass
class LoraArgs:
    train_type: str = field(default="lora", metadata={"aliases": ["--tuner_type"], "choices": ["lora"]})
    """What to train: lora (LoRA adapters on frozen base weights). --tuner_type is the newer name."""
    lora_rank: int = 8
    """LoRA rank r."""
    lora_alpha: int = 32
    """LoRA scaling alpha (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Layers to adapt: all-linear (every linear layer of the blocks, not the output head) or module names."""

    def __post_init__(self):
        if self.lora_rank < 1:
            raise KeelError(f"--lora_rank must be >= 1, got {self.lora_rank}")
        if self.lora_alpha <= 0:
            raise KeelError(f"--lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise KeelError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.target_modules:
            raise KeelError("--target_modules needs all-linear or at least one module name")


def apply_lora(model, args: LoraArgs):
    """Wrap `model` in a peft LoRA model; only the adapters are trainable."""
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if args.target_modules == ["all-linear"] else list(args.target_modules)
    if targets != "all-linear":
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in targets if t not in names]
        if missing:
            raise KeelError(f"--target_modules: no module named {', '.join(missing)} in this model")
    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


class _MaskedScale(torch.autograd.Function):
    """x * keep * scale that keeps only the bool mask for backward (1 byte per element, not a float copy)."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep * scale

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None, None


class CheapDropout(torch.nn.Module):
    """Dropout whose mask costs a quarter of the random draws of nn.Dropout.

    On CPU, peft's nn.Dropout on every LoRA input (7 per block) is a visible share of a training
    step (docs/performance.md): one Bernoulli draw per element is slow. Here one 64-bit draw gives four
    16-bit uniforms, so the drop probability is p rounded to 1/65536 (0.05 -> 0.0500031) and the
    kept values are scaled by 1 / (1 - p) as nn.Dropout does. CUDA keeps nn.Dropout (it is cheap there).
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = round(p * 65536) - 32768     # int16 values below it are dropped

    def forward(self, x):
        if not self.training or x.device.type != "cpu":
            return torch.nn.functional.dropout(x, self.p, self.training)
        n = x.numel()
        draws = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
        keep = draws.view(torch.int16)[:n].view(x.shape) >= self.threshold
        return _MaskedScale.apply(x, keep, 1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_cheap_dropout(model) -> int:
    """Swap the nn.Dropout on each LoRA input for CheapDropout; returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            for name, d in drops.items():
                if isinstance(d, torch.nn.Dropout):
                    drops[name] = CheapDropout(d.p)
                    swapped += 1
    return swapped
