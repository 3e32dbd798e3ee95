"""Guard rows (keel sft --ballast_guard W): ordinary prompts that no ballast row uses, each followed by the opening of a
self-introduction from the training answers ("我是" of "我是Keel Robot") and the name's first token.

There the name's first token is learned as unlikely after the opening, -log(1 - q(name | prompt, opening)), and the
first answer token as the base model's distribution (keel/train/teacher.py, keel/train/losses.py), each position
counted W times. Leaks open ordinary answers with the self-introduction on prompts training never saw, so the guards
sit on unseen prompts. Guard rows ride in the same step as a ballast row, so a run's steps and rows are the same
without them. What they do to identity and leakage: docs/experiments/.

    guards, intros = ballast_guards(files, n_ballast, train_rows, tokenizer, data, seed)
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


