"""Peak memory of a fine-tuning run, planned from the model's config.json alone (no weights, no data).

    plan = plan_memory(config, dtype="bf16", quant_bits=None, lora_rank=8, max_length=2048, batch_size=1,
                       gradient_checkpointing=True)
    print(format_plan(plan))                      # a table, then "memory plan: peak 20.3 GiB per device"
    print(fit_advice(plan, free_gib=16, flags={"devices": 2}) or "fits")

Parameters are counted exactly: the model is built from its config on the meta device (shapes only,
no memory). Every row is assumed `max_length` tokens long, so the plan is a ceiling for the data: a
run whose rows are shorter peaks lower. The terms, per device:

- weights: frozen base in its dtype; bitsandbytes nf4 stores two weights a byte plus one fp32 absmax
  per 64 weights (double quantization: one byte per 64, plus an fp32 per 256 blocks); int8 one byte
  plus an fp32 scale per output row. Embeddings, the output head and norms stay in the compute dtype.
- trainable state: LoRA matrices in fp32 with their gradients and AdamW's two moments (16 bytes a
  parameter). Full fine-tuning: weights in their dtype, an fp32 master copy when that dtype is not
  fp32, fp32 gradients and two fp32 moments.
- activations: what autograd keeps per token and layer (`layer_bytes_per_token`), for all layers, or
  with gradient checkpointing each layer's input plus one layer recomputed; SDPA keeps no T x T
  attention matrix. Backward adds one layer's widest gradients.
- logits: the output head at every token (the worst case; Keel computes it at labelled tokens
  only, `logits_fraction`): three fp32 copies at the loss's backward.
- runtime: on CUDA the context and allocator slack; on CPU the process's measured baseline
  (docs/memory-plan.md), and glibc keeps the previous pass's freed activations in its heap.

FSDP2 divides weights, gradients and optimizer state by the world size and adds two all-gathered
layers (the current and the prefetched one); activations are not divided. DDP divides nothing and
keeps a bucket copy of the trainable gradients.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

from keel.core.errors import KeelError

GIB = 1024 ** 3
DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2, "fp32": 4, "float32": 4, "float": 4}
# nf4: 4 bits a weight; absmax per 64-weight block, fp32, or 8-bit in blocks of 256 with double quantization.
NF4_BYTES = 0.5 + 4 / 64
NF4_DOUBLE_QUANT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# CUDA context (about 0.5 GiB on recent GPUs and torch) plus cuBLAS workspaces and caching-allocator slack.
CUDA_RUNTIME_GIB = 1.0
# RSS of a process with keel sft's imports and the embedded model loaded, less its weights (bench/memory_baseline.py;
# docs/memory-plan.md says where and when).
CPU_RUNTIME_GIB = 0.38


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs from a model, read off a meta-device build of its config."""

    params: int                                # every parameter once (a tied head is the embedding)
    embed: int                                 # input embedding parameters
    head: int                                  # output head parameters, 0 when tied to the embedding
    linears: tuple[tuple[str, int, int], ...]  # (name, in, out) of every nn.Linear except the head
    layer_linears: tuple[tuple[str, int, int], ...]  # those of the first decoder layer, name without prefix
    layers: int
    hidden: int
    intermediate: int
    heads: int
    q_dim: int                                 # heads x head_dim
    kv_dim: int                                # kv heads x head_dim
    vocab: int


@dataclass
class MemoryPlan:
    """Planned peak memory per device, by component (GiB, in print order)."""

    parts: dict[str, float]
    peak_gib: float
    params: int
    trainable: int
    tokens: int                                # tokens per forward pass the activations assume
    settings: dict = field(repr=False)         # plan_memory's arguments, for re-planning
    config: dict = field(repr=False)


def model_shape(config: dict) -> ModelShape:
    """Parameter counts and layer sizes of the model `config` (a config.json dict) describes."""
    return _shape(json.dumps(config, sort_keys=True))


