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

Guard rows (--ballast_guard W): two ordinary prompts per ballast row that no ballast row uses, each followed by the
opening of one of the training answers' self-introductions ("我是" of "我是Keel Robot") and the name's first token.
Two things are learned there, each position's loss counted W times: the first answer token against the base model's
distribution at that position (KL, targets from the same no-grad pass as the ballast's), and the name's first token
as unlikely after the opening: -log(1 - q(name | prompt, opening)). The leaks measured on the embedded model open
ordinary answers with the self-introduction on prompts training never saw: the tuned model puts 0.27 of its
first-token mass on "我" there (the base 0.02), and after "我是" the name comes first at 0.13 of a flat
distribution. Guard rows ride in the same step as a ballast row, so the steps and their rows are the run's without
them. On the embedded model the guards are a dial, not a fix: W = 4 halves the Chinese leakage and costs as much
identity in English as in Chinese (docs/experiment.md). Measured and dropped: the whole intro's probability
(-n log(1 - P(intro))), guards on the ballast's own prompts (both left the leakage as it was) and the
unlikelihood alone (a worse trade than with the KL).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from keel.chat import IGNORE_INDEX, render

# Top-k kept per position. The rest of the vocabulary is one bucket, so the KL stays exact for a coarser
# distribution; 20 covers nearly all of the mass where the base model is sure and keeps its runner-up tokens
# where it is not, at 20 x (4 + 4) bytes per answer token.
TOP_K = 20
# A self-introduction: a training answer that names the new identity within its first INTRO_CHARS characters, cut
# right after the name ("I'm Keel Robot", "您好！我是Keel Robot").
INTRO_CHARS = 48
# Guard rows per ballast row: 2 takes most of the built-in Chinese prompts that the ballast leaves unused.
GUARD_ROWS = 2


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
    guard: torch.Tensor | None = None  # (K,) bool: the positions whose token is learned as unlikely
    weight: torch.Tensor | None = None  # (K,): each position's loss times this (the guard rows' --ballast_guard)


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


def self_intros(rows: list[tuple[list[int], list[int]]], tokenizer, names: list[str]) -> dict[str, list[str]]:
    """The training answers' self-introductions by language ("zh", "en"), one per answer that names the identity
    early (repeats kept, so a guard draws the common ones more often)."""
    from keel.evals.sets import lang_of

    out = {"zh": [], "en": []}
    for _, labels in rows:
        text = tokenizer.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=True).strip()
        ends = [text.find(n) + len(n) for n in names if n and 0 <= text.find(n) <= INTRO_CHARS]
        if ends:
            intro = text[:min(ends)]
            out[lang_of(intro)].append(intro)
    return out


def name_start(tokenizer, ids: list[int], start: int, opening: str) -> int | None:
    """The first position from `start` whose token says more than `opening`: the name's first token (or the
    opening's end merged with it). A token that ends inside a multi-byte character decodes to U+FFFD; it belongs to
    the opening while the characters before it are still the opening's."""
    for e in range(start, len(ids)):
        text = tokenizer.decode(ids[start:e + 1])
        done = text.rstrip("\ufffd")
        if not opening.startswith(done) or (done != text and done == opening):
            return e
    return None


def guard_rows(conversations: list[list[dict]], tokenizer, intros: dict[str, list[str]], names: list[str],
               seed: int, max_length: int | None = None) -> list[tuple[list[int], list[int]]]:
    """One guard row per conversation (system prompt + user turn): answered by a self-introduction drawn (seeded)
    from those of the question's language, up to and including the name's first token. Two tokens are labelled:
    the first answer token (learned against the base model's distribution there) and the name's first token (learned
    as unlikely); one when the intro starts with the name. A conversation whose language has no self-introduction
    gives none."""
    from keel.evals.sets import lang_of

    rng, out = random.Random(seed), []
    for messages in conversations:
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        pool = intros.get(lang_of(question)) or []
        intro = rng.choice(pool) if pool else None
        guard = render(tokenizer, messages + [{"role": "assistant", "content": intro}], max_length) if intro else None
        if guard is None:
            continue
        ids, labels = guard
        opening = intro[:min(intro.find(n) for n in names if n in intro)]
        start = next(i for i, y in enumerate(labels) if y != IGNORE_INDEX)
        at = name_start(tokenizer, ids, start, opening)
        if at is not None:  # None: the name was cut by --max_length
            labels = [IGNORE_INDEX] * (at + 1)
            labels[start], labels[at] = ids[start], ids[at]
            out.append((ids[:at + 1], labels))
    return out


