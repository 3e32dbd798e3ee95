"""The memory plan (keel/train/memory.py): exact counts, the activation model against autograd, published figures."""

import re

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from keel.core.errors import KeelError
from keel.train.memory import (
    GIB,
    NF4_DOUBLE_QUANT_BYTES,
    activation_bytes,
    fit_advice,
    format_plan,
    layer_bytes_per_token,
    logits_bytes,
    lora_params,
    model_shape,
    plan_memory,
    replan,
)

# Qwen/Qwen2.5-7B-Instruct's config.json (Hugging Face, transformers 4.43.3 at release).
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.43.3",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 152064}

# The embedded model, HuggingFaceTB/SmolLM2-135M-Instruct's config.json.
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "head_dim": 64, "hidden_act": "silu", "hidden_size": 576,
    "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536, "max_position_embeddings": 8192, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3, "pad_token_id": 2,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 100000,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 49152}

LORA_7B = {"dtype": "bf16", "quant_bits": None, "lora_rank": 8, "batch_size": 1, "gradient_checkpointing": True}
GB = 1e9


def within(predicted_gib: float, published_gib: float, tolerance: float = 0.20) -> bool:
    return abs(predicted_gib / published_gib - 1) <= tolerance


def test_parameters_counted_exactly_from_the_config():
    plan = plan_memory(QWEN25_7B, **LORA_7B, max_length=2048)
    assert plan.params == 7_615_616_512  # untied head, q/k/v biases, 4 kv heads
    assert plan.trainable == 28 * 8 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944))
    small = plan_memory(SMOLLM2_135M, **{**LORA_7B, "dtype": "fp32"}, max_length=256, device_type="cpu")
    assert small.params == 134_515_008  # tied head counted once
    assert small.trainable == 2_442_240  # what keel sft prints for the embedded model
    only_q = plan_memory(QWEN25_7B, **LORA_7B, max_length=2048, target_modules=["q_proj"])
    assert only_q.trainable == 28 * 8 * (3584 + 3584)


TINY = {
    "llama": {"model_type": "llama", "hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 3,
              "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": True},
    "qwen2": {"model_type": "qwen2", "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": False},
}


def tiny_lora_model(config: dict, dtype, checkpointing: bool = False):
    """A small model of the real architecture with Keel's LoRA (r 8, all-linear, CheapDropout's bool mask)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from keel.model.lora import LoraArgs, apply_lora, use_cheap_dropout

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), attn_implementation="sdpa").to(dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()  # as under checkpointing: every layer's input needs a gradient
    model = apply_lora(model, LoraArgs())
    use_cheap_dropout(model)
    return model.train()


def saved_bytes_by_layer(model, tokens: int) -> list[int]:
    """Bytes autograd saves for backward inside each decoder layer (weights excluded), one forward pass."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    layers = model.base_model.model.model.layers
    current, seen, saved = [None], set(), [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
        layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, None))

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if current[0] is not None and ptr not in weights and ptr not in seen:
            seen.add(ptr)
            saved[current[0]] += t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, use_cache=False)
    return saved


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("mode, act, adapter", [("fp32", 4, 4), ("bf16 weights", 2, 4), ("keel cpu bf16", 2, 2)])
def test_layer_activations_match_what_autograd_saves(arch, mode, act, adapter):
    """fp32: Keel on CPU. bf16 weights with peft's fp32 adapters: the CUDA layout (SDPA saves the same there).
    Keel's CPU bf16 (--cpu_autocast_bf16): LoRA in bf16 autocast, which also keeps bf16 copies of the LoRA matrices."""
    from keel.model.load import bf16_frozen_weights

    tokens = 64
    model = tiny_lora_model(TINY[arch], torch.bfloat16 if mode == "bf16 weights" else torch.float32)
    copies = 0
    if mode == "keel cpu bf16":
        bf16_frozen_weights(model)
        copies = 2 * lora_params(model_shape(TINY[arch]), "all-linear", 8) // TINY[arch]["num_hidden_layers"]
    measured = saved_bytes_by_layer(model, tokens)
    per_token = layer_bytes_per_token(model_shape(TINY[arch]), "all-linear", 8, act, adapter, dropout=True)
    assert measured[1:] == [per_token * tokens + copies] * (len(measured) - 1)
    head_dim = TINY[arch]["hidden_size"] // TINY[arch]["num_attention_heads"]
    rotary = 2 * tokens * head_dim * (2 if mode == "bf16 weights" else 4)  # cos and sin, shared by all layers
    assert measured[0] == per_token * tokens + copies + rotary