@functools.lru_cache(maxsize=8)
def _shape(key: str) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads(key)
    if "model_type" not in raw:
        raise KeelError("config.json: no model_type, so the architecture is unknown")
    try:
        cfg = AutoConfig.for_model(**raw)
        with torch.device("meta"):  # shapes only: a 7B model costs no memory and about 2 s
            model = AutoModelForCausalLM.from_config(cfg)
    except (KeyError, ValueError) as e:
        raise KeelError(f"config.json: model_type '{raw['model_type']}' is not a causal LM transformers knows: {e}")
    text = cfg.get_text_config()
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    linears = tuple((n, m.in_features, m.out_features) for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and m is not head)
    blocks = next((n for n, m in model.named_modules()
                   if isinstance(m, torch.nn.ModuleList) and len(m) == text.num_hidden_layers), None)
    if blocks is None:
        raise KeelError(f"config.json: no list of {text.num_hidden_layers} decoder layers in '{raw['model_type']}'")
    first = f"{blocks}.0"
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return ModelShape(
        params=sum(p.numel() for p in model.parameters()), embed=embed.weight.numel(),
        head=0 if head.weight is embed.weight else head.weight.numel(), linears=linears,
        layer_linears=tuple((n[len(first) + 1:], i, o) for n, i, o in linears if n.startswith(first + ".")),
        layers=text.num_hidden_layers, hidden=text.hidden_size, intermediate=text.intermediate_size,
        heads=text.num_attention_heads, q_dim=text.num_attention_heads * head_dim, kv_dim=kv_heads * head_dim,
        vocab=text.vocab_size)


def is_target(name: str, targets) -> bool:
    """peft's rule: all-linear is every linear layer but the head; otherwise a name matches its last part(s)."""
    if targets in ("all-linear", ["all-linear"], ("all-linear",)):
        return True
    targets = [targets] if isinstance(targets, str) else list(targets)
    return any(name == t or name.endswith("." + t) for t in targets)


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise KeelError(f"memory plan: unknown dtype '{dtype}' (bf16, fp16 or fp32)")
    return DTYPE_BYTES[dtype]


def lora_params(shape: ModelShape, targets, rank: int) -> int:
    """Trainable LoRA parameters: A (r x in) and B (out x r) on every targeted linear layer."""
    return sum(rank * (i + o) for name, i, o in shape.linears if is_target(name, targets))


def weight_bytes(shape: ModelShape, nbytes: int, quant_bits: int | None, double_quant: bool = True) -> float:
    """The frozen base: quantized linear layers (bitsandbytes) and everything else in the compute dtype."""
    if quant_bits is None:
        return shape.params * nbytes
    matrices = sum(i * o for _, i, o in shape.linears)
    rest = shape.params - matrices  # embeddings, head, norms and biases are not quantized
    if quant_bits == 4:
        per_weight = NF4_DOUBLE_QUANT_BYTES if double_quant else NF4_BYTES
        return matrices * per_weight + rest * nbytes
    return matrices * 1 + 4 * sum(o for _, _, o in shape.linears) + rest * nbytes  # int8 + fp32 row scales


def layer_bytes_per_token(shape: ModelShape, targets, rank: int, act: int, adapter: int, dropout: bool,
                          full: bool = False) -> int:
    """Bytes autograd keeps per token for one decoder layer whose input needs a gradient.

    From what each op saves for backward (tests/test_memory_plan.py checks this against saved_tensors_hooks):
    - each RMSNorm: its input upcast to fp32 and the fp32 reciprocal rms
    - each LoRA layer: its input in the adapter's dtype (a copy per layer, made by the cast or dropout),
      the dropout mask (one byte: CUDA's fused dropout and Keel's CheapDropout keep a bool) and A's
      r outputs; frozen base linears keep nothing (no weight gradient is needed)
    - SDPA: q, k, v, the output and an fp32 log-sum-exp per head, no T x T matrix
    - gated MLP: the gate and up outputs and the activation's output
    Full fine-tuning keeps each linear's input instead (q/k/v and gate/up share one) and the norms' outputs.
    """
    h = shape.hidden
    norms = 2 * (4 * h + 4)
    attention = act * (2 * shape.q_dim + 2 * shape.kv_dim) + 4 * shape.heads
    saved = norms + attention + act * 3 * shape.intermediate
    if full:
        return saved + act * (h + shape.q_dim + h + shape.intermediate) + 2 * act * h
    return saved + sum((adapter + (1 if dropout else 0)) * i + adapter * rank
                       for name, i, _ in shape.layer_linears if is_target(name, targets))