def ballast_guards(files: list[str], n_ballast: int, train_rows: list[tuple[list[int], list[int]]], tokenizer, data,
                   seed: int) -> tuple[list[tuple[list[int], list[int]]], dict[str, list[str]]]:
    """keel sft's guard rows, GUARD_ROWS per ballast row, and the self-introductions they draw from: built-in
    prompts that the ballast files do not ask, under the ballast's system prompts (data: the run's DataArgs)."""
    from keel.ballast import model_mix, spare_conversations
    from keel.data.formats import load_records

    used = {m["content"] for f in files for r in load_records(f) for m in r["messages"] if m["role"] == "user"}
    convs = spare_conversations(used, GUARD_ROWS * n_ballast, data.system, seed,
                                model_mix(data.system, tokenizer) if data.ballast_system_mix else None)
    intros = self_intros(train_rows, tokenizer, data.model_name)
    return guard_rows(convs, tokenizer, intros, data.model_name, seed, data.max_length), intros


def soft_token_loss(logits: torch.Tensor, tgt: torch.Tensor, soft: SoftTargets) -> torch.Tensor:
    """Summed loss over the learned positions: cross-entropy on `tgt` where soft.hard says (default: where the mask
    is off), where the mask is on the KL divergence from the teacher's top-k + rest distribution to the model's,
    coarsened the same way, and at guard positions -log(1 - q(token)), the unlikelihood of the token; each position's
    loss times soft.weight there, if given. logits (K, V), tgt (K,)."""
    mask, ids, p = (x.to(logits.device) for x in soft[:3])
    hard_at = ~mask if soft.hard is None else soft.hard.to(logits.device)
    logq = torch.log_softmax(logits.float(), -1)                                   # (K, V)
    zeros = torch.zeros(len(tgt), device=logits.device)                            # (K,)
    # Each term as a (K,) vector, 0 outside the positions it covers, so a weight can apply per position.
    per = zeros.masked_scatter(hard_at, -logq[hard_at].gather(1, tgt[hard_at, None]).squeeze(1))
    if soft.guard is not None:
        at = soft.guard.to(logits.device)
        logq_at = logq[at].gather(1, tgt[at, None]).squeeze(1)
        # -log(1 - q) = -log(-expm1(log q)); log q is kept below 0 so the log stays finite
        per = per + zeros.masked_scatter(at, -torch.log(-torch.expm1(logq_at.clamp(max=-1e-6))))
    lq = logq[mask]                                                                # (S, V)
    lq_top = lq.gather(1, ids)                                                     # (S, k)
    # log q(rest) = logsumexp over the tokens outside the top k: stable where the top k hold nearly all the mass.
    lq_rest = lq.scatter(1, ids, float("-inf")).logsumexp(1)                       # (S,)
    p_rest = (1 - p.sum(1)).clamp_min(0)                                           # (S,)
    kl = (torch.special.xlogy(p, p) - p * lq_top).sum(1)                           # (S,)
    if ids.shape[1] < logits.shape[-1]:  # with the whole vocabulary in the top k there is no rest
        kl = kl + torch.special.xlogy(p_rest, p_rest) - p_rest * lq_rest
    per = per + zeros.masked_scatter(mask, kl)
    return (per * soft.weight.to(per.device)).sum() if soft.weight is not None else per.sum()
