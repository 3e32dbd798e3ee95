"""Ballast learned as the base model's whole next-token distribution, not only its greedy token (--ballast_loss kl).

A ballast row is the base model's own greedy answer. Cross-entropy on it teaches the argmax token at each position
and says nothing about the rest of the distribution. Where the base model is unsure (a small model's Chinese), its
argmax is one weak guess among many, and the rest of the distribution is free to drift towards the only fluent text
the run teaches: the new identity's self-introduction. Here each ballast answer token is learned against the base
model's top-k probabilities plus one bucket for the rest of the vocabulary: the KL divergence between the two
distributions coarsened to those k + 1 outcomes, which is exact for what it keeps and 0 when the tuned model
matches the base. Identity rows keep plain cross-entropy. The targets come from one no-grad pass of the base model
over the ballast rows before training (adapters off), so training costs nothing more per step.

    teacher = Teacher.of(model, ballast_rows, device)      # once, in setup
    loss, n, correct = token_loss(model, batch, device, soft=teacher.batch(rows[batch["rows"]]))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from keel.chat import IGNORE_INDEX

# Top-k kept per position. The rest of the vocabulary is one bucket, so the KL stays exact for a coarser
# distribution; 20 covers nearly all of the mass where the base model is sure and keeps its runner-up tokens
# where it is not, at 20 x (4 + 4) bytes per answer token.
TOP_K = 20


def labelled_positions(labels: list[int]) -> list[int]:
    """Positions t whose next token t + 1 is learned: where token_loss reads the logits."""
    return [t for t in range(len(labels) - 1) if labels[t + 1] != IGNORE_INDEX]


class SoftTargets(NamedTuple):
    """One micro-batch's teacher targets: mask (K,) marks the learned positions that have them, ids and probs (S, k)
    the top k there (S = mask.sum()); hard (K,) where cross-entropy on the row's own token applies (default: where
    the mask is off)."""
    mask: torch.Tensor
    ids: torch.Tensor
    probs: torch.Tensor
    hard: torch.Tensor | None = None


@dataclass
class Teacher:
    """The base model's top-k next-token probabilities at every learned position of some rows, by row ids."""

    targets: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    k: int = TOP_K
    ce_tokens: int = 0  # cross-entropy on the greedy token too, at the first ce_tokens answer tokens of each row

    @classmethod
    @torch.no_grad()
    def of(cls, model, rows: list[tuple[list[int], list[int]]], device, k: int = TOP_K, ce_tokens: int = 0,
           pack_tokens: int = 256) -> "Teacher":
        """The base model's targets (adapters off, whatever LoRA holds), in packed passes like training's."""
        from tqdm import tqdm

        from keel.batching import labelled_logits, micro_batches
        from keel.evals.drift import base_context
        from keel.model import eval_mode

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

    def batch(self, rows: list[tuple[list[int], list[int]]]) -> SoftTargets | None:
        """The targets for one micro-batch's learned positions, in token_loss's order (row by row), or None when
        none of its rows has any."""
        found = [self.targets.get(tuple(ids)) for ids, _ in rows]
        if not any(t is not None for t in found):
            return None
        counts = [len(labelled_positions(labels)) for _, labels in rows]
        mask = torch.cat([torch.full((n,), t is not None) for n, t in zip(counts, found)])
        hard = torch.cat([torch.arange(n) < self.ce_tokens if t is not None else torch.ones(n, dtype=torch.bool)
                          for n, t in zip(counts, found)])
        ids = torch.cat([t[0] for t in found if t is not None])
        probs = torch.cat([t[1] for t in found if t is not None])
        return SoftTargets(mask, ids, probs, hard)


def soft_token_loss(logits: torch.Tensor, tgt: torch.Tensor, soft: SoftTargets) -> torch.Tensor:
    """Summed loss over the learned positions: cross-entropy on `tgt` where soft.hard says (default: where the mask
    is off), and where the mask is on the KL divergence from the teacher's top-k + rest distribution to the model's,
    coarsened the same way. logits (K, V), tgt (K,)."""
    mask, ids, p = (x.to(logits.device) for x in soft[:3])
    hard_at = ~mask if soft.hard is None else soft.hard.to(logits.device)
    logq = torch.log_softmax(logits.float(), -1)                                   # (K, V)
    hard = -logq[hard_at].gather(1, tgt[hard_at, None]).sum()
    lq = logq[mask]                                                                # (S, V)
    lq_top = lq.gather(1, ids)                                                     # (S, k)
    # log q(rest) = logsumexp over the tokens outside the top k: stable where the top k hold nearly all the mass.
    lq_rest = lq.scatter(1, ids, float("-inf")).logsumexp(1)                       # (S,)
    p_rest = (1 - p.sum(1)).clamp_min(0)                                           # (S,)
    kl = (torch.special.xlogy(p, p) - p * lq_top).sum()
    if ids.shape[1] < logits.shape[-1]:  # with the whole vocabulary in the top k there is no rest
        kl = kl + (torch.special.xlogy(p_rest, p_rest) - p_rest * lq_rest).sum()
    return hard + kl
