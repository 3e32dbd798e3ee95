"""Model resolution: local folders, GGUF files and their cache, hub ids offline, adapters."""

import json
from pathlib import Path

import pytest
import torch

from keel.core.errors import KeelError
from keel.model.load import ModelArgs, cpu_bf16_training, load_model, pick_device_dtype, resolve_model_path
from tests.conftest import build_model, build_tokenizer


def test_cpu_defaults_to_float32_and_flag_overrides():
    device, dtype = pick_device_dtype()
    assert dtype == (torch.bfloat16 if device.type == "cuda" else torch.float32)
    # on CPU, bfloat16/float16 are noted and computed in float32 (tests/test_tutorials.py)
    assert pick_device_dtype("bfloat16")[1] == (torch.bfloat16 if device.type == "cuda" else torch.float32)


@pytest.mark.parametrize("native", [False, True])
def test_cpu_bf16_asked_without_native_bf16_warns(monkeypatch, capsys, native):
    """keel sft and keel rlhf alike: bf16 asked for on a CPU that emulates it trains as asked, with a warning."""
    monkeypatch.setattr("keel.model.load.cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert cpu_bf16_training(True, cpu) is True and cpu_bf16_training(None, cpu) is native
    assert cpu_bf16_training(False, cpu) is False and cpu_bf16_training(True, torch.device("meta")) is False
    assert ("bf16 matmuls are emulated" in capsys.readouterr().out) is not native
    cpu_bf16_training(True, cpu, warn=False)  # a process other than the main one stays quiet
    assert capsys.readouterr().out == ""


def test_bad_dtype_names_the_flag():
    with pytest.raises(KeelError, match="--torch_dtype"):
        ModelArgs(torch_dtype="float8")


def test_local_folder_loads_with_sdpa(tiny_model_dir):
    model, tok, info = load_model(ModelArgs(model=str(tiny_model_dir)))
    assert model.config._attn_implementation == "sdpa"
    assert info.path == str(tiny_model_dir) and info.system is None
    assert tok.pad_token_id is not None


@pytest.mark.parametrize("spec,message", [
    ("/no/such/folder", "does not exist"),
    ("./missing-model", "does not exist"),
    ("NoSuchFamily-7B", "does not exist"),
])
def test_missing_paths_are_one_line_errors(spec, message):
    with pytest.raises(KeelError, match=message):
        resolve_model_path(spec)


def test_folder_without_config_and_non_gguf_file(tmp_path):
    with pytest.raises(KeelError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(KeelError, match="not a .gguf"):
        resolve_model_path(str(f))


def test_hub_id_offline_says_how_to_pass_a_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(KeelError, match=r"could not fetch 'Qwen/Qwen2.5-7B-Instruct'.*--model /path/to"):
        resolve_model_path("Qwen2.5-7B-Instruct")  # a bare known name gets its hub org


def test_hub_id_found_in_model_mirror(monkeypatch, tmp_path, tiny_model_dir):
    mirror = tmp_path / "mirror" / "Qwen"
    mirror.mkdir(parents=True)
    (mirror / "Qwen2.5-7B-Instruct").symlink_to(tiny_model_dir)
    monkeypatch.setenv("KEEL_MODEL_DIR", str(tmp_path / "mirror"))
    path, name = resolve_model_path("Qwen/Qwen2.5-7B-Instruct")
    assert name == "Qwen/Qwen2.5-7B-Instruct" and Path(path).resolve() == tiny_model_dir.resolve()


def test_corrupt_gguf_is_one_line_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(KeelError, match="broken.gguf: not a readable GGUF model"):
        resolve_model_path(str(bad))
    assert not any(p.name.startswith(".broken") for p in (tmp_path.parent).rglob(".broken*"))


def _make_adapter(base_dir: Path, out: Path, args: dict | None = None) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft_model.save_pretrained(out)
    if args is not None:
        (out / "args.json").write_text(json.dumps(args))
    return out


def test_adapter_base_model_comes_from_its_args_json(tiny_model_dir, tmp_path):
    ckpt = _make_adapter(tiny_model_dir, tmp_path / "ckpt",
                         {"model": str(tiny_model_dir), "system": "You are Keel.", "model_name": ["Keel"]})
    model, tok, info = load_model(ModelArgs(adapters=[str(ckpt)]))
    assert info.path == str(tiny_model_dir)
    assert info.system == "You are Keel." and info.model_name == ["Keel"]
    from peft import PeftModel

    assert isinstance(model, PeftModel)


def test_adapter_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(KeelError, match="no adapter_config.json"):
        ModelArgs(adapters=[str(tmp_path)])
    with pytest.raises(KeelError, match="does not exist"):
        ModelArgs(adapters=[str(tmp_path / "nope")])


def test_adapter_from_a_different_base_is_one_line_error(tiny_model_dir, tmp_path):
    other = tmp_path / "other-base"
    tok = build_tokenizer()
    m = build_model("llama", len(tok), tok.eos_token_id)
    m.config.hidden_size = 32  # a base of another size
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**m.config.to_dict(), "hidden_size": 32, "intermediate_size": 64})
    LlamaForCausalLM(cfg).save_pretrained(other)
    tok.save_pretrained(other)
    ckpt = _make_adapter(other, tmp_path / "ckpt")
    with pytest.raises(KeelError, match="different base model"):
        load_model(ModelArgs(model=str(tiny_model_dir), adapters=[str(ckpt)]))


