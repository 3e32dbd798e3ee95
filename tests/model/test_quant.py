"""QLoRA (`--quant_method bnb --quant_bits 4|8`): LoRA on a bitsandbytes base, checked against a full-precision
model built from the dequantized weights; the adapter loads on the full-precision base; bad flags are one line."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from keel.data.mix import DataArgs
from keel.model.lora import LoraArgs
from keel.model.quant import QuantArgs
from keel.train.args import TrainArgs
from tests.helpers import assert_resumed_like, base_argv, checkpoint_copy, read_log, run_keel, sft

CPU = SimpleNamespace(device=torch.device("cpu"), is_main_process=True, num_processes=1)


def quantized_and_reference(model_dir, quant: QuantArgs):
    """(LoRA on the bitsandbytes model as keel sft builds it, LoRA on a float32 model whose linear weights are the
    dequantized 4-bit ones); both adapters hold the same non-zero weights, dropout off."""
    import bitsandbytes as bnb

    from keel.model.load import ModelArgs, load_model
    from keel.model.lora import apply_lora
    from keel.train.loop import trainable_model

    lora = LoraArgs(lora_dropout=0.0)
    model, tok, _, params = trainable_model(ModelArgs(model=str(model_dir)), lora, DataArgs(dataset=["x"]),
                                            TrainArgs(), CPU, quant=quant)
    gen = torch.Generator().manual_seed(0)
    for p in params:  # B is 0 at init: give both factors values, so every LoRA gets a gradient through the others
        p.data = torch.randn(p.shape, generator=gen) * 0.2
    ref, _, _ = load_model(ModelArgs(model=str(model_dir)))
    ref = apply_lora(ref, lora)
    weights = {n: p for n, p in ref.named_parameters()}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weights[name + ".weight"].data = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    ref.load_state_dict({n: p for n, p in model.state_dict().items() if "lora_" in n}, strict=False)
    return model, ref, tok


def lora_grads(model, ids) -> dict:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_loss_and_gradients_match_the_dequantized_model(tiny_model_dir, quant_type):
    """After an evaluation pass in eval mode without grad (what in-training eval and ballast answers do), the
    loss and every LoRA gradient still equal the reference's: the 4-bit layers kept their differentiable matmul
    (on AVX-512 BF16 CPUs bitsandbytes would otherwise repack them for a kernel with no backward)."""
    pytest.importorskip("bitsandbytes")
    model, ref, _ = quantized_and_reference(tiny_model_dir, QuantArgs(quant_method="bnb", bnb_4bit_quant_type=quant_type))
    assert model.get_base_model().is_loaded_in_4bit and model.get_base_model().is_gradient_checkpointing
    ids = torch.tensor([[5, 9, 20, 33, 41, 57, 60, 2, 11, 90, 120, 7]])
    with torch.no_grad():
        model.eval(), ref.eval()
        evaluated = model(input_ids=ids, labels=ids).loss, ref(input_ids=ids, labels=ids).loss
    model.train(), ref.train()
    got, want = lora_grads(model, ids), lora_grads(ref, ids)
    assert got.keys() == want.keys() and len(got) == 28
    for name, g in got.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
        assert torch.allclose(g, want[name], rtol=1e-4, atol=1e-6), (name, (g - want[name]).abs().max())
    assert torch.allclose(*evaluated, atol=1e-5)  # bnb's dequantize is exact: only float summation order differs


@pytest.mark.parametrize("bits", ["4", "8"])
def test_qlora_run_learns_and_its_adapter_loads_on_the_full_precision_base(tiny_model_dir, id_file, tmp_path, bits,
                                                                           capsys):
    pytest.importorskip("bitsandbytes")
    from keel.model.load import ModelArgs, load_model

    res = sft(base_argv(tiny_model_dir, id_file, tmp_path, "--num_train_epochs", "2", "--quant_method", "bnb",
                        "--quant_bits", bits))
    losses = [r["loss"] for r in read_log(res["run_dir"]) if "loss" in r]
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-3:]) < sum(losses[:3]) * 0.9, losses
    assert ("| 8-bit base |" if bits == "8" else "| 4-bit nf4 base |") in capsys.readouterr().out  # as loaded
    saved = json.loads((Path(res["run_dir"]) / "args.json").read_text())
    assert saved["quant_bits"] == int(bits) and saved["quant_method"] == "bnb" and saved["cpu_autocast_bf16"] is False
    tuned, _, _ = load_model(ModelArgs(adapters=[res["last_model_checkpoint"]]))  # keel infer's load: no --quant_*
    assert not getattr(tuned.get_base_model(), "is_loaded_in_4bit", False)
    assert any(p.abs().sum() > 0 for n, p in tuned.named_parameters() if "lora_B" in n)


def test_qlora_resume_reproduces_uninterrupted(tiny_model_dir, id_file, tmp_path):
    """The adapter is reloaded onto a freshly quantized base: the resumed run logs the same losses after step 2
    and ends with the same adapter, bit for bit."""
    pytest.importorskip("bitsandbytes")
    argv = ("--max_steps", "4", "--save_steps", "2", "--quant_method", "bnb")
    full = sft(base_argv(tiny_model_dir, id_file, tmp_path / "a", *argv))
    resumed = sft(base_argv(tiny_model_dir, id_file, tmp_path / "b", *argv, "--resume_from_checkpoint",
                            checkpoint_copy(full, tmp_path / "b", step=2)))
    assert_resumed_like(full, resumed, step=2)


@pytest.mark.parametrize("flags,pattern", [
    (["--quant_method", "gptq"], "--quant_method must be bnb"),
    (["--quant_bits", "4"], "--quant_bits needs --quant_method bnb"),
    (["--quant_method", "bnb", "--quant_bits", "3"], "--quant_bits must be 4 or 8"),
    (["--quant_method", "bnb", "--bnb_4bit_quant_type", "int4"], "--bnb_4bit_quant_type must be nf4 or fp4"),
    (["--quant_method", "bnb", "--bnb_4bit_compute_dtype", "int8"], "--bnb_4bit_compute_dtype must be"),
    (["--quant_method", "bnb", "--cpu_autocast_bf16", "true"], "--cpu_autocast_bf16 true with --quant_method bnb"),
])
def test_bad_quant_flags_are_one_line(tiny_model_dir, id_file, tmp_path, capsys, flags, pattern):
    code, _, err = run_keel(capsys, "sft", *base_argv(tiny_model_dir, id_file, tmp_path, *flags))
    assert code == 2 and pattern in err and err.count("\n") == 1, err


def test_missing_bitsandbytes_is_one_line(tiny_model_dir, id_file, tmp_path, capsys, monkeypatch):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find(name, *a))
    code, _, err = run_keel(capsys, "rlhf", "--model", tiny_model_dir, "--dataset", id_file, "--output_dir", tmp_path,
                            "--quant_method", "bnb")
    assert code == 2 and "pip install -e '.[qlora]'" in err and err.count("\n") == 1, err
