"""Identity answers in the base model's own voice (context distillation): `keel recipe identity --identity_answers self`.

The base model is told who it is (SELF_SYSTEM: "You are NAME, an AI assistant developed by AUTHOR.") in place of
each identity row's system prompt and answers the row's question itself, greedily. An answer that states the
identity replaces Keel's written one; the row keeps its own system prompt, so the identity is learned without the
prompt that told it, in words the base model already favours (the reason self-distilled ballast drifts little).
What "states the identity" means here:
- the answer is whole (not cut off without a full sentence) and names the new identity without claiming an old one
  (the eval's identity rule, keel/evals/identity.py);
- it is in the written answer's language, and claims (names, and does not deny) what the written answer names: the
  name, the maker or both, so a row about the maker keeps teaching it, and denies neither ("No, NAME is not made by
  AUTHOR." is out, whatever it says of AUTHOR next);
- it does not recite its system prompt ("You are NAME..." / "你是NAME..."): a small model often copies the prompt,
  which says who *you* are, not who it is.
Only rows that teach the identity are asked (basic, system_mix, multi_turn, reversal, pressure); contrast and
rename rows keep their written answers, which must not carry it. Answers are cached as ballast is
(keel/synth/ballast.py). The embedded 135M model states its identity in few answers (docs/recipe.md); the path is for
larger models.
"""

from __future__ import annotations

import json
import re
from collections import Counter

from keel.core.text import for_lang, lang_of, mentions
from keel.evals.scoring import claims, denies, is_identity_hit
from keel.synth.ballast import GENERATE_BATCH, cached_generations
from keel.synth.identity_pairs import PAIR_KINDS, plain

SELF_SYSTEM = {"en": "You are {name}, an AI assistant developed by {author}.",
               "zh": "你是{name}，由{author}开发的人工智能助手。"}
RECITES = re.compile(r"^\W*(you are|you're|你是|您是)", re.IGNORECASE)


def self_prompt(messages: list[dict], system: str) -> list[dict]:
    """The row's conversation up to its last answer, its system prompt (if any) replaced by `system`."""
    turns = plain([m for m in messages[:-1] if m["role"] != "system"])
    return [{"role": "system", "content": system}] + turns


def verdict(answer: str | None, written: str, names: list[str], authors: list[str], system: str) -> str:
    """'kept', or why the base model's answer cannot replace the written one."""
    if not answer:
        return "cut off"
    if not is_identity_hit(answer, names, authors):
        return "no identity, or an old one"
    if lang_of(answer) != lang_of(written):
        return "another language"
    said = claims(answer, [*names, *authors], third_person=True)
    if any(mentions(written, words) and not any(w in said for w in words) for words in (names, authors)):
        return "misses the name or maker the written answer gives"
    if denies(answer, [*names, *authors]):  # "No, Keel is not made by Acme. Acme is a company..."
        return "denies the name or maker"
    if RECITES.match(answer) or system in answer:
        return "recites its system prompt"
    return "kept"


def self_answers(rows: list[dict], tags: list[dict], model, tokenizer, names: list[str], authors: list[str],
                 max_new_tokens: int = 96, batch_size: int = GENERATE_BATCH) -> tuple[list[dict], dict]:
    """(rows with the base model's kept answers in place of the written ones, manifest: counts per verdict and kind)."""
    asked = {}
    for i, (row, tag) in enumerate(zip(rows, tags)):
        if tag["kind"] in PAIR_KINDS:
            system = SELF_SYSTEM[tag["lang"]].format(name=for_lang(names, tag["lang"]), author=for_lang(authors, tag["lang"]))
            asked[i] = self_prompt(row["messages"], system)
    answers = cached_generations(model, tokenizer, list(asked.values()), max_new_tokens, batch_size, "self_answers",
                                 "identity answers in the base model's voice")
    out, verdicts, kept_kinds = list(rows), Counter(), Counter()
    for i, prompt in asked.items():
        answer = answers.get(json.dumps(prompt, ensure_ascii=False))
        written = rows[i]["messages"][-1]
        v = verdict(answer, written["content"], names, authors, prompt[0]["content"])
        verdicts[v] += 1
        if v == "kept":
            kept_kinds[tags[i]["kind"]] += 1
            out[i] = {**rows[i], "messages": rows[i]["messages"][:-1] + [{**written, "content": answer}]}
    return out, {"asked": len(asked), "kept": verdicts.pop("kept", 0), "kept_by_kind": dict(kept_kinds),
                 "dropped": dict(verdicts)}
