"""Multiple-choice scoring by log-likelihood, the lm-evaluation-harness way.

    items = read_mc_file("../shared/data/eval/arc_easy.jsonl", limit=500)
    scores = score_mc(model, tok, items)   # {"acc": ..., "acc_norm": ...}

Each choice is scored as the continuation " CHOICE" of the context "QUERY\\nAnswer:" on the raw
text (no chat template, as the published zero-shot figures are computed). acc picks the choice
with the highest summed log-probability; acc_norm divides it by the choice's length in characters.
"""

from __future__ import annotations

from pathlib import Path

import torch

from keel.chat import encode_text
from keel.data.formats import parse_jsonl, read_text
from keel.errors import KeelError
from keel.generate import model_device


def read_mc_file(path: str, limit: int | None = None) -> list[dict]:
    """Rows {"query", "choices", "gold"}; the first `limit` rows (a fixed subset)."""
    p = Path(path)
    if not p.is_file():
        raise KeelError(f"--mc_files: '{path}' does not exist")
    items = []
    for n, row in parse_jsonl(read_text(p), path):
        if not isinstance(row, dict):
            raise KeelError(f"{path}: line {n}: each line must be a JSON object")
        if not isinstance(row.get("query"), str):
            raise KeelError(f"{path}: line {n}: field 'query' must be a string")
        choices = row.get("choices")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise KeelError(f"{path}: line {n}: field 'choices' must be a non-empty list of strings")
        gold = row.get("gold")
        if not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise KeelError(f"{path}: line {n}: field 'gold' must be an index into choices (0..{len(choices) - 1}), got {gold!r}")
        items.append(row)
        if limit and len(items) >= limit:
            break
    if not items:
        raise KeelError(f"{path}: no items")
    return items


def requests(tok, items: list[dict]) -> list[tuple[int, int, list[int], list[int]]]:
    """(item, choice, context ids, continuation ids) for every choice."""
    out = []
    for i, item in enumerate(items):
        context = item["query"].rstrip() + "\nAnswer:"
        ctx = encode_text(tok, context)
        for j, choice in enumerate(item["choices"]):
            full = encode_text(tok, context + " " + choice)
            cont = full[len(ctx):] if full[:len(ctx)] == ctx else encode_text(tok, " " + choice)
            out.append((i, j, ctx, cont))
    return out


@torch.no_grad()
def loglikelihoods(model, tok, reqs, batch_size: int = 16) -> list[float]:
    """Summed log-probability of each continuation given its context, batched (right padding)."""
    device = model_device(model)
    order = sorted(range(len(reqs)), key=lambda k: -len(reqs[k][2]) - len(reqs[k][3]))
    result = [0.0] * len(reqs)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        seqs = [reqs[k][2] + reqs[k][3] for k in idx]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tok.pad_token_id, device=device)     # (B, T)
        mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s, device=device)
            mask[r, :len(s)] = 1
        logprobs = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().log_softmax(-1)  # (B, T, V)
        for r, k in enumerate(idx):
            n_ctx, cont = len(reqs[k][2]), reqs[k][3]
            pos = torch.arange(n_ctx - 1, n_ctx - 1 + len(cont), device=device)
            result[k] = logprobs[r, pos, torch.tensor(cont, device=device)].sum().item()
    return result


def score_mc(model, tok, items: list[dict], batch_size: int = 16) -> dict:
    reqs = requests(tok, items)
    ll = loglikelihoods(model, tok, reqs, batch_size)
    per_item: dict[int, list] = {}
    for (i, j, _, _), value in zip(reqs, ll):
        per_item.setdefault(i, []).append((j, value))
    acc = acc_norm = 0
    for i, scored in per_item.items():
        choices, gold = items[i]["choices"], items[i]["gold"]
        acc += max(scored, key=lambda x: x[1])[0] == gold
        acc_norm += max(scored, key=lambda x: x[1] / max(len(choices[x[0]]), 1))[0] == gold
    return {"acc": round(acc / len(items), 4), "acc_norm": round(acc_norm / len(items), 4), "n": len(items)}
