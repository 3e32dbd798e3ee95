"""Preference data for `keel rlhf`: pairs (DPO, ORPO) and labelled answers (KTO), rendered once.

    train, val, manifest = build_pairs(DataArgs(dataset=["pairs.jsonl", "feedback_pairs.jsonl#200"]), tok)
    train[0] == {"prompt": [ids], "chosen": [ids], "rejected": [ids]}        # pairs
    train[0] == {"prompt": [ids], "completion": [ids], "label": True}         # KTO rows

Row formats, detected per row (one kind per file: all pairs or all KTO rows):
- ms-swift: `messages` ending in the chosen assistant turn + `rejected_response`; KTO: `messages` + `label`;
- LLaMA-Factory: `conversations` (sharegpt) or `instruction`/`input` + `chosen`/`rejected`
  (strings or {"from": "gpt", "value": ...}); KTO: `conversations` + `kto_tag`;
- TRL: `prompt` (text or messages) + `chosen`/`rejected` (text or [{"role": "assistant", ...}]);
  KTO: `prompt` + `completion` + `label`.
A `system` field (or a system message) is kept. The prompt is rendered once with the tokenizer's chat
template; chosen and rejected are the tokens each answer adds after it (the closing end-of-turn
token included), so a pair holds its prompt once and the loss sees only the answers.
`#N` / `#P%` mixing, placeholders and the validation split work as in `keel sft` (keel/data/mix.py).
Like the rest of keel/data, this module sees files and a tokenizer, never a model.
"""

from __future__ import annotations

import random
import statistics

from keel.core.errors import KeelError, where
from keel.data.formats import read_rows
from keel.data.mix import DataArgs, fill_placeholders, leftover_placeholder, mix_loaded, parse_spec, resolve_source
from keel.model.template import IGNORE_INDEX, render, with_system

PAIR, KTO = "pair", "kto"
KIND_NAMES = {PAIR: "preference pair (chosen + rejected)", KTO: "KTO row (answer + label)"}
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}


