"""Turn tokenized rows into micro-batches: packed (padding-free) or padded.

    windows = epoch_windows(n_rows, rows_per_step, seed, epoch, rank, world)
    for micro in pack(rows, budget_tokens): model(**micro)

Packing concatenates rows into one sequence whose position ids restart at 0 for every row;
transformers then builds a block-diagonal causal mask from the position ids (with use_cache
off), so no row attends to another and no compute is spent on padding. Packing is exact: the
loss and gradients equal those of the rows run one by one (tests/test_batching.py).
"""

from __future__ import annotations

import random

import torch

from keel.chat import IGNORE_INDEX


def epoch_windows(n_rows: int, rows_per_step: int, seed: int, epoch: int, rank: int = 0, world: int = 1):
    """Row indices for each optimizer step of one epoch, this process's share.

    The order depends only on (seed, epoch), so a resumed run sees the same data at the same step.
    The last, short window is kept (nothing is dropped). Every process gets the same number of
    windows; a process whose share of a window is empty simply contributes no tokens.
    """
    order = list(range(n_rows))
    random.Random(seed * 1000 + epoch).shuffle(order)
    per_window = rows_per_step * world
    windows = []
    for start in range(0, n_rows, per_window):
        chunk = order[start:start + per_window]
        windows.append(chunk[rank::world])
    return windows


def pack(rows: list[tuple[list[int], list[int]]], budget: int) -> list[dict]:
    """Greedy, in order: rows into sequences of at most `budget` tokens (a longer row goes alone)."""
    groups, cur, cur_len = [], [], 0
    for ids, labels in rows:
        if cur and cur_len + len(ids) > budget:
            groups.append(cur)
            cur, cur_len = [], 0
        cur.append((ids, labels))
        cur_len += len(ids)
    if cur:
        groups.append(cur)
    out = []
    for g in groups:
        ids = [t for r in g for t in r[0]]
        labels = [t for r in g for t in r[1]]
        pos = [p for r in g for p in range(len(r[0]))]
        out.append({"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),  # (1, T)
                    "position_ids": torch.tensor([pos])})
    return out


def pad(rows: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int) -> list[dict]:
    """Right-padded micro-batches of `batch_size` rows (the unpacked path, for comparison)."""
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        width = max(len(r[0]) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        labels = torch.full((len(chunk), width), IGNORE_INDEX)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, (x, y) in enumerate(chunk):
            ids[j, :len(x)], labels[j, :len(y)], mask[j, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        out.append({"input_ids": ids, "labels": labels, "attention_mask": mask})  # (B, T)
    return out


def micro_batches(rows, packing: bool, batch_size: int, pack_tokens: int, pad_id: int) -> list[dict]:
    """The forward passes for one window of rows: packed ones of up to pack_tokens tokens, or padded batches."""
    if not rows:
        return []
    return pack(rows, pack_tokens) if packing else pad(rows, batch_size, pad_id)


def token_loss(model, batch: dict, device, labelled_only: bool = True):
    """Summed cross-entropy over label tokens, the number of label tokens, and correct predictions.

    With labelled_only the output head runs only where a next token is learned: most positions
    are prompt, and the head (vocab x hidden) is a large share of a small model's compute.
    """
    ids = batch["input_ids"].to(device)                     # (B, T)
    labels = batch["labels"].to(device)                     # (B, T)
    targets = labels[:, 1:]                                 # (B, T-1): token t+1 is predicted at t
    kwargs = {k: batch[k].to(device) for k in ("position_ids", "attention_mask") if k in batch}
    if labelled_only and ids.shape[0] == 1:
        keep = (targets[0] != IGNORE_INDEX).nonzero().squeeze(1)      # (K,)
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep, **kwargs).logits[0]  # (K, V)
        tgt = targets[0, keep]
    else:
        logits = model(input_ids=ids, use_cache=False, **kwargs).logits[:, :-1]  # (B, T-1, V)
        keep = targets != IGNORE_INDEX
        logits, tgt = logits[keep], targets[keep]
    loss = torch.nn.functional.cross_entropy(logits.float(), tgt, reduction="sum")
    correct = (logits.argmax(-1) == tgt).sum()
    return loss, tgt.numel(), correct.item()
