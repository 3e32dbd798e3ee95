"""Sharded training with FSDP2 (`--fsdp fsdp2`, ms-swift's flag) under torchrun, and the combinations refused.

    torchrun --standalone --nproc_per_node 2 -m keel sft --fsdp fsdp2 --dataset self_cognition.json ...

Each decoder layer and then the root model are sharded with torch.distributed.fsdp.fully_shard: every process
keeps 1/N of each parameter (base and LoRA) and of the optimizer state, and all-gathers a layer's weights just
for its forward and backward. FSDP2 reduce-scatters the LoRA gradients itself, averaged over processes; the
loss is already scaled by the number of processes over the step's answer tokens (keel/train/sft.py), so the
step is the one-process step on the same rows. On gloo (CPU) the average is a sum then a local division
(set_force_sum_reduction_for_comms): some torch versions' gloo reduce-scatter summed when asked to average.

Every forward and backward is then a collective, so all processes run the same number of passes (lockstep);
a checkpoint gathers the full adapter and optimizer state on process 0 and is written in the usual layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from keel.core.errors import KeelError
from keel.model.quant import check_quant_training
from keel.model.template import IGNORE_INDEX
from keel.train.batching import micro_batches


@dataclass
class DistributedArgs:
    fsdp: str | None = None
    """fsdp2: under torchrun, shard every decoder layer and the rest of the model (base weights, LoRA, optimizer state) across the processes with PyTorch's FSDP2; each holds 1/N (docs/training.md). Default: none, each process holds the whole model and LoRA gradients are all-reduced."""

    def __post_init__(self):
        if self.fsdp not in (None, "fsdp2"):
            raise KeelError(f"--fsdp must be fsdp2 (FSDP2's preset; config files are not read), got '{self.fsdp}'")


def check_combination(dist: DistributedArgs, quant, args) -> None:
    """Refuse, before anything loads, what these flags cannot do together (docs/training.md)."""
    if dist.fsdp and quant.enabled:
        raise KeelError("--fsdp fsdp2 with --quant_method bnb is not supported: bitsandbytes' 4/8-bit weights "
                        "are not sharded by FSDP2; run QLoRA on one process or under torchrun without --fsdp")
    if dist.fsdp and args.cpu_autocast_bf16:
        raise KeelError("--cpu_autocast_bf16 true with --fsdp fsdp2 is not supported: FSDP2 gathers the frozen "
                        "weights in the dtype they were sharded in (float32 on a CPU)")
    check_quant_training(quant, args.cpu_autocast_bf16)


def check_processes(dist: DistributedArgs, accelerator) -> None:
    if dist.fsdp and accelerator.num_processes < 2:
        raise KeelError("--fsdp fsdp2 shards the model across processes: launch with "
                        "torchrun --nproc_per_node N -m keel sft ... (N >= 2)")


def shard_model(model):
    """fully_shard each decoder layer (the classes the model says must not be split), then the root: the
    transformers model inside peft's wrapper, which every pass calls, generate's included. Returns `model`,
    whose parameters are now DTensors holding this process's shard."""
    import torch.distributed as tdist
    from torch.distributed.fsdp import FSDPModule, fully_shard

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = set(getattr(inner, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    if not layers:
        raise KeelError(f"--fsdp fsdp2: no decoder layers found in {type(inner).__name__}")
    for layer in layers:
        fully_shard(layer)
    fully_shard(inner)
    if tdist.get_backend() == "gloo":  # sum, then divide here: the same average in every torch version
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_force_sum_reduction_for_comms(True)
    inner._is_fsdp_managed_module = True  # transformers' generate keeps the processes in step (synced_gpus)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return isinstance(inner, FSDPModule)


def local_value(x):
    """A plain tensor for a DTensor (the whole of it: a gradient norm, a reduced total), else x as it is."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


def filler_batch(pad_id: int, packing: bool, budget: int) -> dict:
    """A one-token pass whose loss is multiplied by 0: it only joins the other processes' collectives."""
    return {**micro_batches([([pad_id, pad_id], [IGNORE_INDEX, pad_id])], packing, 1, budget, pad_id)[0],
            "filler": True}


def lockstep(batches: list, accelerator, filler: dict) -> list:
    """This process's micro-batches, then filler passes up to the most any process runs: under FSDP each pass
    all-gathers weights (and each backward reduce-scatters), so a process that stopped early would hang the rest."""
    import torch.distributed as tdist

    most = torch.tensor(len(batches), device=accelerator.device)
    tdist.all_reduce(most, op=tdist.ReduceOp.MAX)
    return list(batches) + [filler] * (int(most.item()) - len(batches))


def gather_state(model, optimizer) -> tuple[dict, dict]:
    """(adapter, optimizer state), whole, on process 0 (empty elsewhere); every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    whole = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return (get_model_state_dict(model, options=whole),
            get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """A gathered optimizer state (gather_state) back into this process's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def shard_shares(model) -> dict[str, tuple[int, int]]:
    """{parameter: (elements held by this process, elements in all)}: what sharding left here."""
    from torch.distributed.tensor import DTensor

    return {n: (p.to_local().numel() if isinstance(p, DTensor) else p.numel(), p.numel())
            for n, p in model.named_parameters()}