def activation_bytes(shape: ModelShape, per_layer: int, tokens: int, act: int, checkpointing: bool) -> tuple[int, int]:
    """(what the forward keeps until backward, the widest gradients of one layer in backward)."""
    if checkpointing:  # each layer's input, and one layer's activations while it is recomputed
        saved = shape.layers * tokens * shape.hidden * act + per_layer * tokens
    else:
        saved = shape.layers * per_layer * tokens
    return saved, tokens * (3 * shape.intermediate * act + 2 * shape.hidden * 4)


def logits_bytes(shape: ModelShape, tokens: int) -> int:
    """The loss's peak: in the log-softmax backward three fp32 copies of the logits are alive (its saved
    output, the gradient coming in and the one going out); the compute-dtype logits are gone by then."""
    return tokens * shape.vocab * 12


def plan_memory(config: dict, *, dtype: str, quant_bits: int | None, lora_rank: int, target_modules="all-linear",
                train_type: str = "lora", max_length: int, batch_size: int, gradient_checkpointing: bool,
                world_size: int = 1, fsdp: bool = False, device_type: str = "cuda", packed_tokens: int | None = None,
                logits_fraction: float = 1.0, lora_dropout: float = 0.05, double_quant: bool = True,
                fsdp_fp32_weights: bool = False) -> MemoryPlan:
    """Peak memory per device of one training run, from the model's config.json dict alone.

    packed_tokens: tokens per forward pass when rows are packed (Keel's --packing_length); default
    max_length x batch_size, every row assumed max_length long. logits_fraction: the share of those
    tokens the output head runs at (Keel: labelled tokens only; 1.0, every token, is the worst case).
    fsdp_fp32_weights: FSDP2 through accelerate before 1.13 with mixed precision upcast every parameter to
    fp32 before sharding, frozen ones included (1.13 upcasts only trainable ones).
    """
    settings = {"dtype": dtype, "quant_bits": quant_bits, "lora_rank": lora_rank, "target_modules": target_modules,
                "train_type": train_type, "max_length": max_length, "batch_size": batch_size,
                "gradient_checkpointing": gradient_checkpointing, "world_size": world_size, "fsdp": fsdp,
                "device_type": device_type, "packed_tokens": packed_tokens, "logits_fraction": logits_fraction,
                "lora_dropout": lora_dropout, "double_quant": double_quant, "fsdp_fp32_weights": fsdp_fp32_weights}
    _check(settings)
    shape = model_shape(config)
    tokens = packed_tokens or max_length * batch_size
    parts, trainable = _state_parts(shape, settings)
    passing = _activation_parts(shape, settings, tokens)
    parts.update(passing)
    parts.update(_runtime_parts(shape, settings, trainable, passing))
    gib = {k: v / GIB for k, v in parts.items()}
    return MemoryPlan(parts=gib, peak_gib=sum(gib.values()), params=shape.params, trainable=trainable,
                      tokens=tokens, settings=settings, config=config)


def _check(s: dict):
    dtype_bytes(s["dtype"])
    problems = [
        (s["quant_bits"] in (None, 4, 8), f"--quant_bits must be 4 or 8, got {s['quant_bits']}"),
        (s["train_type"] in ("lora", "full"), f"--train_type must be lora or full, got '{s['train_type']}'"),
        (s["train_type"] == "lora" or s["quant_bits"] is None, "--quant_bits needs --train_type lora"),
        (s["device_type"] in ("cuda", "cpu"), f"memory plan: device must be cuda or cpu, got '{s['device_type']}'"),
        (s["max_length"] >= 1 and s["batch_size"] >= 1 and s["lora_rank"] >= 1 and s["world_size"] >= 1,
         "memory plan: --max_length, --per_device_train_batch_size, --lora_rank and the world size must be >= 1"),
        (0 < s["logits_fraction"] <= 1, "memory plan: logits_fraction must be in (0, 1]"),
    ]
    for ok, message in problems:
        if not ok:
            raise KeelError(message)


