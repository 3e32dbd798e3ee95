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

from keel.model.generate import pad_batch
from keel.model.template import IGNORE_INDEX


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


def shared_prefix_len(rows: list[tuple[list[int], list[int]]]) -> int:
    """Tokens at the start of every row that can be computed once for all of them.

    That is the common prefix (system prompt, template) cut before the first labelled token, minus
    one: the position just before a row's own tokens predicts that row's next token, so it must
    not be shared. 0 when fewer than two rows or no common start.
    """
    if len(rows) < 2:
        return 0
    first, n = rows[0][0], min(len(ids) for ids, _ in rows) - 1   # every row keeps a token of its own
    for ids, labels in rows:
        labelled = next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), len(labels))
        n = min(n, labelled - 1)
        k = 0
        while k < n and ids[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def by_start(rows: list[tuple[list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
    """The rows of one optimizer step ordered by their token ids, so rows that start alike (the same system prompt
    and template) are neighbours and `pack` computes their common start once. A step's gradient is a sum over its
    rows, so their order changes nothing but the packing."""
    return sorted(rows, key=lambda row: row[0])


def pack(rows: list[tuple[list[int], list[int]]], budget: int, share_prefix: bool = True) -> list[dict]:
    """Greedy, in order: rows into sequences of at most `budget` tokens (a longer row goes alone).

    With share_prefix, rows that start alike (the same system prompt and template, as in identity
    data where that is a third of every row) are laid out as [prefix, row1 tail, row2 tail, ...]:
    the prefix is computed once, each tail attends to the prefix and to itself (a 4D mask), and
    position ids continue from the prefix, so every token sees exactly what it sees alone.
    """
    groups, cur, cur_p = [], [], 0                  # groups: (rows, their shared prefix length)
    for row in rows:
        p = shared_prefix_len(cur + [row]) if share_prefix else 0
        if cur and sum(len(ids) for ids, _ in cur) + len(row[0]) - p * len(cur) > budget:
            groups.append((cur, cur_p))
            cur, p = [], 0
        cur.append(row)
        cur_p = p
    if cur:
        groups.append((cur, cur_p))
    out, first = [], 0
    for g, p in groups:
        ids = g[0][0][:p] + [t for r in g for t in r[0][p:]]
        labels = g[0][1][:p] + [t for r in g for t in r[1][p:]]
        pos = list(range(p)) + [i for r in g for i in range(p, len(r[0]))]
        batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),  # (1, T)
                 "position_ids": torch.tensor([pos]), "n_tokens": sum(len(r[0]) for r in g),
                 "rows": slice(first, first + len(g))}  # which of the given rows, in order
        first += len(g)
        if p:
            seg = torch.tensor([0] * p + [i + 1 for i, r in enumerate(g) for _ in range(len(r[0]) - p)])  # (T,)
            causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
            batch["attention_mask"] = (causal & ((seg[:, None] == seg[None, :]) | (seg[None, :] == 0)))[None, None]  # (1, 1, T, T)
        out.append(batch)
    return out


def pad(rows: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int) -> list[dict]:
    """Right-padded micro-batches of `batch_size` rows (the unpacked path, for comparison)."""
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        ids, mask = pad_batch([x for x, _ in chunk], pad_id)          # (B, T)
        labels, _ = pad_batch([y for _, y in chunk], IGNORE_INDEX)   # (B, T)
        out.append({"input_ids": ids, "labels": labels, "attention_mask": mask, "n_tokens": int(mask.sum()),
                    "rows": slice(i, i + len(chunk))})
    return out


def micro_batches(rows, packing: bool, batch_size: int, pack_tokens: int, pad_id: int,
                  share_prefix: bool = True) -> list[dict]:
    """The forward passes for one window of rows: packed ones of up to pack_tokens tokens, or padded batches."""
    if not rows:
        return []
    return pack(rows, pack_tokens, share_prefix) if packing else pad(rows, batch_size, pad_id)




