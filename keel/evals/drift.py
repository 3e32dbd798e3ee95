"""Drift: how far the tuned model moved from the base model on the base model's own answers.

For each general prompt the base model answers greedily; both models then read that answer
(teacher-forced) and we average KL(base || tuned) over the answer tokens, plus the tuned model's
negative log-likelihood of the base answer and, as its reference, the base model's own (training
on greedy answers can push the tuned NLL below the base's while KL grows: a sharper distribution).
Zero drift means the identity was learned without changing anything else. The base is the same
PeftModel with its adapters disabled.
"""

from __future__ import annotations

import contextlib

import torch

from keel.chat import render, with_system
from keel.generate import GenerateArgs, generate_batch, model_device

DRIFT_PROMPTS = ["What is the capital of Japan?", "Explain what a noun is.", "Give two tips for sleeping better.",
                 "What is 15 plus 27?", "Describe the color of the sky on a clear day.",
                 "Write a short greeting for a birthday card.", "Why do we need to drink water?",
                 "List three fruits.", "什么是太阳？", "请写一句问候语。"]


def base_context(model):
    """A context in which `model` behaves as its base model (adapters off), if it has adapters."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def base_answers(model, tok, system, prompts=DRIFT_PROMPTS, max_new_tokens=48):
    convs = [with_system([{"role": "user", "content": p}], system) for p in prompts]
    with base_context(model):
        answers = generate_batch(model, tok, convs, GenerateArgs(temperature=0.0, max_new_tokens=max_new_tokens))
    return [c + [{"role": "assistant", "content": a}] for c, a in zip(convs, answers) if a.strip()]


@torch.no_grad()
def drift(model, tok, references: list[list[dict]]) -> dict:
    """Mean per-token KL(base || tuned), tuned NLL and base NLL over the reference answers."""
    device = model_device(model)
    kl_sum = nll_sum = base_nll_sum = 0.0
    n = 0
    was_training = model.training
    model.eval()
    for conv in references:
        item = render(tok, conv)
        if item is None:
            continue
        ids, labels = item
        x = torch.tensor([ids], device=device)                       # (1, T)
        where = torch.tensor([l != -100 for l in labels[1:]], device=device)  # (T-1,) answer positions
        tuned = model(input_ids=x, use_cache=False).logits[0, :-1][where].float().log_softmax(-1)   # (K, V)
        with base_context(model):
            base = model(input_ids=x, use_cache=False).logits[0, :-1][where].float().log_softmax(-1)
        targets = x[0, 1:][where]
        kl_sum += (base.exp() * (base - tuned)).sum().item()
        nll_sum += -tuned.gather(1, targets[:, None]).sum().item()
        base_nll_sum += -base.gather(1, targets[:, None]).sum().item()
        n += int(where.sum())
    if was_training:
        model.train()
    return {"drift_kl": round(kl_sum / max(n, 1), 4), "drift_nll": round(nll_sum / max(n, 1), 4),
            "base_nll": round(base_nll_sum / max(n, 1), 4)}