def test_checkpointing_keeps_each_layers_input_and_recomputes_one_layer():
    tokens, config = 64, TINY["qwen2"]
    measured = saved_bytes_by_layer(tiny_lora_model(config, torch.bfloat16, checkpointing=True), tokens)
    shape = model_shape(config)
    per_layer = layer_bytes_per_token(shape, "all-linear", 8, 2, 4, dropout=True)
    checkpointed, _ = activation_bytes(shape, per_layer, tokens, 2, checkpointing=True)
    assert checkpointed == sum(measured) + per_layer * tokens  # the layer being recomputed holds its activations
    everything, _ = activation_bytes(shape, per_layer, tokens, 2, checkpointing=False)
    assert everything == per_layer * tokens * config["num_hidden_layers"]


class LivePeak(TorchDispatchMode):
    """Peak bytes of the tensors the ops inside the mode create and keep alive (storages, each once)."""

    def __init__(self):
        super().__init__()
        self.storages, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                known = self.storages.get(t.untyped_storage().data_ptr())
                if known is None or known[0].expired():  # a freed block's address can come back
                    self.storages[t.untyped_storage().data_ptr()] = (StorageWeakRef(t.untyped_storage()),
                                                                     t.untyped_storage().nbytes())
        self.peak = max(self.peak, sum(n for ref, n in self.storages.values() if not ref.expired()))
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_loss_peaks_at_three_fp32_copies_of_the_logits(dtype):
    """Keel's token_loss (cross-entropy of the logits upcast to fp32), forward and backward."""
    shape, tokens = model_shape(TINY["llama"]), 100
    logits = torch.randn(tokens, shape.vocab, dtype=dtype, requires_grad=True)
    with LivePeak() as live:
        torch.nn.functional.cross_entropy(logits.float(), torch.randint(0, shape.vocab, (tokens,)),
                                          reduction="sum").backward()
    assert live.peak == pytest.approx(logits_bytes(shape, tokens), rel=0.01)


# Longest rows the published runs saw (the peak of a batch-1 run is its longest row; the plan assumes every row
# is max_length long, a ceiling). alpaca-gpt4 zh/en #500 + self-cognition#500: LLaMA-Factory's 1,000-row
# samples of alpaca-gpt4 peak at 719 tokens (en, the embedded model's tokenizer) and 1,229 characters (zh, about
# 900 Qwen tokens), plus system prompt and template: rows of at most about 1,024 tokens. swift/self-cognition:
# a question and a short answer (LLaMA-Factory's identity.json peaks at 228 tokens): at most about 256.
ALPACA_MIX_ROWS = 1024
SELF_COGNITION_ROWS = 256


@pytest.mark.parametrize("case, published_gib, flags", [
    # examples/train/lora_sft.sh and the README: "# 22GB"
    ("LoRA, 1 GPU", 22 * GB / GIB, {"max_length": ALPACA_MIX_ROWS}),
    # examples/train/qlora/bnb/train.sh: "# 10GB" (nf4, double quantization, bf16 compute)
    ("QLoRA nf4, 1 GPU", 10 * GB / GIB, {"max_length": ALPACA_MIX_ROWS, "quant_bits": 4}),
    # examples/train/multi-gpu/fsdp2_lora/train.sh: "# 14.7GiB * 2", added 2025-11-07; accelerate's FSDP2 then
    # upcast every parameter to fp32 before sharding (only trainable ones from 1.13), and its config turns
    # activation checkpointing on (fsdp_activation_checkpointing) though the flags say --gradient_checkpointing false
    ("LoRA, FSDP2 over 2 GPUs", 14.7, {"max_length": SELF_COGNITION_ROWS, "world_size": 2, "fsdp": True,
                                       "fsdp_fp32_weights": True}),
    # examples/train/multi-gpu/deepspeed/train_zero2.sh: "# 18GiB * 2", the data and flags of the DDP script
    # (27.5GiB * 2, not reproduced: docs/memory-plan.md); ZeRO-2 shards only LoRA's gradients and moments
    ("LoRA, ZeRO-2 / DDP over 2 GPUs", 18.0, {"max_length": SELF_COGNITION_ROWS, "world_size": 2}),
    # examples/train/tuners/lora/train.sh: "# 17.2GiB" (self-cognition#1000 only)
    ("LoRA, 1 GPU, self-cognition only", 17.2, {"max_length": SELF_COGNITION_ROWS}),
])
def test_qwen25_7b_plans_within_20_percent_of_ms_swift_figures(case, published_gib, flags):
    plan = plan_memory(QWEN25_7B, **{**LORA_7B, **flags})
    planned = plan.peak_gib
    assert within(planned, published_gib), f"{case}: {planned:.1f} GiB planned, {published_gib:.1f} GiB published"


