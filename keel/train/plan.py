"""keel sft's memory plan for its own flags: the model's config.json, the run's dtype, quantization, LoRA, lengths,
batch, checkpointing and processes, planned by keel/train/memory.py before any weight loads.

    plan = run_plan(margs, data, lora, args, sft, quant, dist, device)
    print(format_plan(plan))          # ends with "memory plan: peak N.N GiB per device"
    check_fits(plan, device, sft)     # a one-line error naming the flags that would fit, unless --ignore_memory_plan
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from keel.core.errors import KeelError
from keel.data.mix import DataArgs
from keel.model.load import ModelArgs, base_model_spec, cpu_bf16_training, pick_device_dtype, resolve_model_path
from keel.model.lora import LoraArgs
from keel.model.quant import QuantArgs
from keel.train.args import SftArgs, TrainArgs
from keel.train.distributed import DistributedArgs
from keel.train.memory import GIB, MemoryPlan, fit_advice, plan_memory

DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def world_size() -> int:
    """Processes of this run, as torchrun (WORLD_SIZE) or ms-swift (NPROC_PER_NODE) says; 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("NPROC_PER_NODE") or 1)


def run_plan(margs: ModelArgs, data: DataArgs, lora: LoraArgs, args: TrainArgs, sft: SftArgs, quant: QuantArgs,
             dist: DistributedArgs, device) -> MemoryPlan:
    """The plan for these flags on `device`, from the base model's config.json alone."""
    path = Path(resolve_model_path(base_model_spec(margs))[0]) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise KeelError(f"memory plan: cannot read {path}: {e}") from None
    cpu = device.type == "cpu"
    if cpu:
        dtype = "bf16" if cpu_bf16_training(args.cpu_autocast_bf16, device, warn=False) else "fp32"
    else:
        dtype = DTYPE_NAMES.get(str(pick_device_dtype(margs.torch_dtype)[1]).removeprefix("torch."), "bf16")
    quant_bits = (quant.quant_bits or 4) if quant.quant_method else None
    checkpointing = args.gradient_checkpointing if args.gradient_checkpointing is not None else (
        not cpu or quant_bits is not None)
    packed = args.packing_length or (256 if cpu else args.per_device_train_batch_size * data.max_length)
    return plan_memory(config, dtype=dtype, quant_bits=quant_bits, lora_rank=lora.lora_rank,
                       target_modules=lora.target_modules, train_type=getattr(lora, "train_type", "lora"),
                       max_length=data.max_length, batch_size=args.per_device_train_batch_size,
                       gradient_checkpointing=checkpointing, world_size=world_size(), fsdp=bool(dist.fsdp),
                       device_type="cpu" if cpu else "cuda", packed_tokens=packed if sft.packing else None)


def free_memory_gib(device) -> float:
    """What this device can still give: CUDA's free memory, or the machine's available RAM."""
    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0] / GIB
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("inf")  # not Linux: nothing to check against


def check_fits(plan: MemoryPlan, device, sft: SftArgs):
    """Stop before loading when the plan exceeds the free memory (one line naming flags that would fit)."""
    advice = fit_advice(plan, free_memory_gib(device), {"devices": world_size()})
    if advice and not sft.ignore_memory_plan:
        raise KeelError(f"{advice}; --ignore_memory_plan true starts anyway")
