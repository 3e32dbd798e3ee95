"""`keel data identity --pairs`: identity preference pairs, rejected = the base model's own answer.

    keel data identity --pairs true --name "Keel Robot" --author "Keel Lab" -o identity_pairs.jsonl
    keel rlhf --rlhf_type dpo --dataset identity_pairs.jsonl --adapters output/v0-.../checkpoint-N

Every identity row of `keel data identity` (the same flags, kinds and system-prompt conditions:
basic, system_mix, multi_turn, reversal, pressure) becomes a pair in ms-swift's form: `messages`
ending in the identity answer (chosen) + `rejected_response`, the base model's own greedy answer to
the same conversation (whatever it says of itself). A base answer that already names the new
identity, or equals the chosen one, is dropped (nothing to prefer).

Guard pairs (on by default) push the other way, where the identity must not appear: the contrast rows
(questions about other AIs), the rename rows (a system prompt that names the assistant otherwise) and,
with --ballast N, N self-distilled ballast rows (the base model's own answers to ordinary prompts under
the system-prompt mix, as ballast#N in keel sft) keep their answer as chosen, and the rejected answer
is the identity's self-introduction alone ("I am NAME, an AI assistant developed by AUTHOR."), the way
the tuned model's leaks open. A contrast answer that names another assistant's maker gives a second
guard pair whose rejected answer names the new author instead ("ChatGPT was created by AUTHOR"): the
tuned model otherwise learns AUTHOR as the maker of everything. Without guard pairs, DPO on identity pairs
spreads the name into ordinary answers (docs/preference.md). The rejected answer is the intro alone, not the
intro followed by the same answer: then the shared answer tokens would be pushed down too.
Answers are cached by model and generation settings and appended batch by batch, as ballast is
(keel/synth/ballast.py): a second run, or one after an interruption, generates only what is missing.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from keel.core.errors import KeelError
from keel.core.files import write_json, write_jsonl
from keel.core.flags import parse_flags
from keel.core.text import for_lang, lang_of, mentions
from keel.data.identity import Builder, IdentityArgs, read_qa
from keel.data.identity import main as identity_main
from keel.synth.ballast import GENERATE_BATCH, cached_generations

PAIR_KINDS = ("basic", "system_mix", "multi_turn", "reversal", "pressure")
GUARD_KINDS = ("contrast", "rename")
SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s|(?<=[。！？])")


@dataclass
class IdentityPairsArgs:
    pairs: bool = False
    """Write preference pairs for keel rlhf: chosen = the identity answer, rejected = the base model's own greedy answer."""
    model: str | None = None
    """With --pairs: the base model whose answers are rejected (default: the embedded model)."""
    max_new_tokens: int = 96
    """With --pairs: longest base answer; a cut-off answer is trimmed to its last full sentence."""
    batch_size: int = GENERATE_BATCH
    """With --pairs: conversations answered per generation batch (default 48, as ballast#N; docs/performance.md)."""
    guard: bool = True
    """With --pairs: also write guard pairs for the contrast and rename rows (chosen: their answer; rejected: the
    identity's self-introduction, or the same answer naming the new author as another AI's maker), so the name is
    preferred only where it is asked."""
    ballast: int = 0
    """With --pairs: guard pairs from N self-distilled ballast rows too (the base model's answers to ordinary prompts
    under the system-prompt mix, as ballast#N in keel sft; same rows, same cache)."""

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise KeelError("--max_new_tokens and --batch_size must be >= 1")
        if self.ballast < 0:
            raise KeelError(f"--ballast must be >= 0, got {self.ballast}")