@pytest.mark.slow
def test_embedded_model_is_dequantized_once_and_cached(tmp_path, monkeypatch):
    from keel.model.load import embedded_gguf

    path, name = resolve_model_path(None)
    assert name == "SmolLM2-135M-Instruct"
    assert (Path(path) / "config.json").is_file() and (Path(path) / "model.safetensors").is_file()
    assert resolve_model_path(None)[0] == path  # second call: the cache, not a new folder
    assert embedded_gguf().name.endswith(".gguf")


@pytest.mark.slow
def test_truncated_gguf_is_one_line_error(tmp_path):
    from keel.model.load import embedded_gguf

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(embedded_gguf().read_bytes()[: 2_000_000])
    with pytest.raises(KeelError, match="cut.gguf: not a readable GGUF model"):
        resolve_model_path(str(cut))


# --num_threads (keel/model.py): the thread count is chosen where device and dtype are.

@pytest.mark.parametrize("value", [0, -1, (__import__("os").cpu_count() or 1) + 1])
def test_num_threads_out_of_range_is_one_line(capsys, tiny_model_dir, value):
    from keel.core.errors import KeelError
    from tests.helpers import run_keel

    with pytest.raises(KeelError, match=r"--num_threads must be between 1 and \d+ \(this machine's CPUs\)"):
        ModelArgs(num_threads=value)
    code, _, err = run_keel(capsys, "infer", "--model", tiny_model_dir, "--num_threads", value, "--query", "Hi")
    assert code == 2 and err.strip().splitlines()[-1].startswith("keel: error: --num_threads must be")


def test_num_threads_is_applied(tiny_model_dir):
    before = torch.get_num_threads()
    try:
        load_model(ModelArgs(model=str(tiny_model_dir), num_threads=1))
        assert torch.get_num_threads() == 1
        if (__import__("os").cpu_count() or 1) >= 2:
            load_model(ModelArgs(model=str(tiny_model_dir), num_threads=2))
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bf16_frozen_weights_store_the_base_in_bf16_and_keep_lora_fp32(arch, tiny_model_dir, tiny_qwen_dir):
    """--cpu_autocast_bf16: frozen matrices in bf16 (half the bytes), LoRA/norms/biases fp32, same logits as
    plain autocast over fp32 weights, within bf16's rounding (autocast rounds those weights to bf16 at every matmul)."""
    from keel.model.load import bf16_frozen_weights
    from keel.model.lora import LoraArgs, apply_lora

    path = str(tiny_model_dir if arch == "llama" else tiny_qwen_dir)
    ids = torch.tensor([[5, 9, 14, 3, 27, 8, 11]])
    torch.manual_seed(0)  # LoRA's own init too: the figures below must not depend on what ran before
    ref = apply_lora(load_model(ModelArgs(model=path))[0], LoraArgs(lora_rank=4, lora_alpha=8, lora_dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    for n, p in ref.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1, generator=gen)  # a trained adapter, not peft's zero init
    frozen_fp32 = sum(p.numel() * p.element_size() for p in ref.parameters() if not p.requires_grad)
    with torch.no_grad():
        fp32 = ref(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = ref(ids).logits.float()
    model = bf16_frozen_weights(ref)
    for n, p in model.named_parameters():
        want = torch.float32 if p.requires_grad or p.dim() < 2 else torch.bfloat16
        assert p.dtype == want, n
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    norms = sum(p.numel() * 4 for p in model.parameters() if not p.requires_grad and p.dim() < 2)
    assert frozen - norms == (frozen_fp32 - norms) // 2
    with torch.no_grad():  # no autocast around it: the model carries its own, so generation and probes work
        got = model(ids).logits.float()
        model.generate(ids, max_new_tokens=3, do_sample=False)
    # bf16 rounding moves a random tiny model's logits by a few % of the largest; broken weights move them by ~100%
    assert (autocast - fp32).abs().max() <= 0.08 * fp32.abs().max()
    assert (got - fp32).abs().max() <= 0.08 * fp32.abs().max()
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