def _str(value, loc: str, name: str) -> str:
    if not isinstance(value, str):
        raise KeelError(f"{loc}: field '{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise KeelError(f"{loc}: field '{name}' is empty")
    return value


def _turns(items, loc: str, name: str) -> list[dict]:
    """A list of {"role"|"from", "content"|"value"} turns -> messages."""
    if not isinstance(items, list) or not items:
        raise KeelError(f"{loc}: field '{name}' must be a non-empty list of turns")
    out = []
    for i, t in enumerate(items):
        if not isinstance(t, dict):
            raise KeelError(f"{loc}: field '{name}' item {i} must be an object")
        role = ROLES.get(t.get("role", t.get("from")))
        if role is None:
            raise KeelError(f"{loc}: {name}[{i}]: unknown role {t.get('role', t.get('from'))!r}")
        content = t.get("content", t.get("value"))
        if not isinstance(content, str):
            raise KeelError(f"{loc}: {name}[{i}]: field 'content' must be a string")
        out.append({"role": role, "content": content})
    return out


def _answer(value, loc: str, name: str) -> str:
    """An answer given as text, as one turn, or as a list of turns ending in the assistant's."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        turns = _turns(value, loc, name)
        if turns[-1]["role"] != "assistant":
            raise KeelError(f"{loc}: field '{name}' must end with an assistant turn")
        value = turns[-1]["content"]
    return _str(value, loc, name)


def _prompt(row: dict, loc: str) -> list[dict]:
    """The conversation before the answer: messages, conversations, prompt or instruction/input."""
    if "prompt" in row:
        prompt = row["prompt"]
        msgs = [{"role": "user", "content": _str(prompt, loc, "prompt")}] if isinstance(prompt, str) \
            else _turns(prompt, loc, "prompt")
    elif "instruction" in row:
        extra = row.get("input") or ""
        msgs = [{"role": "user", "content": _str(row["instruction"], loc, "instruction")
                 + (f"\n{extra}" if isinstance(extra, str) and extra.strip() else "")}]
    else:
        key = "messages" if "messages" in row else "conversations"
        msgs = _turns(row[key], loc, key)
    system = row.get("system")
    if isinstance(system, str) and system and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system}] + msgs
    return msgs


def read_preference(row: dict, loc: str) -> dict:
    """One raw row -> {"kind", "prompt": messages, "chosen", "rejected"} or {"kind", "prompt", "completion", "label"}."""
    has_turns = "messages" in row or "conversations" in row
    if not (has_turns or "prompt" in row or "instruction" in row):
        raise KeelError(f"{loc}: unknown preference format: expected messages, conversations, prompt or instruction "
                        f"(fields found: {', '.join(sorted(row)) or 'none'})")
    label_key = next((k for k in ("label", "kto_tag") if k in row), None)
    if label_key:
        label = row[label_key]
        if not isinstance(label, bool):
            raise KeelError(f"{loc}: field '{label_key}' must be true or false, got {label!r}")
    msgs = _prompt(row, loc)
    if has_turns and "chosen" not in row and "completion" not in row:
        # ms-swift / sharegpt: the conversation ends with the chosen (or the KTO-labelled) answer
        if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
            key = "messages" if "messages" in row else "conversations"
            raise KeelError(f"{loc}: field '{key}' must end with a non-empty assistant turn (the chosen answer)")
        msgs, answer = msgs[:-1], msgs[-1]["content"]
    elif label_key:
        answer = _answer(row.get("completion"), loc, "completion")
    else:
        answer = _answer(row.get("chosen"), loc, "chosen")
    if not msgs or msgs[-1]["role"] != "user":
        raise KeelError(f"{loc}: the conversation before the answer must end with a user turn")
    if label_key:
        return {"kind": KTO, "prompt": msgs, "completion": answer, "label": label}
    swift = "rejected_response" in row or ("messages" in row and "chosen" not in row)
    rejected_key = "rejected_response" if swift else "rejected"
    if rejected_key not in row or row[rejected_key] in (None, ""):
        raise KeelError(f"{loc}: pair without a rejected answer: field '{rejected_key}' is missing or empty "
                        "(a KTO row needs 'label': true/false instead)")
    rejected = _answer(row[rejected_key], loc, rejected_key)
    if rejected.strip() == answer.strip():
        raise KeelError(f"{loc}: field '{rejected_key}': the rejected answer equals the chosen one; nothing to prefer")
    return {"kind": PAIR, "prompt": msgs, "chosen": answer, "rejected": rejected}


def load_preferences(path) -> tuple[str, list[dict]]:
    """(kind, rows) of a file; a row of the other kind is an error naming it."""
    rows = [read_preference(r, where(path, n)) for n, r in enumerate(read_rows(path), 1)]
    kind = rows[0]["kind"]
    for n, r in enumerate(rows, 1):
        if r["kind"] != kind:
            raise KeelError(f"{where(path, n)}: a {KIND_NAMES[r['kind']]} in a file of {KIND_NAMES[kind]}s "
                            "(row 1); one kind per file")
    return kind, rows


def render_answers(tokenizer, prompt: list[dict], answers: list[str], max_length: int):
    """(prompt ids, [answer ids...]) sharing the prompt, or None when the prompt leaves no room for an answer.

    Earlier assistant turns are context (no labels); each answer is the labelled last turn. Answers
    longer than the room after the prompt are cut at the end (TRL's keep_start).
    """
    context = [{k: v for k, v in m.items() if k != "loss"} | ({"loss": False} if m["role"] == "assistant" else {})
               for m in prompt]
    head, tails = None, []
    for text in answers:
        ids, labels = render(tokenizer, context + [{"role": "assistant", "content": text}])
        start = next(i for i, y in enumerate(labels) if y != IGNORE_INDEX)
        if head is None:
            head = ids[:start]
        elif ids[:start] != head:
            raise KeelError("the chat template renders the same prompt differently before two answers; "
                            "Keel cannot share the prompt of a pair for this template")
        tails.append(ids[start:])
    room = max_length - len(head)
    if room < 1:
        return None
    return head, [t[:room] for t in tails]


def tokenize_preferences(rows: list[dict], tokenizer, args: DataArgs, manifest: list[dict]) -> list[dict]:
    """Render each row once (repeats from #N share the result); count rows dropped to --max_length."""
    by_spec = {e["spec"]: e for e in manifest}
    for e in manifest:
        e.update(dropped_too_long=0, lengths=[])
    out, cache = [], {}
    for row in rows:
        key = (row["origin"], row["source"])
        if key not in cache:
            prompt = with_system(row["prompt"], args.system)
            answers = [row["chosen"], row["rejected"]] if row["kind"] == PAIR else [row["completion"]]
            cache[key] = render_answers(tokenizer, prompt, answers, args.max_length)
        item, entry = cache[key], by_spec[row["source"]]
        if item is None:
            entry["dropped_too_long"] += 1
            continue
        head, tails = item
        entry["lengths"].append(len(head) + sum(len(t) for t in tails))
        out.append({"prompt": head, "chosen": tails[0], "rejected": tails[1]} if row["kind"] == PAIR
                   else {"prompt": head, "completion": tails[0], "label": row["label"]})
    for e in manifest:
        lengths = e.pop("lengths")
        e["tokens"] = ({"min": min(lengths), "median": int(statistics.median(lengths)), "max": max(lengths),
                        "total": sum(lengths)} if lengths else None)
    return out


def load_pair_mixture(specs: list[str], args: DataArgs, kind: str | None = None):
    """(kind, rows with their origin, manifest entries); every file must hold the same kind."""
    loaded = []
    for spec in specs:
        source, n, pct = parse_spec(spec)
        path = resolve_source(source, args.data_dir)
        file_kind, rows = load_preferences(path)
        if kind is not None and file_kind != kind:
            raise KeelError(f"--dataset {spec}: {path} holds {KIND_NAMES[file_kind]}s, the other files "
                            f"{KIND_NAMES[kind]}s; one kind per run")
        kind = file_kind
        for i, r in enumerate(rows, 1):
            r["origin"] = (str(path), i)
            r["prompt"] = fill_placeholders(r["prompt"], args.model_name, args.model_author)
            for k in ("chosen", "rejected", "completion"):
                if k in r:
                    r[k] = fill_placeholders([{"role": "assistant", "content": r[k]}], args.model_name,
                                             args.model_author)[0]["content"]
                    left = leftover_placeholder([{"role": "assistant", "content": r[k]}])
                    if left:
                        raise KeelError(f"{path}: row {i}: placeholder {left} left in field '{k}' "
                                        "(pass --model_name and --model_author)")
        loaded.append((spec, path, n, pct, rows))
    out, manifest = mix_loaded(loaded, args.data_seed)
    return kind, out, manifest


def build_pairs(args: DataArgs, tokenizer):
    """(train, val, manifest): rendered pairs or KTO rows, and what was taken (manifest["kind"])."""
    if not args.dataset:
        raise KeelError("--dataset is required (preference pairs, e.g. from keel feedback export --kind pairs)")
    kind, rows, train_manifest = load_pair_mixture(args.dataset, args)
    random.Random(args.data_seed).shuffle(rows)
    val_manifest = []
    if args.val_dataset:
        _, val_rows, val_manifest = load_pair_mixture(args.val_dataset, args, kind)
    else:
        n_val = int(round(len(rows) * args.split_dataset_ratio))
        if args.split_dataset_ratio > 0 and len(rows) >= 2:
            n_val = max(1, n_val)
        held = set(list(dict.fromkeys(r["origin"] for r in rows))[:n_val])  # a repeated row stays on one side
        val_rows = list({r["origin"]: r for r in rows if r["origin"] in held}.values())
        rows = [r for r in rows if r["origin"] not in held]
    train = tokenize_preferences(rows, tokenizer, args, train_manifest)
    if not train:
        raise KeelError("no training rows left: every prompt fills --max_length")
    val = tokenize_preferences(val_rows, tokenizer, args, val_manifest or [dict(e) for e in train_manifest])
    manifest = {"kind": kind, "sources": train_manifest, "val_sources": val_manifest, "train_rows": len(train),
                "val_rows": len(val), "max_length": args.max_length, "system": args.system,
                "data_seed": args.data_seed}
    return train, val, manifest
