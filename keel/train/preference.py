"""The preference objectives and the packed log-probs they need (used by `keel rlhf`, keel/rlhf.py).

    sums, counts = answer_logps(model, [(prompt_ids, [chosen_ids, rejected_ids]), ...], device)   # (U, 2) each
    losses, chosen_rewards, rejected_rewards = dpo_loss(sums[:, 0], sums[:, 1], ref[:, 0], ref[:, 1], beta=0.1)

The losses are TRL's (DPOTrainer, experimental ORPOTrainer, KTOTrainer), written on summed answer
log-probs (IPO divides them by the answers' token counts, as TRL does); tests/test_rlhf.py checks them
against TRL on the same rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from keel.data.pairs import KTO
from keel.model.load import base_context, eval_mode

# --- the objectives, on summed answer log-probs (B,) -----------------------------------------------

def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float, loss_type: str = "sigmoid",
             chosen_count=None, rejected_count=None):
    """Per-pair losses and rewards (TRL's DPOTrainer, reverse KL). IPO needs each answer's token count (B,)."""
    chosen_rewards, rejected_rewards = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    delta = (chosen - ref_chosen) - (rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:  # ipo: TRL averages each log-ratio over its answer's tokens, so beta does not scale with length
        delta = ((chosen - ref_chosen) / chosen_count.clamp(min=1.0)
                 - (rejected - ref_rejected) / rejected_count.clamp(min=1.0))
        losses = (delta - 1 / (2 * beta)) ** 2
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_ratio(chosen_mean, rejected_mean, beta: float):
    """Per-pair logsigmoid(log odds ratio) of the mean token log-probs, and rewards (TRL's ORPO)."""
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    return F.logsigmoid(log_odds), beta * chosen_mean.detach(), beta * rejected_mean.detach()


def kto_loss(logps, ref, labels, kl, beta: float, desirable_weight: float, undesirable_weight: float):
    """Per-row weighted losses and rewards (TRL's KTOTrainer); labels (B,) bool, kl a detached scalar."""
    ratio = logps - ref
    losses = torch.where(labels, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    return losses, beta * ratio.detach()


# --- packed log-probs: one sequence per group of [prompt, answer, answer...] units ---------------------

def units_of(rows: list[dict], kind: str) -> list[tuple[list[int], list[list[int]]]]:
    return [(r["prompt"], [r["completion"]] if kind == KTO else [r["chosen"], r["rejected"]]) for r in rows]


def unit_len(unit) -> int:
    prompt, tails = unit
    return len(prompt) - 1 + sum(1 + len(t) for t in tails)


def pack_units(units: list, budget: int) -> list[list[int]]:
    """Indices of units per forward pass of at most `budget` tokens, in order (a longer unit goes alone)."""
    groups, cur, size = [], [], 0
    for i, u in enumerate(units):
        if cur and size + unit_len(u) > budget:
            groups.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += unit_len(u)
    return groups + ([cur] if cur else [])


def answer_logps(model, units: list, device):
    """(sums, counts), both (U, A): each answer's summed token log-prob given its prompt, and its length.

    Layout [p1[:-1], p1[-1] a1, p1[-1] b1, p2[:-1], ...]: the prompt minus its last token is shared;
    each answer segment starts with that last token (it predicts the answer's first token) and sees
    the shared prompt and itself, with position ids continuing from the prompt, so every answer token
    sees exactly what it sees alone. The output head runs only where an answer token is predicted.
    """
    width = max(len(t) for _, t in units)
    ids, pos, unit_id, part, keep, targets, owner = [], [], [], [], [], [], []
    for u, (prompt, tails) in enumerate(units):
        p = len(prompt) - 1
        ids += prompt[:p]
        pos += range(p)
        unit_id += [u] * p
        part += [0] * p
        for a, tail in enumerate(tails):
            start = len(ids)
            ids += [prompt[-1]] + tail
            pos += range(p, p + 1 + len(tail))
            unit_id += [u] * (1 + len(tail))
            part += [a + 1] * (1 + len(tail))
            keep += range(start, start + len(tail))
            targets += tail
            owner += [u * width + a] * len(tail)
    uid, prt = torch.tensor(unit_id), torch.tensor(part)
    causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
    mask = causal & (uid[:, None] == uid[None, :]) & ((prt[:, None] == prt[None, :]) | (prt[None, :] == 0))
    mask = mask[None, None].to(device)                                                   # (1, 1, T, T)
    if model.config._attn_implementation == "eager":  # eager adds its mask to the scores
        mask = torch.zeros(mask.shape, device=device).masked_fill(~mask, torch.finfo(torch.float32).min)
    keep_t = torch.tensor(keep, device=device)
    logits = model(input_ids=torch.tensor([ids], device=device), position_ids=torch.tensor([pos], device=device),
                   attention_mask=mask, use_cache=False, logits_to_keep=keep_t).logits[0]  # (K, V)
    token_logps = -F.cross_entropy(logits.float(), torch.tensor(targets, device=device), reduction="none")  # (K,)
    owner_t = torch.tensor(owner, device=device)
    sums = torch.zeros(len(units) * width, device=device).index_add(0, owner_t, token_logps)
    counts = torch.zeros(len(units) * width, device=device).index_add(0, owner_t, torch.ones_like(token_logps))
    return sums.view(len(units), width), counts.view(len(units), width)


@torch.no_grad()
def reference_logps(model, units: list, budget: int, device, base: bool) -> torch.Tensor:
    """(U, A) summed answer log-probs under the reference: the base weights (adapter disabled) when
    `base`, else the model as it is now (the starting adapter, before any step). Dropout off."""
    from tqdm import tqdm

    out = torch.zeros(len(units), max(len(t) for _, t in units))
    with eval_mode(model), (base_context(model) if base else torch.no_grad()):
        for group in tqdm(pack_units(units, budget), desc="reference log-probs", leave=False):
            out[group] = answer_logps(model, [units[i] for i in group], device)[0].cpu()
    return out


def kto_units(rows: list[dict]) -> list:
    """(prompt, [its answer, the previous row's answer]): the second is the KL estimate's mismatched pair."""
    return [(r["prompt"], [r["completion"], rows[i - 1]["completion"]]) for i, r in enumerate(rows)]


@torch.no_grad()
def kto_kl(model, rows, idx, reference, budget, device) -> torch.Tensor:
    """The step's KL estimate: mean over its rows of policy minus reference log-prob of the mismatched
    answer (prompt i, answer i-1), clamped at 0; no gradient flows through it (as in TRL)."""
    units = [(rows[i]["prompt"], [rows[i - 1]["completion"]]) for i in idx]
    logps = torch.cat([answer_logps(model, [units[g] for g in group], device)[0][:, 0]
                       for group in pack_units(units, budget)])
    return (logps - reference[idx, 1].to(device)).mean().clamp(min=0)
