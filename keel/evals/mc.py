"""Multiple-choice scoring by log-likelihood, the lm-evaluation-harness way.

    items = read_mc_file("../shared/data/eval/arc_easy.jsonl", limit=500)
    scores = score_mc(model, tok, items)   # {"acc": ..., "acc_norm": ..., "n": ...}

Two row forms, mixable in one file:
- `query`/`choices`/`gold` (ARC, PIQA): each choice is scored as the continuation " CHOICE" of the
  context "QUERY\\nAnswer:";
- `context_options`/`continuation`/`gold` (WinoGrande, partial scoring as in lm-evaluation-harness
  and llm-foundry): the same continuation " CONTINUATION" is scored after each context option.
Raw text, no chat template, as the published zero-shot figures are computed. acc picks the option
with the highest summed log-probability; acc_norm divides it by the scored text's length in
characters (for partial scoring every option scores the same text, so acc_norm equals acc).
"""

from __future__ import annotations

from pathlib import Path

import torch

from keel.batching import pad_batch
from keel.chat import encode_text
from keel.data.formats import parse_jsonl, read_text
from keel.errors import KeelError
from keel.generate import model_device
from keel.model import eval_mode


def _check_row(row, path: str, n: int):
    if not isinstance(row, dict):
        raise KeelError(f"{path}: line {n}: each line must be a JSON object")
    partial = "context_options" in row
    options = row.get("context_options" if partial else "choices")
    if partial:
        if not isinstance(row.get("continuation"), str) or not row["continuation"].strip():
            raise KeelError(f"{path}: line {n}: field 'continuation' must be a non-empty string")
    elif not isinstance(row.get("query"), str):
        raise KeelError(f"{path}: line {n}: field 'query' must be a string (or give 'context_options' and 'continuation')")
    key = "context_options" if partial else "choices"
    if not isinstance(options, list) or not options or not all(isinstance(c, str) for c in options):
        raise KeelError(f"{path}: line {n}: field '{key}' must be a non-empty list of strings")
    gold = row.get("gold")
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(options):
        raise KeelError(f"{path}: line {n}: field 'gold' must be an index into {key} (0..{len(options) - 1}), got {gold!r}")


def read_mc_file(path: str, limit: int | None = None) -> list[dict]:
    """Rows {"query", "choices", "gold"} or {"context_options", "continuation", "gold"}; the first `limit` rows."""
    p = Path(path)
    if not p.is_file():
        raise KeelError(f"--mc_files: '{path}' does not exist")
    items = []
    for n, row in parse_jsonl(read_text(p), path):
        _check_row(row, path, n)
        items.append(row)
        if limit and len(items) >= limit:
            break
    if not items:
        raise KeelError(f"--mc_files {path}: no items")
    return items


def options(item: dict) -> list[tuple[str, str, int]]:
    """(context, continuation, length for acc_norm) per option, as raw text."""
    if "context_options" in item:
        cont = item["continuation"]
        cont = cont if cont[:1].isspace() else " " + cont
        return [(ctx.rstrip(), cont, len(item["continuation"])) for ctx in item["context_options"]]
    context = item["query"].rstrip() + "\nAnswer:"
    return [(context, " " + choice, len(choice)) for choice in item["choices"]]


def requests(tok, items: list[dict]) -> list[tuple[int, int, list[int], list[int]]]:
    """(item, choice, context ids, continuation ids) for every choice."""
    out = []
    for i, item in enumerate(items):
        for j, (context, text, _) in enumerate(options(item)):
            ctx = encode_text(tok, context)
            full = encode_text(tok, context + text)
            cont = full[len(ctx):] if full[:len(ctx)] == ctx else encode_text(tok, text)
            out.append((i, j, ctx, cont))
    return out


@torch.no_grad()
def loglikelihoods(model, tok, reqs, batch_size: int = 16, step=None) -> list[float]:
    """Summed log-probability of each continuation given its context, batched (right padding)."""
    device = model_device(model)
    order = sorted(range(len(reqs)), key=lambda k: -len(reqs[k][2]) - len(reqs[k][3]))
    result = [0.0] * len(reqs)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = pad_batch([reqs[k][2] + reqs[k][3] for k in idx], tok.pad_token_id)   # (B, T), right-padded
        ids, mask = ids.to(device), mask.to(device)
        logprobs = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().log_softmax(-1)  # (B, T, V)
        for r, k in enumerate(idx):
            n_ctx, cont = len(reqs[k][2]), reqs[k][3]
            pos = torch.arange(n_ctx - 1, n_ctx - 1 + len(cont), device=device)
            result[k] = logprobs[r, pos, torch.tensor(cont, device=device)].sum().item()
        if step is not None:
            step(len(idx))
    return result


def score_mc(model, tok, items: list[dict], batch_size: int = 16, step=None) -> dict:
    """acc and acc_norm over `items`; `step(n)` is called as continuations are scored (progress)."""
    reqs = requests(tok, items)
    with eval_mode(model):
        ll = loglikelihoods(model, tok, reqs, batch_size, step)
    per_item: dict[int, list] = {}
    for (i, j, _, _), value in zip(reqs, ll):
        per_item.setdefault(i, []).append((j, value))
    acc = acc_norm = 0
    for i, scored in per_item.items():
        lengths = [n for _, _, n in options(items[i])]
        acc += max(scored, key=lambda x: x[1])[0] == items[i]["gold"]
        acc_norm += max(scored, key=lambda x: x[1] / max(lengths[x[0]], 1))[0] == items[i]["gold"]
    return {"acc": round(acc / len(items), 4), "acc_norm": round(acc_norm / len(items), 4), "n": len(items)}


def count_requests(items: list[dict]) -> int:
    return sum(len(item.get("context_options") or item["choices"]) for item in items)
