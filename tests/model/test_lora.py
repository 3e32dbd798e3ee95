"""LoRA placement and the cheap dropout that replaces peft's nn.Dropout on CPU."""

import pytest
import torch

from keel.core.errors import KeelError
from keel.model.lora import CheapDropout, LoraArgs, apply_lora, use_cheap_dropout
from tests.conftest import build_model


def test_cheap_dropout_matches_nn_dropout_statistics():
    torch.manual_seed(0)
    x = torch.randn(1000, 1000, requires_grad=True)
    drop = CheapDropout(0.05).train()
    y = drop(x)
    dropped = y == 0
    assert abs(dropped.float().mean().item() - 0.05) < 0.002
    kept = ~dropped
    torch.testing.assert_close(y[kept], x[kept] / 0.95)          # same scaling as nn.Dropout
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.95)      # gradient flows only through kept values
    assert not torch.equal(drop(x), drop(x))                     # a fresh mask every call


def test_cheap_dropout_is_identity_in_eval_and_follows_the_seed():
    x = torch.randn(64, 32)
    assert torch.equal(CheapDropout(0.3).eval()(x), x)
    torch.manual_seed(1)
    a = CheapDropout(0.3).train()(x)
    torch.manual_seed(1)
    b = CheapDropout(0.3).train()(x)
    assert torch.equal(a, b)                                     # reproducible runs and resume


def test_cheap_dropout_keeps_only_a_bool_mask_for_backward():
    # A saved float mask per LoRA input cost about 100 MB on a 256-token pass of the embedded model.
    saved = []
    x = torch.randn(64, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        CheapDropout(0.3).train()(x).sum().backward()
    assert [t.dtype for t in saved] == [torch.bool]


def test_lora_adapts_every_block_linear_not_the_head_and_gets_cheap_dropout(tiny_tokenizer):
    model = build_model("llama", len(tiny_tokenizer), tiny_tokenizer.eos_token_id)
    model = apply_lora(model, LoraArgs(lora_dropout=0.1))
    assert use_cheap_dropout(model) == 7 * model.config.num_hidden_layers
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    suffixes = {n.rsplit(".", 1)[-1] for n in adapted}
    assert suffixes == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in n for n in adapted)
    drops = [m for m in model.modules() if isinstance(m, CheapDropout)]
    assert len(drops) == len(adapted) and all(d.p == 0.1 for d in drops)
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_no_dropout_keeps_peft_identity(tiny_tokenizer):
    model = build_model("llama", len(tiny_tokenizer), tiny_tokenizer.eos_token_id)
    model = apply_lora(model, LoraArgs(lora_dropout=0.0))
    assert use_cheap_dropout(model) == 0
    assert not any(isinstance(m, CheapDropout) for m in model.modules())


def test_unknown_target_module_names_the_flag(tiny_tokenizer):
    model = build_model("llama", len(tiny_tokenizer), tiny_tokenizer.eos_token_id)
    with pytest.raises(KeelError, match="--target_modules: no module named wq"):
        apply_lora(model, LoraArgs(target_modules=["wq"]))