def test_rows_at_max_length_are_a_ceiling():
    real = plan_memory(QWEN25_7B, **LORA_7B, max_length=ALPACA_MIX_ROWS)
    ceiling = plan_memory(QWEN25_7B, **LORA_7B, max_length=2048)
    assert ceiling.peak_gib > real.peak_gib
    assert within(ceiling.peak_gib, 22 * GB / GIB)  # the flag's 2048 tokens on every row: still the 22 GB run
    no_checkpointing = replan(ceiling, gradient_checkpointing=False)
    assert no_checkpointing.peak_gib > ceiling.peak_gib + 15  # 28 layers x 2048 tokens of saved activations


def test_sharding_divides_states_but_not_activations():
    one = plan_memory(QWEN25_7B, **LORA_7B, max_length=2048)
    ddp = replan(one, world_size=2)
    fsdp = replan(one, world_size=4, fsdp=True)
    weights = "weights (bf16)"
    assert ddp.parts[weights] == one.parts[weights]
    assert fsdp.parts[weights] == pytest.approx(one.parts[weights] / 4)
    assert fsdp.parts["optimizer (AdamW, 2 x fp32)"] == pytest.approx(one.parts["optimizer (AdamW, 2 x fp32)"] / 4)
    activations = [k for k in one.parts if k.startswith(("activations", "logits"))]
    assert all(fsdp.parts[k] == one.parts[k] == ddp.parts[k] for k in activations)
    assert one.peak_gib < ddp.peak_gib < one.peak_gib + 0.2  # DDP adds only LoRA's gradient buckets


def test_quantization_leaves_embeddings_and_head_in_the_compute_dtype():
    bigger_vocab = {**QWEN25_7B, "vocab_size": 2 * QWEN25_7B["vocab_size"]}
    added = 2 * 152064 * 3584  # a second vocabulary's worth of embedding and head rows

    def weights(config, bits):
        plan = plan_memory(config, **{**LORA_7B, "quant_bits": bits}, max_length=512)
        return next(v for k, v in plan.parts.items() if k.startswith("weights")) * GIB

    for bits in (None, 4, 8):
        assert weights(bigger_vocab, bits) - weights(QWEN25_7B, bits) == pytest.approx(added * 2)
    linear = 28 * 3584 * (3584 + 512 + 512 + 3584 + 3 * 18944)
    assert weights(QWEN25_7B, None) - weights(QWEN25_7B, 4) == pytest.approx(linear * (2 - NF4_DOUBLE_QUANT_BYTES))


def test_full_fine_tuning_keeps_fp32_master_weights_gradients_and_moments():
    plan = plan_memory(QWEN25_7B, **{**LORA_7B, "train_type": "full"}, max_length=2048)
    states = plan.parts["weights (bf16)"] + plan.parts["master weights + gradients (fp32)"] \
        + plan.parts["optimizer (AdamW, 2 x fp32)"]
    assert states == pytest.approx(plan.params * (2 + 4 + 4 + 8) / GIB)
    with pytest.raises(KeelError, match="--quant_bits needs --train_type lora"):
        replan(plan, quant_bits=4)


def test_format_plan_lists_the_parts_and_ends_with_the_peak_line():
    plan = plan_memory(QWEN25_7B, **{**LORA_7B, "quant_bits": 4}, max_length=2048)
    text = format_plan(plan)
    lines = text.splitlines()
    assert re.fullmatch(r"memory plan: peak \d+\.\d GiB per device", lines[-1])
    assert lines[-1] == f"memory plan: peak {plan.peak_gib:.1f} GiB per device"
    rows = {line.rsplit(None, 2)[0].strip(): float(line.rsplit(None, 2)[1]) for line in lines[1:-1]}
    assert set(rows) == set(plan.parts)
    assert sum(rows.values()) == pytest.approx(plan.peak_gib, abs=0.05)
    assert plan.peak_gib == pytest.approx(sum(plan.parts.values()))
    assert "nf4" in text and "7,615,616,512 parameters" in lines[0]


