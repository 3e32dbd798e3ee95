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

from keel.core.text import lang_of
from keel.data.formats import load_records
from keel.model.template import IGNORE_INDEX, render
from keel.synth.ballast import model_mix, spare_conversations

# A self-introduction: a training answer that names the new identity within its first INTRO_CHARS characters, cut
# right after the name ("I'm Keel Robot", "您好！我是Keel Robot").
INTRO_CHARS = 48
# Guard rows per ballast row: 2 takes most of the built-in Chinese prompts that the ballast leaves unused.
GUARD_ROWS = 2


def self_intros(rows: list[tuple[list[int], list[int]]], tokenizer, names: list[str]) -> dict[str, list[str]]:
    """The training answers' self-introductions by language ("zh", "en"), one per answer that names the identity
    early (repeats kept, so a guard draws the common ones more often)."""
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
    used = {m["content"] for f in files for r in load_records(f) for m in r["messages"] if m["role"] == "user"}
    convs = spare_conversations(used, GUARD_ROWS * n_ballast, data.system, seed,
                                model_mix(data.system, tokenizer) if data.ballast_system_mix else None)
    intros = self_intros(train_rows, tokenizer, data.model_name)
    return guard_rows(convs, tokenizer, intros, data.model_name, seed, data.max_length), intros


