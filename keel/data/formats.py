"""Read dataset files into Keel's one record shape: {"messages": [{"role", "content"}, ...]}.

    rows = load_records("self_cognition.json")

Files are JSON arrays, JSONL or CSV. The format is detected per file from its first row:
OpenAI-style `messages`, sharegpt `conversations` (`from`/`value`), alpaca (`instruction`,
`input`, `output`, optional `system`, `history`) or `query`/`response` (optional `history`,
`system`). A row that breaks the detected format is an error naming file, row and field.
Rows are numbered from 1 (the line number in JSONL). In `messages` rows an assistant message may
carry ms-swift's `"loss": false` (kept: the turn is context, without labels), and an explicit empty
system message is kept: no system turn at all (keel/chat.py, as ms-swift renders it), not the template's default.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from keel.core.errors import KeelError, where

ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


def _text(row: dict, key: str, loc: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise KeelError(f"{loc}: field '{key}' is missing")
        return ""
    if not isinstance(value, str):
        raise KeelError(f"{loc}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _history(row: dict, loc: str) -> list[dict]:
    """alpaca / query-response `history`: [[question, answer], ...]."""
    hist = row.get("history") or []
    if not isinstance(hist, list):
        raise KeelError(f"{loc}: field 'history' must be a list of [question, answer] pairs")
    out = []
    for i, pair in enumerate(hist):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise KeelError(f"{loc}: field 'history' item {i} must be a [question, answer] pair of strings")
        out += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return out


def _finish(system: str, turns: list[dict], loc: str, answer_field: str, keep_empty_system: bool = False) -> dict:
    """An empty `system` means none (the template's default applies) unless keep_empty_system."""
    if not turns or turns[-1]["role"] != "assistant" or not turns[-1]["content"].strip():
        raise KeelError(f"{loc}: field '{answer_field}' is empty: the row has no answer to learn")
    if all(m.get("loss") is False for m in turns if m["role"] == "assistant"):
        raise KeelError(f"{loc}: every assistant turn has \"loss\": false: the row has no answer to learn")
    msgs = ([{"role": "system", "content": system}] if system or keep_empty_system else []) + turns
    return {"messages": msgs}


def alpaca_to_messages(row: dict, loc: str = "row") -> dict:
    """{"instruction", "input", "output", "system"?, "history"?} -> messages."""
    instruction = _text(row, "instruction", loc)
    extra = _text(row, "input", loc, required=False)
    question = f"{instruction}\n{extra}" if extra.strip() else instruction
    turns = _history(row, loc) + [{"role": "user", "content": question},
                                  {"role": "assistant", "content": _text(row, "output", loc)}]
    return _finish(_text(row, "system", loc, required=False), turns, loc, "output")


def query_response_to_messages(row: dict, loc: str = "row") -> dict:
    """{"query", "response", "history"?, "system"?} -> messages."""
    turns = _history(row, loc) + [{"role": "user", "content": _text(row, "query", loc)},
                                  {"role": "assistant", "content": _text(row, "response", loc)}]
    return _finish(_text(row, "system", loc, required=False), turns, loc, "response")


def _turns(row: dict, key: str, role_key: str, content_key: str, roles: dict, loc: str) -> dict:
    """A list of turns under `key` (sharegpt or OpenAI style) -> messages, checked field by field."""
    items = row.get(key)
    if not isinstance(items, list) or not items:
        raise KeelError(f"{loc}: field '{key}' must be a non-empty list")
    turns = []
    for i, turn in enumerate(items):
        if not isinstance(turn, dict):
            raise KeelError(f"{loc}: field '{key}' item {i} must be an object")
        who = _text(turn, role_key, f"{loc}: {key}[{i}]")
        if who not in roles:
            raise KeelError(f"{loc}: {key}[{i}]: field '{role_key}' has unknown role '{who}' "
                            f"(expected {', '.join(sorted(set(roles)))})")
        msg = {"role": roles[who], "content": _text(turn, content_key, f"{loc}: {key}[{i}]")}
        if turn.get("loss") is not None:  # ms-swift's per-message switch: false = context only, no labels
            if not isinstance(turn["loss"], bool):
                raise KeelError(f"{loc}: {key}[{i}]: field 'loss' must be true, false or null")
            msg["loss"] = turn["loss"]
        turns.append(msg)
    system = _text(row, "system", loc, required=False)
    explicit = turns[0]["role"] == "system"
    if explicit:
        system, turns = turns[0]["content"], turns[1:]
    # In OpenAI `messages` rows an explicit empty system turn is kept: it means "no system prompt",
    # which the template's default (or --system) must not replace.
    return _finish(system, turns, loc, key, keep_empty_system=explicit and key == "messages")


def sharegpt_to_messages(row: dict, loc: str = "row") -> dict:
    """{"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...], "system"?} -> messages."""
    return _turns(row, "conversations", "from", "value", SHAREGPT_ROLES, loc)


def messages_to_messages(row: dict, loc: str = "row") -> dict:
    """{"messages": [{"role", "content"}, ...]} checked and copied."""
    return _turns(row, "messages", "role", "content", {r: r for r in ROLES}, loc)


# The key that identifies each format, checked in this order.
CONVERTERS = {"messages": messages_to_messages, "conversations": sharegpt_to_messages,
              "instruction": alpaca_to_messages, "query": query_response_to_messages}


def parse_jsonl(text: str, path) -> list[tuple[int, object]]:
    """(line number, value) for every non-blank line; a broken line is an error naming line and column."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise KeelError(f"{path}: line {n}, column {e.colno}: invalid JSON ({e.msg})") from None
    return out


def read_text(path: str | Path) -> str:
    """A file's text; missing, unreadable or non-UTF-8 files are one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise KeelError(f"{path}: file does not exist")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise KeelError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    except OSError as e:
        raise KeelError(f"{path}: cannot read: {e.strerror}") from None


def read_rows(path: str | Path) -> list[dict]:
    """Raw rows of a JSON array, JSONL or CSV file; syntax errors give line and column."""
    path = Path(path)
    text = read_text(path)
    if not text.strip():
        raise KeelError(f"{path}: the file is empty")
    if path.suffix.lower() == ".csv":
        return list(csv.DictReader(text.splitlines()))
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise KeelError(f"{path}: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})") from None
    else:
        rows = [row for _, row in parse_jsonl(text, path)]
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise KeelError(f"{where(path, n)}: each row must be a JSON object, got {type(row).__name__}")
    if not rows:
        raise KeelError(f"{path}: the file holds no rows")
    return rows


def detect_format(row: dict, path) -> str:
    for key in CONVERTERS:
        if key in row:
            return key
    raise KeelError(f"{where(path, 1)}: unknown format: expected one of the fields "
                    f"{', '.join(CONVERTERS)} (fields found: {', '.join(sorted(row)) or 'none'})")


def load_records(path: str | Path) -> list[dict]:
    """Every row of a file as {"messages": [...]}; errors name file, row and field."""
    rows = read_rows(path)
    key = detect_format(rows[0], path)
    convert = CONVERTERS[key]
    return [convert(row, where(path, n)) for n, row in enumerate(rows, 1)]


def user_prompts(path: str, flag: str) -> list[str]:
    """The first user message of every row of a dataset file (answers are ignored), in order, unique.

    Any dataset format; prompt-only rows ({"query"}, {"instruction"} or {"prompt"} without an answer)
    are accepted too (ballast prompts, eval probe files). `flag` names the flag in the error.
    """
    try:
        records = load_records(path)
        prompts = [next((m["content"] for m in r["messages"] if m["role"] == "user"), "") for r in records]
    except KeelError:
        rows = read_rows(path)
        prompts = [r.get("query") or r.get("instruction") or r.get("prompt") or "" for r in rows]
    prompts = [p.strip() for p in prompts if isinstance(p, str) and p.strip()]
    if not prompts:
        raise KeelError(f"{flag} {path}: no usable prompts (rows need a user message, 'query' or 'instruction')")
    return list(dict.fromkeys(prompts))