def test_fit_advice_names_changes_that_fit_when_replanned():
    plan = plan_memory(QWEN25_7B, **{**LORA_7B, "gradient_checkpointing": False}, max_length=2048)  # about 38 GiB
    assert fit_advice(plan, free_gib=80, flags={"devices": 1}) is None
    advice = fit_advice(plan, free_gib=24, flags={"devices": 1})
    assert "\n" not in advice and "38.5 GiB" in advice
    assert "--gradient_checkpointing true" in advice and "--max_length 512" in advice
    assert "--quant_bits 4 " not in advice  # 4-bit alone leaves 28 layers of activations: does not fit
    assert replan(plan, max_length=512).peak_gib <= 24 < replan(plan, max_length=1024).peak_gib
    combined = fit_advice(plan, free_gib=16, flags={"devices": 1})
    assert "--gradient_checkpointing true --quant_bits 4 together" in combined
    assert replan(plan, gradient_checkpointing=True, quant_bits=4).peak_gib <= 16


def test_fit_advice_offers_fsdp_over_the_fewest_devices_that_fit():
    plan = plan_memory(QWEN25_7B, **LORA_7B, max_length=2048)  # about 20 GiB with checkpointing
    advice = fit_advice(plan, free_gib=12, flags={"devices": 4})
    devices = int(re.search(r"--fsdp fsdp2 over (\d) devices", advice).group(1))
    fewer = replan(plan, fsdp=True, world_size=devices - 1)
    assert replan(plan, fsdp=True, world_size=devices).peak_gib <= 12 < fewer.peak_gib
    assert "--fsdp" not in fit_advice(plan, free_gib=12, flags={"devices": 1})


def test_cpu_advice_shortens_the_packed_pass():
    plan = plan_memory(SMOLLM2_135M, **{**LORA_7B, "dtype": "fp32", "gradient_checkpointing": False}, max_length=2048,
                       device_type="cpu", packed_tokens=1024)
    advice = fit_advice(plan, free_gib=2.0)
    assert "--packing_length 256" in advice and "--quant_bits" not in advice and "--fsdp" not in advice


def test_planning_builds_no_weights(monkeypatch):
    """The 7B model is built on the meta device: shapes without memory (planning takes seconds, not 15 GB)."""
    import transformers

    from keel.train import memory as memory_plan

    built = []
    original = transformers.AutoModelForCausalLM.from_config

    def spy(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", spy)
    memory_plan._shape.cache_clear()
    plan_memory({**QWEN25_7B, "num_hidden_layers": 27}, **LORA_7B, max_length=2048)
    assert len(built) == 1
    assert {p.device.type for p in built[0].parameters()} == {"meta"}


def test_bad_arguments_are_keel_errors():
    with pytest.raises(KeelError, match="unknown dtype 'int4'"):
        plan_memory(QWEN25_7B, **{**LORA_7B, "dtype": "int4"}, max_length=2048)
    with pytest.raises(KeelError, match="quant_bits must be 4 or 8"):
        plan_memory(QWEN25_7B, **{**LORA_7B, "quant_bits": 3}, max_length=2048)
    with pytest.raises(KeelError, match="no model_type"):
        plan_memory({"hidden_size": 8}, **LORA_7B, max_length=2048)
    with pytest.raises(KeelError, match="model_type 'nonesuch'"):
        plan_memory({"model_type": "nonesuch"}, **LORA_7B, max_length=2048)


@pytest.mark.parametrize("job, packed_tokens, peak_kib", [
    # keel sft, fp32, batch 1, accumulation 16, on 2 CPU cores, measured 2026-12-07 (docs/memory-plan.md);
    # getrusage's peak RSS in KiB. The plan is for each job's longest packed pass.
    ("identity (198 rows x 3 epochs), --packing_length 256 (default): a 364-token row alone", 364, 2_459_000),
    ("identity, --packing_length 2048: a step's 16 rows in one pass, up to 1,767 tokens", 1767, 7_741_000),
    ("alpaca zh#100 + en#100 + identity, --max_length 512: rows of 512 tokens", 512, 3_158_000),
])
def test_cpu_plan_within_20_percent_of_keel_sft_peak_rss(job, packed_tokens, peak_kib):
    plan = plan_memory(SMOLLM2_135M, dtype="fp32", quant_bits=None, lora_rank=8, max_length=2048, batch_size=1,
                       gradient_checkpointing=False, device_type="cpu", packed_tokens=packed_tokens)
    measured_gib = peak_kib * 1024 / GIB
    assert within(plan.peak_gib, measured_gib), f"{job}: {plan.peak_gib:.2f} GiB planned, {measured_gib:.2f} measured"
