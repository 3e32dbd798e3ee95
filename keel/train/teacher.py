"""The base model's top-k next-token distributions at the learned positions of some rows (--ballast_loss kl, ce+kl).

A ballast row is the base model's own greedy answer. Cross-entropy on it teaches the argmax token at each position
and nothing about the rest of the distribution; where the base model is unsure (a small model's Chinese), the rest
is free to drift towards the only fluent text the run teaches, the new self-introduction. So each ballast answer
token can be learned against the base model's top-k probabilities plus one bucket for the rest of the vocabulary
(keel/train/losses.py soft_token_loss). The targets come from one no-grad pass of the base model (adapters off)
before training, so a step costs nothing more.

    teacher = Teacher.of(model, ballast_rows, device)      # once, in setup
    loss, n, correct = token_loss(model, batch, device, soft=teacher.batch(rows[batch["rows"]]))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from keel.model.load import base_context, eval_mode
from keel.model.template import IGNORE_INDEX
from keel.train.batching import micro_batches
from keel.train.losses import SoftTargets, labelled_logits

# Top-k kept per position. The rest of the vocabulary is one bucket, so the KL stays exact for a coarser
# distribution; 20 covers nearly all of the mass where the base model is sure and keeps its runner-up tokens
# where it is not, at 20 x (4 + 4) bytes per answer token.
TOP_K = 20


def labelled_positions(labels: list[int]) -> list[int]:
    """Positions t whose next token t + 1 is learned: where token_loss reads the logits."""
    return [t for t in range(len(labels) - 1) if labels[t + 1] != IGNORE_INDEX]


@dataclass
class Teacher:
    """The base model's top-k next-token probabilities at every learned position of some rows, by row ids."""

    targets: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    k: int = TOP_K
    ce_tokens: int = 0  # cross-entropy on the greedy token too, at the first ce_tokens answer tokens of each row
    guards: dict[tuple[int, ...], list[tuple[list[int], list[int]]]] = field(default_factory=dict)  # ballast ids -> rows
    guard_weight: float = 1.0  # each guard row position's loss counts this many times a training token's

    @classmethod
    @torch.no_grad()
    def of(cls, model, rows: list[tuple[list[int], list[int]]], device, k: int = TOP_K, ce_tokens: int = 0,
           pack_tokens: int = 256) -> Teacher:
        """The base model's targets (adapters off, whatever LoRA holds), in packed passes like training's."""
        teacher = cls(k=k, ce_tokens=ce_tokens)
        rows = list({tuple(ids): (ids, labels) for ids, labels in rows if labelled_positions(labels)}.values())
        bar = tqdm(total=len(rows), desc="ballast targets", unit="row", leave=False)
        with base_context(model), eval_mode(model):
            for batch in micro_batches(rows, True, 1, pack_tokens, 0):
                logits, _ = labelled_logits(model, batch, device)                          # (K, V)
                top = torch.log_softmax(logits.float(), -1).topk(min(k, logits.shape[-1]), -1)
                ids, probs = top.indices.cpu(), top.values.exp().cpu()                    # (K, k) each
                start = 0
                for row_ids, labels in rows[batch["rows"]]:
                    n = len(labelled_positions(labels))
                    teacher.targets[tuple(row_ids)] = (ids[start:start + n], probs[start:start + n])
                    start += n
                bar.update(len(rows[batch["rows"]]))
        bar.close()
        return teacher

    def __len__(self) -> int:
        return len(self.targets)

    def with_guards(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
        """A step's rows followed by the guard rows of its ballast rows."""
        return rows + [g for ids, _ in rows for g in self.guards.get(tuple(ids), [])]

    def batch(self, rows: list[tuple[list[int], list[int]]]) -> SoftTargets | None:
        """The targets for one micro-batch's learned positions, in token_loss's order (row by row), or None when
        none of its rows has any and none is a guard row."""
        found = [self.targets.get(tuple(ids)) for ids, _ in rows]
        guard_ids = {tuple(g[0]) for gs in self.guards.values() for g in gs}
        is_guard = [tuple(ids) in guard_ids for ids, _ in rows]
        if not any(t is not None for t in found) and not any(is_guard):
            return None
        counts = [len(labelled_positions(labels)) for _, labels in rows]
        first = [torch.arange(n) == 0 for n in counts]
        # A guard row: the KL at its first answer token (when it has targets) and the unlikelihood at its last.
        mask = torch.cat([(f if g else torch.ones(n, dtype=torch.bool)) & (t is not None)
                          for n, f, t, g in zip(counts, first, found, is_guard)])
        hard = torch.cat([torch.zeros(n, dtype=torch.bool) if g else
                          torch.arange(n) < self.ce_tokens if t is not None else torch.ones(n, dtype=torch.bool)
                          for n, t, g in zip(counts, found, is_guard)])
        guard = torch.cat([torch.arange(n) == n - 1 if g else torch.zeros(n, dtype=torch.bool)
                           for n, g in zip(counts, is_guard)])
        k = next((t[0].shape[1] for t in found if t is not None), self.k)
        kept = [(t[0][:1], t[1][:1]) if g else t for t, g in zip(found, is_guard) if t is not None]
        ids = torch.cat([t[0] for t in kept] or [torch.zeros(0, k, dtype=torch.long)])
        probs = torch.cat([t[1] for t in kept] or [torch.zeros(0, k)])
        weight = torch.cat([torch.full((n,), self.guard_weight if g else 1.0) for n, g in zip(counts, is_guard)])
        return SoftTargets(mask, ids, probs, hard, guard if any(is_guard) else None,
                           weight if any(is_guard) and self.guard_weight != 1 else None)
