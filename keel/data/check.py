"""`keel data check`: the "jsonlint" step of the seeds, made for this job.

    keel data check self_cognition.json 'bad_cases.jsonl#10%' --model_name Keel --model_author "Keel Lab"
    keel data check data.jsonl --model Qwen/Qwen2.5-7B-Instruct --max_length 2048

Reports JSON syntax errors (line and column), schema errors by row, empty answers, exact
duplicates, placeholders that would survive into training, and token-length statistics for the
model's tokenizer (the embedded model's by default). Exit status 1 when any error was found.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field

from keel.core.errors import KeelError, where
from keel.core.flags import parse_flags
from keel.data.formats import CONVERTERS, detect_format, read_rows
from keel.data.mix import fill_placeholders, leftover_placeholder, parse_spec, resolve_source
from keel.model.template import render, with_system


@dataclass
class CheckArgs:
    files: list[str] = field(default_factory=list)
    """Dataset files or specs to check (positional)."""
    model: str | None = None
    """Whose tokenizer counts tokens (default: the embedded model)."""
    max_length: int = 2048
    """Rows longer than this many tokens are reported."""
    model_name: list[str] = field(default_factory=list)
    """Fill {{NAME}} placeholders as training would (one value, or Chinese and English)."""
    model_author: list[str] = field(default_factory=list)
    """Fill {{AUTHOR}} placeholders as training would (one value, or Chinese and English)."""
    system: str | None = None
    """System prompt for rows that have none, as training would use it."""
    data_dir: str | None = None
    """Local mirror folder for hub dataset ids (default: $KEEL_DATA_DIR)."""


def check_file(spec: str, args: CheckArgs, tokenizer) -> tuple[list[str], dict]:
    """Problems found in one file (as lines) and its statistics."""
    source, _, _ = parse_spec(spec)
    path = resolve_source(source, args.data_dir)
    try:
        rows = read_rows(path)
        convert = CONVERTERS[detect_format(rows[0], path)]
    except KeelError as e:
        return [str(e)], {}
    problems, seen, lengths, records = [], {}, [], []
    for n, row in enumerate(rows, 1):
        loc = where(path, n)
        try:
            rec = convert(row, loc)
        except KeelError as e:
            problems.append(str(e))
            continue
        key = json.dumps(rec, ensure_ascii=False, sort_keys=True)
        if key in seen:
            problems.append(f"{loc}: exact duplicate of row {seen[key]}")
        seen.setdefault(key, n)
        msgs = fill_placeholders(rec["messages"], args.model_name, args.model_author)
        left = leftover_placeholder(msgs)
        if left:
            problems.append(f"{loc}: placeholder {left} left in an answer (pass --model_name/--model_author, or edit the row)")
        records.append((n, msgs))
    over = 0
    for n, msgs in records:
        ids = render(tokenizer, with_system(msgs, args.system))
        if ids is None:
            continue
        lengths.append(len(ids[0]))
        if len(ids[0]) > args.max_length:
            over += 1
    stats = {"rows": len(rows), "ok_rows": len(records), "over_max_length": over}
    if lengths:
        stats.update(min=min(lengths), median=int(statistics.median(lengths)), max=max(lengths))
    return problems, stats


CONFIGS = (CheckArgs,)


def main(argv: list[str]):
    """keel data check FILE_OR_SPEC... [--model M] [--max_length N]"""
    parsed = parse_flags(argv, CONFIGS, prog="keel data check",
                         description="Check dataset files before training.",
                         positionals=(("paths", {"nargs": "*"}),))
    args = parsed.configs[0]
    args.files = list(parsed.raw.get("paths") or []) + args.files
    if not args.files:
        raise KeelError("keel data check: name at least one dataset file")
    from keel.model.load import ModelArgs, base_model_spec, load_tokenizer, resolve_model_path
    tokenizer = load_tokenizer(resolve_model_path(base_model_spec(ModelArgs(model=args.model)))[0])
    total = 0
    for spec in args.files:
        problems, stats = check_file(spec, args, tokenizer)
        total += len(problems)
        for p in problems[:20]:
            print(f"error: {p}")
        if len(problems) > 20:
            print(f"error: ... and {len(problems) - 20} more in {spec}")
        if stats:
            tokens = f"tokens min/median/max {stats['min']}/{stats['median']}/{stats['max']}" if "min" in stats else "no tokens"
            print(f"{spec}: {stats['rows']} rows, {stats['ok_rows']} valid, {tokens}, "
                  f"{stats['over_max_length']} over max_length {args.max_length}")
    print(f"{total} problem(s) found" if total else "no problems found")
    if total:
        raise SystemExit(1)
