"""Multiple-choice scoring by log-likelihood, the lm-evaluation-harness way, without its waste.

    items = read_mc_file("../shared/data/eval/arc_easy.jsonl", limit=500)
    scores = score_mc(model, tok, items)   # {"acc": ..., "acc_norm": ..., "n": ..., "truncated": ...}

Two row forms, mixable in one file:
- `query`/`choices`/`gold` (ARC, PIQA): each choice is scored as the continuation " CHOICE" of the
  context "QUERY\\nAnswer:";
- `context_options`/`continuation`/`gold` (WinoGrande, partial scoring as in lm-evaluation-harness
  and llm-foundry): the same continuation " CONTINUATION" is scored after each context option.
Raw text, no chat template, as the published zero-shot figures are computed. acc picks the option
with the highest summed log-probability; acc_norm divides it by the scored text's length in
characters (for partial scoring every option scores the same text, so acc_norm equals acc).

The numbers are the harness's (`bench/eval_bench.py` runs both side by side); the work is not:
- an item's options share their context (and often the start of their continuations), so one
  sequence holds [shared start, option 1's rest, option 2's rest, ...]: the shared start is computed
  once, each rest attends to it and to itself (a 4D mask, position ids continuing from the shared
  start), as `keel/batching.py` packs a shared system prompt in training;
- the output head (vocab x hidden, the largest matmul of a small model) runs only at the
  positions that predict an option's tokens, once per position, not at every position;
- batches are sized by tokens (padded width x rows), longest items first, so little goes to padding.
A context too long for the model's window is cut from the left, as the harness does (that option
then goes alone), and counted in `truncated`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from keel.core.errors import KeelError
from keel.data.formats import parse_jsonl, read_text
from keel.model.generate import model_device
from keel.model.load import eval_mode
from keel.model.template import encode_text


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


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness splits them.

    Trailing spaces of the context move to the continuation; the continuation is what encoding
    the whole text adds after the context's own encoding. An empty context is the end-of-text token.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        return [tok.eos_token_id], encode_text(tok, continuation)
    ctx = encode_text(tok, context)
    return ctx, encode_text(tok, context + continuation)[len(ctx):]


def requests(tok, items: list[dict]) -> list[tuple[int, int, list[int], list[int]]]:
    """(item, option, context ids, continuation ids) for every option."""
    return [(i, j, *encode_pair(tok, context, text))
            for i, item in enumerate(items) for j, (context, text, _) in enumerate(options(item))]


def model_window(model) -> int:
    """The longest sequence the model takes, found where lm-evaluation-harness looks (else 2048)."""
    config = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def layout(reqs, window: int) -> tuple[list[dict], int]:
    """The sequences to run: one per item (what its options share once, then each option's rest), and the truncated count.

    A sequence: `ids`, `pos` (position ids), `seg` (0 = the shared prefix, s = option s), `score`
    (request index, the positions whose logits score its continuation, the continuation ids). An
    option's last token is never fed: nothing is predicted from it. The shared prefix is the longest
    common start of the options' fed tokens, the context and often part of the continuations (PIQA's
    two solutions mostly differ in a few words): a position there is computed once and scores every
    option that passes through it. An option longer than the window is cut from the left as the
    harness does ((context + continuation)[-(window + 1):][:-1]) and goes alone.
    """
    by_item: dict[int, list[int]] = {}
    for k, (i, _, _, _) in enumerate(reqs):
        by_item.setdefault(i, []).append(k)
    seqs, truncated_items = [], set()
    for i, ks in by_item.items():
        fits = []
        for k in ks:
            ctx, cont = reqs[k][2], reqs[k][3]
            if len(cont) > window:
                raise KeelError(f"multiple choice: item {i + 1}, option {reqs[k][1] + 1}: its continuation alone "
                                f"({len(cont)} tokens) is longer than the model's window ({window})")
            if len(ctx) + len(cont) - 1 <= window:
                fits.append(k)
                continue
            truncated_items.add(i)
            full = (ctx + cont)[-(window + 1):]
            seqs.append({"ids": full[:-1], "pos": list(range(window)), "seg": [1] * window,
                         "score": [(k, list(range(window - len(cont), window)), cont)]})
        if not fits:
            continue
        fed = {k: (reqs[k][2] + reqs[k][3])[:-1] for k in fits}
        first, p = fed[fits[0]], min(len(x) for x in fed.values())
        for x in fed.values():
            n = 0
            while n < p and x[n] == first[n]:
                n += 1
            p = n
        ids, pos, seg, score = first[:p], list(range(p)), [0] * p, []
        for s, k in enumerate(fits, start=1):
            start, n_ctx, cont = len(ids), len(reqs[k][2]), reqs[k][3]
            where = [t if t < p else start + t - p for t in range(n_ctx - 1, n_ctx - 1 + len(cont))]
            score.append((k, where, cont))
            tail = fed[k][p:]
            ids, pos, seg = ids + tail, pos + list(range(p, p + len(tail))), seg + [s] * len(tail)
        seqs.append({"ids": ids, "pos": pos, "seg": seg, "score": score})
    return seqs, len(truncated_items)


def batches(seqs: list[dict], max_tokens: int, max_rows: int) -> list[list[dict]]:
    """Longest first; a batch grows while rows x its longest row stays within max_tokens (a longer row goes alone)."""
    out, cur = [], []
    for s in sorted(seqs, key=lambda s: -len(s["ids"])):
        if cur and ((len(cur) + 1) * len(cur[0]["ids"]) > max_tokens or len(cur) >= max_rows):
            out.append(cur)
            cur = []
        cur.append(s)
    return out + [cur] if cur else out


def _output_parts(model):
    """(decoder, output head) of a causal LM, or None where the head does more than a linear map."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "final_logit_softcapping", None) or getattr(base.config, "logit_scale", None):
        return None                                        # Gemma 2, Cohere: use the model's own logits
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    return (decoder, head) if decoder is not None and head is not None else None