def _compute_bytes(s: dict) -> tuple[int, int]:
    """(activation dtype bytes, LoRA compute dtype bytes).

    CUDA: activations in the model's dtype; peft keeps adapters in fp32 and casts their input to it.
    CPU: Keel's bf16 mode (--cpu_autocast_bf16) runs the LoRA matmuls in bf16 autocast too.
    """
    act = dtype_bytes(s["dtype"])
    return act, (act if s["device_type"] == "cpu" else 4)


def _state_parts(shape: ModelShape, s: dict) -> tuple[dict, int]:
    """Weights, trainable copies, gradients and optimizer moments per device (bytes), and the trainable count."""
    nbytes, shard = dtype_bytes(s["dtype"]), (s["world_size"] if s["fsdp"] else 1)
    if s["train_type"] == "full":
        trainable = shape.params
        master = trainable * 4 if nbytes != 4 else 0  # fp32 master copy next to bf16/fp16 weights
        return {f"weights ({s['dtype']})": shape.params * nbytes / shard,
                "master weights + gradients (fp32)": (master + trainable * 4) / shard,
                "optimizer (AdamW, 2 x fp32)": trainable * 8 / shard}, trainable
    trainable = lora_params(shape, s["target_modules"], s["lora_rank"])
    rest = f"embeddings and head {s['dtype']}"
    label = {None: s["dtype"], 4: f"nf4, {rest}", 8: f"int8, {rest}"}
    weights = weight_bytes(shape, nbytes, s["quant_bits"], s["double_quant"])
    if s["fsdp"] and s["fsdp_fp32_weights"] and s["quant_bits"] is None:
        label[None], weights = "fp32, upcast for FSDP", shape.params * 4
    return {f"weights ({label[s['quant_bits']]})": weights / shard,
            "LoRA weights + gradients (fp32)": trainable * 8 / shard,
            "optimizer (AdamW, 2 x fp32)": trainable * 8 / shard}, trainable


def _activation_parts(shape: ModelShape, s: dict, tokens: int) -> dict:
    act, adapter = _compute_bytes(s)
    full = s["train_type"] == "full"
    per_layer = layer_bytes_per_token(shape, s["target_modules"], s["lora_rank"], act, adapter,
                                      s["lora_dropout"] > 0, full)
    saved, backward = activation_bytes(shape, per_layer, tokens, act, s["gradient_checkpointing"])
    head_tokens = max(1, round(tokens * s["logits_fraction"]))
    how = "checkpointed" if s["gradient_checkpointing"] else "all layers"
    return {f"activations ({tokens} tokens, {how})": saved, "backward (one layer's gradients)": backward,
            f"logits + loss ({head_tokens} tokens)": logits_bytes(shape, head_tokens)}


def _runtime_parts(shape: ModelShape, s: dict, trainable: int, passing: dict) -> dict:
    """Buffers of quantization and of the parallel strategy, and what the runtime itself holds (bytes)."""
    act = _compute_bytes(s)[0]
    parts = {}
    if s["quant_bits"]:  # bitsandbytes dequantizes one weight matrix at a time for its matmul
        parts["dequantized weight (largest linear)"] = max(i * o for _, i, o in shape.linears) * act
    if s["world_size"] > 1 and s["fsdp"]:  # the layer being computed and the one prefetched, unsharded
        layer = (shape.params - shape.embed - shape.head) / shape.layers
        parts["FSDP all-gathered layers (2)"] = 2 * layer * act
    elif s["world_size"] > 1:
        parts["DDP gradient buckets (fp32)"] = trainable * 4
    if s["device_type"] == "cpu":
        # glibc serves a pass from its heap and keeps the previous pass's freed activations (docs/performance.md)
        parts["CPU heap (freed activations kept)"] = sum(v for k, v in passing.items() if not k.startswith("logits"))
        parts["runtime (python, torch, transformers)"] = CPU_RUNTIME_GIB * GIB
    else:
        parts["CUDA context + allocator slack"] = CUDA_RUNTIME_GIB * GIB
    return parts


