"""The identity robustness matrix and leakage at scale.

    ok, shown = template_view(tok)                      # how "no system turn" renders, or None
    cells = build_cells(sets, ident, none_ok=ok is not None)
    scores, samples, details = run_matrix(model, tok, cells, ident, gen)
    scores["identity_robustness"]   # the lowest cell: the identity under its worst condition
    scores, samples, details = run_leakage(model, tok, sets, ident, gen)

A cell is one condition in one language (the question's): every held-out identity question asked
under that condition. Conditions:
- system prompt (first turn): `train` (the training one; the template's default when the adapter
  was trained without one), `default` (no system message: the template decides), `none` (no system
  turn at all: an empty system message, rendered by keel/chat.py without the turn, as training renders it), and every prompt of
  system_prompts.jsonl (`helpful` = the seeds' 'You are a helpful assistant.', personas, Chinese ones)
  plus --system_prompts;
- turn depth: the question after 1 and after 4 ordinary exchanges, under the training prompt;
- reversal (the name is given, "Who made NAME?") and pressure (the user insists on an old
  identity), under the training prompt.
All cells' conversations go through one batched generation (sorted by length) per model.
"""

from __future__ import annotations

from dataclasses import dataclass

from keel.core.text import for_lang
from keel.evals.scoring import Identity, is_identity_hit, is_leak, is_reversal_hit
from keel.evals.sets import LANGS, ProbeSets
from keel.model.generate import GenerateArgs, generate_batch
from keel.model.template import system_turn_cut, template_text

# A system message with empty content renders with no system turn at all (keel/chat.py, as in ms-swift):
# the same rendering training gives identity rows of the "none" condition.
NO_SYSTEM = ""
DEPTHS = (1, 4)


def template_view(tok, question: str = "Who are you?") -> tuple[object | None, dict]:
    """(tok, or None when the template cannot render a conversation without a system turn; what the
    default and "no system turn" render as, and why), for the report."""
    user = [{"role": "user", "content": question}]
    default = template_text(tok, user, add_generation_prompt=True)
    cut = system_turn_cut(tok, user, add_generation_prompt=True)
    if cut is None:
        return None, {"default": default, "none": None,
                      "note": "the template cannot render a conversation without a system turn; cell 'none' skipped"}
    none = template_text(tok, [{"role": "system", "content": NO_SYSTEM}, *user], add_generation_prompt=True)
    note = ("the template has no system role: default is no system turn" if not cut[1] else
            "the template adds no system turn of its own: default and none are the same prompt" if none == default else "")
    return tok, {"default": default, "none": none, "note": note}


@dataclass
class Cell:
    name: str                     # "sys:helpful", "turn:after_4", "reversal", "pressure"
    lang: str
    items: list[tuple]            # (question, conversation, rule); rule: identity | author | self


def system_conditions(sets: ProbeSets, ident: Identity, none_ok: bool, only=None) -> dict:
    """Condition name -> system message content (None: leave it to the template; NO_SYSTEM: none)."""
    conds = {"train": ident.system}
    if ident.system is not None:
        # Trained with a prompt of its own, the template's default is one more condition; trained
        # without one, the default *is* the training prompt and is asked once, as sys:train.
        conds["default"] = None
    if none_ok:
        conds["none"] = NO_SYSTEM
    conds.update(sets.systems)
    return {k: v for k, v in conds.items() if only is None or k in only}


def _conversation(system, turns: list[dict]) -> list[dict]:
    return turns if system is None else [{"role": "system", "content": system}, *turns]


def _history(sets: ProbeSets, lang: str, depth: int) -> list[dict]:
    turns = []
    for ex in sets.exchanges[lang][:depth]:
        turns += [{"role": "user", "content": ex.query}, {"role": "assistant", "content": ex.response}]
    return turns


def build_cells(sets: ProbeSets, ident: Identity, none_ok: bool = True, systems=None, depths=DEPTHS,
                extras=("reversal", "pressure"), per_lang: int | None = None) -> list[Cell]:
    """Every cell of the matrix (or the slice asked for: some systems, depths, extras, the first per_lang questions
    of every cell)."""
    cells = []
    for lang in LANGS:
        questions = [p.query for p in sets.identity if p.lang == lang][:per_lang]
        if not questions:
            continue
        for cond, system in system_conditions(sets, ident, none_ok, systems).items():
            cells.append(Cell(f"sys:{cond}", lang, [(q, _conversation(system, [{"role": "user", "content": q}]), "identity")
                                                     for q in questions]))
        for depth in depths:
            history = _history(sets, lang, depth)
            if len(history) == 2 * depth:  # a set with fewer exchanges has no cell that deep
                cells.append(Cell(f"turn:after_{depth}", lang, [
                    (q, _conversation(ident.system, [*history, {"role": "user", "content": q}]), "identity")
                    for q in questions]))
        if "reversal" in extras and ident.names:
            name = for_lang(ident.names, lang)
            rows = [(p.query.replace("{{NAME}}", name), p.expect) for p in sets.reversal if p.lang == lang][:per_lang]
            cells.append(Cell("reversal", lang, [(q, _conversation(ident.system, [{"role": "user", "content": q}]), rule)
                                                 for q, rule in rows]))
        if "pressure" in extras:
            pressure = [p.query for p in sets.pressure if p.lang == lang][:per_lang]
            cells.append(Cell("pressure", lang, [(q, _conversation(ident.system, [{"role": "user", "content": q}]), "identity")
                                                 for q in pressure]))
    return [c for c in cells if c.items]


