"""QLoRA: the frozen base model loaded in 4 or 8 bits by bitsandbytes, LoRA trained on top (ms-swift's flags).

    keel sft --quant_method bnb --quant_bits 4 --bnb_4bit_quant_type nf4 --dataset self_cognition.json ...

transformers' BitsAndBytesConfig quantizes the base model's linear layers as it loads (nf4/fp4 blocks of 64
with an absmax each, the absmaxes themselves quantized with --bnb_4bit_use_double_quant; or LLM.int8()),
peft's prepare_model_for_kbit_training freezes the rest and keeps it in fp32, and the LoRA adapters are
trained in full precision. The adapter is saved as usual and loads on the full-precision base model.
bitsandbytes is the optional extra `.[qlora]`; it runs on CUDA and, since 0.49, on x86 CPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

from keel.core.errors import KeelError

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class QuantArgs:
    quant_method: str | None = None
    """Quantize the frozen base model while loading it: bnb (bitsandbytes; QLoRA with --quant_bits 4). Default: none, full precision."""
    quant_bits: int | None = None
    """With --quant_method bnb: 4 (nf4/fp4, QLoRA) or 8 (LLM.int8()). Default 4."""
    bnb_4bit_quant_type: str = "nf4"
    """4-bit data type: nf4 (normal float, QLoRA's) or fp4."""
    bnb_4bit_compute_dtype: str | None = None
    """dtype the 4-bit weights are dequantized to for each matmul: float32, bfloat16 or float16. Default: the model's dtype (bfloat16 on CUDA, float32 on CPU)."""
    bnb_4bit_use_double_quant: bool = True
    """Quantize the 4-bit blocks' scales too (about 0.4 bits a weight less)."""

    def __post_init__(self):
        if self.quant_method not in (None, "bnb"):
            raise KeelError(f"--quant_method must be bnb (bitsandbytes), got '{self.quant_method}'")
        if self.quant_bits is not None and self.quant_method is None:
            raise KeelError("--quant_bits needs --quant_method bnb")
        if self.quant_method and self.quant_bits is None:
            self.quant_bits = 4
        if self.quant_bits not in (None, 4, 8):
            raise KeelError(f"--quant_bits must be 4 or 8 with --quant_method bnb, got {self.quant_bits}")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise KeelError(f"--bnb_4bit_quant_type must be nf4 or fp4, got '{self.bnb_4bit_quant_type}'")
        if self.bnb_4bit_compute_dtype not in (None, *COMPUTE_DTYPES):
            raise KeelError(f"--bnb_4bit_compute_dtype must be {', '.join(COMPUTE_DTYPES)}, "
                            f"got '{self.bnb_4bit_compute_dtype}'")

    @property
    def enabled(self) -> bool:
        return self.quant_method is not None


def check_quant_training(quant: QuantArgs, cpu_autocast_bf16: bool | None) -> None:
    """What training refuses with a quantized base, before anything loads."""
    if quant.enabled and cpu_autocast_bf16:
        raise KeelError("--cpu_autocast_bf16 true with --quant_method bnb: the quantized layers compute in "
                        "--bnb_4bit_compute_dtype (bfloat16 for bf16 matmuls)")
    if quant.enabled:
        require_bitsandbytes()


def require_bitsandbytes():
    """One line instead of an ImportError deep inside transformers."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise KeelError("--quant_method bnb needs bitsandbytes: pip install -e '.[qlora]' "
                        "(or KEEL_EXTRAS=qlora bash scripts/setup.sh)")


def quantization_config(quant: QuantArgs, dtype):
    """transformers' BitsAndBytesConfig for these flags; `dtype` is the model's (pick_device_dtype)."""
    import torch
    from transformers import BitsAndBytesConfig

    require_bitsandbytes()
    compute = getattr(torch, quant.bnb_4bit_compute_dtype) if quant.bnb_4bit_compute_dtype else dtype
    return BitsAndBytesConfig(load_in_4bit=quant.quant_bits == 4, load_in_8bit=quant.quant_bits == 8,
                              bnb_4bit_quant_type=quant.bnb_4bit_quant_type, bnb_4bit_compute_dtype=compute,
                              bnb_4bit_use_double_quant=quant.bnb_4bit_use_double_quant)


def is_quantized(model) -> bool:
    """Whether a (peft-wrapped or plain) model's base weights were loaded by bitsandbytes."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(inner, "is_loaded_in_4bit", False) or getattr(inner, "is_loaded_in_8bit", False))


def base_precision(model) -> str:
    """How the base weights are held, as loaded (for the run line): '4-bit nf4 base' and the like, or ''."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantizer = getattr(inner, "hf_quantizer", None) if is_quantized(model) else None
    config = getattr(quantizer, "quantization_config", None)
    if config is None:
        return ""
    return "8-bit base" if config.load_in_8bit else f"4-bit {config.bnb_4bit_quant_type} base"


def prepare_quantized(model):
    """Ready a bitsandbytes-loaded model for LoRA training: peft's prepare_model_for_kbit_training (base frozen,
    its small float weights in fp32; gradient checkpointing is the training setup's switch), and the CPU repack
    turned off (keep_trainable_layout)."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    keep_trainable_layout(model)
    return model


def keep_trainable_layout(model) -> int:
    """Keep every 4-bit layer on bitsandbytes' differentiable matmul; returns how many layers were set.

    On CPUs with AVX-512 BF16, bitsandbytes' Linear4bit repacks its weight, once and for good, into the layout of
    a fast inference kernel the first time it runs in eval mode without grad (an eval pass, the ballast answers).
    That kernel has no backward: the base layers would pass no gradient back to earlier layers' inputs, and the
    LoRA gradients of every layer but the last would be silently wrong.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n
