"""Drift: how far the tuned model moved from the base model on the base model's own answers.

For each general prompt (sets/drift.jsonl) the base model answers greedily; both models then read
that answer (teacher-forced) and we average KL(base || tuned) over the answer tokens, plus the tuned
model's negative log-likelihood of the base answer and, as its reference, the base model's own
(training on greedy answers can push the tuned NLL below the base's while KL grows: a sharper
distribution). Zero drift means the identity was learned without changing anything else. The base
is the same PeftModel with its adapters disabled.
"""

from __future__ import annotations

import torch

from keel.model.generate import GenerateArgs, generate_batch, model_device
from keel.model.load import base_context, eval_mode
from keel.model.template import IGNORE_INDEX, render, with_system


def drift_prompts() -> list[str]:
    from keel.evals.sets import SETS_DIR, probes, read_set

    return [p.query for p in probes(read_set(SETS_DIR / "drift.jsonl", "drift"))]


def base_answers(model, tok, system, prompts=None, max_new_tokens=48, batch_size: int = 8, step=None):
    """The base model's greedy answers to `prompts`, as conversations to read back (empty answers dropped).
    Not to be called inside base_context: peft's disable_adapter does not nest."""
    convs = [with_system([{"role": "user", "content": p}], system) for p in (prompts or drift_prompts())]
    with base_context(model), eval_mode(model):
        answers = generate_batch(model, tok, convs, GenerateArgs(temperature=0.0, max_new_tokens=max_new_tokens),
                                 batch_size=batch_size, progress=step)
    return [c + [{"role": "assistant", "content": a}] for c, a in zip(convs, answers) if a.strip()]


@torch.no_grad()
def drift(model, tok, references: list[list[dict]], step=None) -> dict:
    """Mean per-token KL(base || tuned), tuned NLL and base NLL over the reference answers."""
    device = model_device(model)
    kl_sum = nll_sum = base_nll_sum = 0.0
    n = 0
    with eval_mode(model):
        for conv in references:
            item = render(tok, conv)
            if item is None:
                continue
            ids, labels = item
            x = torch.tensor([ids], device=device)                                        # (1, T)
            where = torch.tensor([t != IGNORE_INDEX for t in labels[1:]], device=device)  # (T-1,) answer positions
            tuned = model(input_ids=x, use_cache=False).logits[0, :-1][where].float().log_softmax(-1)   # (K, V)
            with base_context(model):
                base = model(input_ids=x, use_cache=False).logits[0, :-1][where].float().log_softmax(-1)
            targets = x[0, 1:][where]
            kl_sum += (base.exp() * (base - tuned)).sum().item()
            nll_sum += -tuned.gather(1, targets[:, None]).sum().item()
            base_nll_sum += -base.gather(1, targets[:, None]).sum().item()
            n += int(where.sum())
            if step is not None:
                step(1)
    return {"drift_kl": round(kl_sum / max(n, 1), 4), "drift_nll": round(nll_sum / max(n, 1), 4),
            "base_nll": round(base_nll_sum / max(n, 1), 4)}