def _generate(model, tok, convs, gen, batch_size, step):
    return generate_batch(model, tok, convs, gen, batch_size=batch_size, progress=step)


def run_matrix(model, tok, cells: list[Cell], ident: Identity, gen: GenerateArgs, batch_size: int = 32,
               step=None) -> tuple[dict, list, dict]:
    """Hit rate per cell, the headline figures, the answers, and per-cell details for the report."""
    if not cells:
        return {}, [], {}
    convs = [conv for c in cells for _, conv, _ in c.items]
    answers = iter(_generate(model, tok, convs, gen, batch_size, step))
    old = ident.old_words()
    scores, samples, table = {}, [], {}
    for c in cells:
        hits = []
        for q, _, rule in c.items:
            a = next(answers)
            hit = (is_identity_hit(a, ident.names, ident.authors, old) if rule == "identity"
                   else is_reversal_hit(a, rule, ident.names, ident.authors, old))
            hits.append(hit)
            samples.append({"task": "identity", "cell": c.name, "lang": c.lang, "rule": rule, "q": q, "a": a, "hit": hit})
        rate = round(sum(hits) / len(hits), 3)
        scores[f"identity_{c.lang}_{c.name.replace(':', '_')}"] = rate
        table.setdefault(c.name, {})[c.lang] = {"hits": sum(hits), "asked": len(hits), "rate": rate}
    rates = {(c.name, c.lang): table[c.name][c.lang]["rate"] for c in cells}
    for lang in LANGS:
        per = [r for (_, lng), r in rates.items() if lng == lang]
        if per:
            scores[f"identity_{lang}"] = round(sum(per) / len(per), 3)
    worst = min(rates, key=rates.get)
    scores["identity_robustness"] = rates[worst]
    scores["identity_mean"] = round(sum(rates.values()) / len(rates), 3)
    return scores, samples, {"cells": table, "worst_cell": f"{worst[0]} / {worst[1]}"}


def leakage_conditions(sets: ProbeSets, ident: Identity, lang: str) -> dict:
    """The training prompt and one other: the seeds' helpful prompt in the prompt's language."""
    other = "helpful_zh" if lang == "zh" and "helpful_zh" in sets.systems else "helpful"
    return {"train": ident.system, other: sets.systems.get(other, "You are a helpful assistant.")}


def run_leakage(model, tok, sets: ProbeSets, ident: Identity, gen: GenerateArgs, batch_size: int = 32, step=None,
                probes=None, conditions: str = "both") -> tuple[dict, list, dict]:
    """Share of ordinary answers (and answers about other AIs) that name the new identity; lower is better."""
    probes = probes if probes is not None else [("ordinary", p) for p in sets.leakage] + [("contrast", p) for p in sets.contrast]
    asked = []
    for kind, p in probes:
        conds = leakage_conditions(sets, ident, p.lang)
        for cond, system in list(conds.items())[:1 if conditions == "train" else 2]:
            asked.append((kind, cond, p, _conversation(system, [{"role": "user", "content": p.query}])))
    answers = _generate(model, tok, [a[3] for a in asked], gen, batch_size, step)
    counts: dict[str, list[int]] = {}
    samples = []
    for (kind, cond, p, _), a in zip(asked, answers):
        leak = is_leak(a, ident.names, ident.authors)
        # per language, and per language and system prompt (the training one or the other)
        for key in (f"{kind}/{p.lang}", f"{kind}/{p.lang}/{'train' if cond == 'train' else 'other'}"):
            counts.setdefault(key, [0, 0])
            counts[key][0] += leak
            counts[key][1] += 1
        samples.append({"task": "leakage", "set": kind, "system": cond, "lang": p.lang, "domain": p.domain,
                        "q": p.query, "a": a, "leak": leak})

    def share(keys):
        leaks, total = (sum(counts.get(k, [0, 0])[i] for k in keys) for i in (0, 1))
        return round(leaks / total, 3) if total else None

    scores = {"leakage": share(["ordinary/en", "ordinary/zh"]), "leakage_en": share(["ordinary/en"]),
              "leakage_zh": share(["ordinary/zh"]), "leakage_contrast": share(["contrast/en", "contrast/zh"])}
    return {k: v for k, v in scores.items() if v is not None}, samples, {"counts": counts}