def _forward_batch(model, batch: list[dict], pad_id: int, parts) -> list[tuple[int, float]]:
    device = model_device(model)
    width = len(batch[0]["ids"])
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(batch), width), dtype=torch.long)
    seg = torch.full((len(batch), width), -1, dtype=torch.long)      # -1: padding
    for r, s in enumerate(batch):
        n = len(s["ids"])
        ids[r, :n], pos[r, :n], seg[r, :n] = torch.tensor(s["ids"]), torch.tensor(s["pos"]), torch.tensor(s["seg"])
    # (B, 1, T, T): causal, within one option or onto the shared prefix. Padding attends to padding
    # (and the prefix), never a row of nothing, which would make NaNs that 0-weights still spread.
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = (causal & ((seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)))[:, None]
    if model.config._attn_implementation == "eager":                # eager adds its mask to the scores
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    where: dict[tuple[int, int], int] = {}          # (row, position) -> its place among the head's inputs
    picks, targets, owners = [], [], []
    for r, s in enumerate(batch):
        for k, positions, cont in s["score"]:
            for t, c in zip(positions, cont):
                picks.append(where.setdefault((r, t), len(where)))
                targets.append(c)
                owners.append(k)
    rows = torch.tensor([r for r, _ in where], device=device)
    cols = torch.tensor([t for _, t in where], device=device)
    kw = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device),
          "use_cache": False}
    if parts is None:
        logits = model(**kw).logits[rows, cols]                      # (N, V)
    else:
        hidden = parts[0](**kw).last_hidden_state                   # (B, T, H)
        logits = parts[1](hidden[rows, cols])                       # (N, V): the head only where it is needed, once
    logprobs = logits.float().log_softmax(-1)[torch.tensor(picks, device=device), torch.tensor(targets, device=device)]
    sums: dict[int, float] = {}
    for k, value in zip(owners, logprobs.tolist()):
        sums[k] = sums.get(k, 0.0) + value
    return list(sums.items())


@torch.no_grad()
def loglikelihoods(model, tok, reqs, max_tokens: int = 2048, max_rows: int = 64, step=None,
                   window: int | None = None) -> tuple[list[float], int]:
    """Summed log-probability of each continuation given its context, and how many items were truncated.

    `step(n)` is called with the number of options scored by each forward pass (progress).
    """
    seqs, truncated = layout(reqs, window or model_window(model))
    parts = _output_parts(model)
    result = [0.0] * len(reqs)
    for batch in batches([s for s in seqs if s["ids"]], max_tokens, max_rows):   # empty: nothing to score
        for k, value in _forward_batch(model, batch, tok.pad_token_id, parts):
            result[k] = value
        if step is not None:
            step(sum(len(s["score"]) for s in batch))
    return result, truncated


def score_mc(model, tok, items: list[dict], batch_size: int = 16, step=None, max_tokens: int = 2048,
             window: int | None = None) -> dict:
    """acc and acc_norm over `items`; `step(n)` is called as options are scored (progress).

    A forward pass holds at most `batch_size` items and `max_tokens` tokens (padding included).
    `truncated`: items with an option cut from the left to fit the model's window.
    """
    reqs = requests(tok, items)
    with eval_mode(model):
        ll, truncated = loglikelihoods(model, tok, reqs, max_tokens, batch_size, step, window)
    if truncated:
        from keel.core.flags import note_once

        note_once(f"multiple choice: {truncated} of {len(items)} items exceed the model's window "
                  f"({window or model_window(model)} tokens) and were cut from the left, as lm-evaluation-harness does")
    per_item: dict[int, list] = {}
    for (i, j, _, _), value in zip(reqs, ll):
        per_item.setdefault(i, []).append((j, value))
    acc = acc_norm = 0
    for i, scored in per_item.items():
        lengths = [n for _, _, n in options(items[i])]
        acc += max(scored, key=lambda x: x[1])[0] == items[i]["gold"]
        acc_norm += max(scored, key=lambda x: x[1] / max(lengths[x[0]], 1))[0] == items[i]["gold"]
    return {"acc": round(acc / len(items), 4), "acc_norm": round(acc_norm / len(items), 4), "n": len(items),
            "truncated": truncated}


def count_requests(items: list[dict]) -> int:
    return sum(len(item.get("context_options") or item["choices"]) for item in items)
