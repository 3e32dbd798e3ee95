"""Losses on packed micro-batches: token cross-entropy, and the KL/unlikelihood terms of soft targets."""

from __future__ import annotations

from typing import NamedTuple

import torch

from keel.model.template import IGNORE_INDEX


def token_loss(model, batch: dict, device, labelled_only: bool = True, soft=None):
    """Summed cross-entropy over label tokens, the number of label tokens, and correct predictions.

    soft: the base model's distributions for some of those positions (keel/distill.py), learned by KL there.
    """
    logits, tgt = labelled_logits(model, batch, device, labelled_only)
    if soft is not None:
        loss = soft_token_loss(logits, tgt, soft)
    else:
        loss = torch.nn.functional.cross_entropy(logits.float(), tgt, reduction="sum")
    right = logits.argmax(-1) == tgt
    if soft is not None and soft.guard is not None:  # a guard row's tokens are what the model should not say
        right &= ~soft.guard.to(right.device)
    return loss, tgt.numel(), right.sum().item()


def labelled_logits(model, batch: dict, device, labelled_only: bool = True):
    """(logits (K, V), targets (K,)) at the K positions whose next token is learned, row by row in order.

    With labelled_only the output head runs only there: most positions are prompt, and the head
    (vocab x hidden) is a large share of a small model's compute.
    """
    ids = batch["input_ids"].to(device)                     # (B, T)
    labels = batch["labels"].to(device)                     # (B, T)
    targets = labels[:, 1:]                                 # (B, T-1): token t+1 is predicted at t
    kwargs = {k: batch[k].to(device) for k in ("position_ids", "attention_mask") if k in batch}
    if kwargs.get("attention_mask") is not None and kwargs["attention_mask"].dim() == 4 \
            and model.config._attn_implementation == "eager":
        # The shared-prefix mask is boolean (what SDPA takes); eager attention adds its mask to the scores.
        kwargs["attention_mask"] = torch.zeros(kwargs["attention_mask"].shape, device=device).masked_fill(
            ~kwargs["attention_mask"], torch.finfo(torch.float32).min)
    if labelled_only and ids.shape[0] == 1:
        keep = (targets[0] != IGNORE_INDEX).nonzero().squeeze(1)      # (K,)
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep, **kwargs).logits[0]  # (K, V)
        tgt = targets[0, keep]
    else:
        logits = model(input_ids=ids, use_cache=False, **kwargs).logits[:, :-1]  # (B, T-1, V)
        keep = targets != IGNORE_INDEX
        logits, tgt = logits[keep], targets[keep]
    return logits, tgt


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
