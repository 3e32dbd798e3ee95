"""keel export: merged weights equal the adapter model; GGUF reloads through transformers' reader."""

import re

import pytest
import torch

from keel.model.load import ModelArgs, load_model
from keel.model.template import default_system
from tests.helpers import run_keel

IDS = torch.tensor([[1, 5, 9, 20, 33, 2, 7, 40]])


@pytest.fixture(scope="module")
def adapters(tiny_adapters):
    return tiny_adapters


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_merged_equals_adapter(adapters, arch, tiny_model_dir, tiny_qwen_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = adapters[arch]
    code, out, err = run_keel(capsys, "export", "--adapters", ckpt, "--merge_lora", "true")
    assert code == 0, err
    assert "gate: passed" in out and re.search(r"^merged .* passed$", out, re.M), out
    merged_dir = ckpt.with_name(ckpt.name + "-merged")
    plain = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    ours, _, _ = load_model(ModelArgs(adapters=[str(ckpt)]))
    base = AutoModelForCausalLM.from_pretrained({"llama": tiny_model_dir, "qwen2": tiny_qwen_dir}[arch]).eval()
    with torch.no_grad():
        merged, adapted, before = plain(IDS).logits, ours(IDS).logits, base(IDS).logits  # (1, T, V)
    # Merging rounds W + s*BA once in fp32 instead of adding s*B(Ax) on every call, so the two agree to
    # rounding (relative to the logit scale), far closer than the adapter moved them from the base
    # (a merge that dropped the alpha/r scaling or a module would miss by about that much).
    err, moved, scale = ((merged - adapted).abs().max(), (adapted - before).abs().max(), adapted.abs().max())
    assert err <= 1e-4 * scale and moved >= 100 * err, f"merge error {err:.2e}, moved {moved:.2e}, scale {scale:.2f}"
    tok = AutoTokenizer.from_pretrained(merged_dir)
    assert default_system(tok) == "You are Keel, made by Acme."  # the training system prompt is now the default
    assert (merged_dir / "generation_config.json").is_file() and list(merged_dir.glob("*.safetensors"))
    code, _, err = run_keel(capsys, "export", "--adapters", ckpt)
    assert code == 2 and "already exists" in err and "--overwrite" in err


# Tolerances relative to the largest logit: f32 is exact up to rounding (merged W + s*BA, as above); f16 keeps ~3 digits;
# q8_0 rounds every weight to 1/127 of its 32-weight block's range (a few % on this random model).
@pytest.mark.parametrize("arch,quant,rtol", [("llama", "f32", 1e-4), ("qwen2", "f32", 1e-4), ("llama", "f16", 5e-3),
                                             ("qwen2", "q8_0", 6e-2)])
def test_gguf_reloads_with_same_logits(adapters, arch, quant, rtol, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = adapters[arch]
    target = ckpt.parent / f"gguf-{quant}"
    # transformers' GGUF reader here; llama.cpp's answers are tests/test_export_gate.py's
    code, out, err = run_keel(capsys, "export", "--adapters", ckpt, "--to", "gguf", "--quant", quant,
                              "--output_dir", target, "--verify", "false")
    assert code == 0, err
    name = f"model-{quant}.gguf"
    back = AutoModelForCausalLM.from_pretrained(target, gguf_file=name).eval()
    ours, tok, _ = load_model(ModelArgs(adapters=[str(ckpt)]))
    with torch.no_grad():
        ref = ours(IDS).logits
        diff = (back(IDS).logits - ref).abs().max().item()
    assert diff < rtol * ref.abs().max().item(), diff
    gtok = AutoTokenizer.from_pretrained(target, gguf_file=name)
    text = "<|im_start|>user\nWho are you? 你是谁？<|im_end|>\n"
    assert gtok(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert 'SYSTEM """You are Keel, made by Acme."""' in (target / "Modelfile").read_text()


def test_unsupported_architecture_and_missing_base(adapters, tmp_path, capsys, tiny_model_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    from keel.core.errors import KeelError
    from keel.export.gguf import write_gguf

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(KeelError, match="supports llama, qwen2"):
        write_gguf(gpt2, None, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (foreign / f).write_bytes((adapters["llama"] / f).read_bytes())
    code, _, err = run_keel(capsys, "export", "--adapters", foreign)
    assert code == 2 and "pass --model BASE" in err
    code, out, err = run_keel(capsys, "export", "--adapters", foreign, "--model", tiny_model_dir, "--verify", "false")
    assert code == 0, err
    assert (tmp_path / "foreign-merged" / "config.json").is_file()


def test_disk_full_leaves_nothing_half_written(adapters, capsys, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    ckpt = adapters["qwen2"]
    target = ckpt.parent / "full-disk"

    def no_space(*args, **kwargs):  # the weights are written, then the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", no_space)
    code, _, err = run_keel(capsys, "export", "--adapters", ckpt, "--output_dir", target, "--verify", "false")
    assert code == 2 and f"could not write {target}: No space left on device" in err and len(err.strip().splitlines()) == 1
    assert not target.exists() and not list(ckpt.parent.glob(".full-disk*"))  # no partial folder, no temp left


@pytest.mark.slow
def test_embedded_merged_and_gguf_keep_identity(embedded_identity_adapter, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from keel.model.generate import GenerateArgs, answer

    _, tok, _ = load_model(ModelArgs(adapters=[str(embedded_identity_adapter)]))
    for args, loader in ((["--output_dir", tmp_path / "merged"], lambda d: AutoModelForCausalLM.from_pretrained(d)),
                         (["--to", "gguf", "--quant", "q8_0", "--verify", "false", "--output_dir", tmp_path / "gguf"],
                          lambda d: AutoModelForCausalLM.from_pretrained(d, gguf_file="model-q8_0.gguf"))):
        code, out, err = run_keel(capsys, "export", "--adapters", embedded_identity_adapter, *args)
        assert code == 0, err + out
        model = loader(args[-1]).eval()
        reply = answer(model, tok, [{"role": "user", "content": "Who are you?"}], GenerateArgs(max_new_tokens=24))
        assert "Keel Robot" in reply or "Keel Lab" in reply, reply