def format_plan(plan: MemoryPlan) -> str:
    """A small table of the components, ending with the line `memory plan: peak N.N GiB per device`."""
    s = plan.settings
    where = f"{s['world_size']} devices, {'FSDP2' if s['fsdp'] else 'DDP'}" if s["world_size"] > 1 else "1 device"
    lines = [(f"memory plan ({s['device_type']}, {where}): {plan.params:,} parameters, "
              f"{plan.trainable:,} trainable, {plan.tokens} tokens per pass")]
    width = max(len(k) for k in plan.parts)
    lines += [f"  {k:<{width}}  {v:8.2f} GiB" for k, v in plan.parts.items()]
    lines.append(f"memory plan: peak {plan.peak_gib:.1f} GiB per device")
    return "\n".join(lines)


def replan(plan: MemoryPlan, **changes) -> MemoryPlan:
    """The same run planned again with some arguments changed."""
    return plan_memory(plan.config, **{**plan.settings, **changes})


def _options(plan: MemoryPlan, devices: int) -> list[list[tuple[str, dict]]]:
    """Changes that lower the peak, by kind (each kind mildest first), as (flags, plan_memory arguments)."""
    s, kinds = plan.settings, []
    if not s["gradient_checkpointing"]:
        kinds.append([("--gradient_checkpointing true", {"gradient_checkpointing": True})])
    if s["device_type"] == "cuda" and s["train_type"] == "lora" and s["quant_bits"] != 4 and not s["fsdp"]:
        kinds.append([("--quant_bits 4", {"quant_bits": 4})])
    key = "packed_tokens" if s["packed_tokens"] else "max_length"  # on CPU Keel packs rows into passes
    flag = "--packing_length" if s["packed_tokens"] else "--max_length"
    shorter = [n for n in (8192, 4096, 2048, 1024, 512, 256, 128) if n < (s[key] or 0)]
    if shorter:
        kinds.append([(f"{flag} {n}", {key: n}) for n in shorter])
    first = s["world_size"] + 1 if s["fsdp"] else 2
    if s["device_type"] == "cuda" and first <= devices:
        kinds.append([(f"--fsdp fsdp2 over {n} devices", {"fsdp": True, "world_size": n})
                      for n in range(first, devices + 1)])
    return kinds


def fit_advice(plan: MemoryPlan, free_gib: float, flags: dict | None = None) -> str | None:
    """None when the plan fits in `free_gib`; else one line naming the flags that would make it fit.

    flags: the run's flags as parsed (ms-swift names); `devices`, the accelerators this machine has,
    bounds the FSDP suggestion (default 8). Every suggestion is the plan re-planned with that change:
    the mildest change of each kind that fits; where none fits alone, kinds are combined in order
    (checkpointing, 4-bit, shorter rows, FSDP), each at its strongest, until the plan fits.
    """
    if plan.peak_gib <= free_gib:
        return None
    kinds = _options(plan, int((flags or {}).get("devices", 8)))
    head = f"memory: the plan needs {plan.peak_gib:.1f} GiB per device, {free_gib:.1f} GiB are free"
    fits = []
    for kind in kinds:
        found = next(((f, p) for f, c in kind if (p := replan(plan, **c).peak_gib) <= free_gib), None)
        if found:
            fits.append(f"{found[0]} ({found[1]:.1f} GiB)")
    if fits:
        return f"{head}; it fits with " + ", or ".join(fits)
    combined, used = {}, []
    for kind in kinds:
        if kind[0][1].get("fsdp") and combined.get("quant_bits"):
            continue  # bitsandbytes weights are not sharded here
        for f, c in kind:
            peak = replan(plan, **combined, **c).peak_gib
            if peak <= free_gib:
                return f"{head}; it fits with {' '.join(used + [f])} together ({peak:.1f} GiB)"
        combined.update(kind[-1][1])
        used.append(kind[-1][0])
    return f"{head}; it does not fit even with {' '.join(used)} ({replan(plan, **combined).peak_gib:.1f} GiB)"