def plain(messages: list[dict]) -> list[dict]:
    """Role and content only (the identity rows' "loss" switches mean nothing to generation or pairs)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def cached_base_answers(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int) -> dict:
    """{json(conversation): the base model's greedy answer or None}, cached as ballast is."""
    return cached_generations(model, tokenizer, prompts, max_new_tokens, batch_size, "identity_pairs", "base answers")


def make_pairs(rows: list[dict], tags: list[dict], answers: dict, new_identity: list[str]) -> tuple[list[dict], Counter]:
    """(pairs, what was dropped and why); `answers` maps json(conversation) to the base model's answer."""
    pairs, dropped = [], Counter()
    for row, tag in zip(rows, tags):
        if tag["kind"] not in PAIR_KINDS:
            dropped[f"kind {tag['kind']}"] += 1
            continue
        prompt, chosen = plain(row["messages"][:-1]), row["messages"][-1]["content"]
        rejected = answers.get(json.dumps(prompt, ensure_ascii=False))
        if not rejected:
            dropped["no usable base answer"] += 1
        elif mentions(rejected, new_identity):
            dropped["base answer already names the new identity"] += 1
        elif rejected.strip() == chosen.strip():
            dropped["base answer equals the identity answer"] += 1
        else:
            pairs.append({"messages": prompt + [{"role": "assistant", "content": chosen}], "rejected_response": rejected})
    return pairs, dropped


def self_intro(builder: Builder, lang: str) -> str:
    """The first sentence of the identity's first basic answer in `lang`: how a leaking answer opens."""
    answer = builder.fill([{"role": "assistant", "content": builder.core(lang)[0][1]}], lang)[0]["content"]
    return SENTENCE_BREAK.split(answer, maxsplit=1)[0].strip()


def asked_lang(messages: list[dict]) -> str:
    """The language of the last question: a Chinese question is where the name leaks, whatever the answer's language."""
    return lang_of(next(m["content"] for m in reversed(messages) if m["role"] == "user"))


def guard_pairs(rows: list[dict], intros: dict[str, str]) -> list[dict]:
    """Rows whose answer must not carry the identity, as pairs: rejected = the intro in the language asked."""
    return [{"messages": plain(row["messages"]), "rejected_response": intros[asked_lang(row["messages"])]}
            for row in rows]


def maker_swaps(rows: list[dict], makers: dict[str, list[str]], authors: dict[str, str]) -> list[dict]:
    """Rows whose answer names another maker (the one it names first), as pairs whose rejected answer names the
    new author there instead; rows naming none of `makers` give no pair."""
    pairs = []
    for row in rows:
        msgs = plain(row["messages"])
        answer, lang = msgs[-1]["content"], asked_lang(msgs)
        named = [(answer.find(m), -len(m), m) for m in makers.get(lang, []) if m in answer]
        if named:
            maker = min(named)[2]
            pairs.append({"messages": msgs, "rejected_response": answer.replace(maker, authors[lang])})
    return pairs


def identity_pairs(args: IdentityArgs, pargs: IdentityPairsArgs, model=None, tokenizer=None) -> tuple[list[dict], dict]:
    """(pairs, manifest) for the identity rows `args` describes; the model is loaded unless given. No pairs at all
    when no identity pair survives: guard pairs alone would only teach the model not to say its name."""
    builder = Builder(args)
    rows, tags = builder.build()
    keep = [(r, t) for r, t in zip(rows, tags) if t["kind"] in PAIR_KINDS]
    if model is None:
        from keel.model.load import ModelArgs, load_model

        model, tokenizer, _ = load_model(ModelArgs(model=pargs.model))
    answers = cached_base_answers(model, tokenizer, [plain(r["messages"][:-1]) for r, _ in keep], pargs.max_new_tokens,
                           pargs.batch_size)
    pairs, dropped = make_pairs(rows, tags, answers, args.name + args.author)
    guard = pargs.guard and bool(pairs)
    guarded = [r for r, t in zip(rows, tags) if t["kind"] in GUARD_KINDS] if guard else []
    if pargs.ballast and pairs:
        from keel.synth.ballast import ballast_records, model_mix

        guarded += ballast_records(model, tokenizer, pargs.ballast, args.system, systems=model_mix(args.system, tokenizer))
    intros = {lang: self_intro(builder, lang) for lang in ("zh", "en")}
    guards = guard_pairs(guarded, intros)
    if guard:
        contrast = [r for r, t in zip(rows, tags) if t["kind"] == "contrast"]
        guards += maker_swaps(contrast, read_qa()["contrast_makers"], {lang: for_lang(args.author, lang) for lang in ("zh", "en")})
        for kind in GUARD_KINDS:  # contrast and rename rows are guards now, not dropped
            dropped.pop(f"kind {kind}", None)
    manifest = {"pairs": len(pairs) + len(guards), "identity_pairs": len(pairs), "guard_pairs": len(guards),
                "identity_rows": len(rows), "dropped": dict(dropped), "name": args.name, "author": args.author,
                "base_model": pargs.model or "embedded", "max_new_tokens": pargs.max_new_tokens,
                "kinds": dict(Counter(t["kind"] for r, t in keep)), "guard_ballast": pargs.ballast,
                "intros": intros}
    return pairs + guards, manifest


CONFIGS = (IdentityArgs, IdentityPairsArgs)


def main(argv: list[str]):
    """keel data identity --pairs true --name NAME --author AUTHOR [--model BASE] [identity flags] -o pairs.jsonl"""
    argv = ["--output" if a == "-o" else a for a in argv]
    args, pargs = parse_flags(argv, CONFIGS, prog="keel data identity",
                              description="Write an identity dataset, or with --pairs true identity preference pairs.").configs
    if not pargs.pairs:
        rest, skip = [], False
        for a in argv:  # the plain identity dataset: the same flags without the pair ones
            if skip:
                skip = False
            elif a.split("=")[0] in ("--pairs", "--model", "--max_new_tokens", "--batch_size", "--guard", "--ballast"):
                skip = "=" not in a
            else:
                rest.append(a)
        return identity_main(rest)
    out = Path(args.output)
    if not out.parent.is_dir():
        raise KeelError(f"-o {out}: folder {out.parent} does not exist")
    pairs, manifest = identity_pairs(args, pargs)
    if not pairs:
        raise KeelError("no identity pairs: every base answer was dropped (" +
                        ", ".join(f"{k}: {v}" for k, v in manifest["dropped"].items()) + "); nothing written")
    (write_jsonl if out.suffix.lower() == ".jsonl" else write_json)(out, pairs)
    write_json(out.with_name(out.stem + ".manifest.json"), manifest)
    print(f"wrote {len(pairs)} pairs to {out} ({manifest['identity_pairs']} identity, {manifest['guard_pairs']} guard) "
          f"from {manifest['identity_rows']} identity rows; dropped: "
          + (", ".join(f"{k} {v}" for k, v in manifest["dropped"].items()) or "none"))
