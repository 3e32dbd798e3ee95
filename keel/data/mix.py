"""Build the training mixture from dataset specs, fill identity placeholders, tokenize.

    train, val, manifest = build_datasets(DataArgs(dataset=["alpaca_zh_demo.json#500", "self_cognition.json"]), tok)

A spec is `PATH_OR_ID[#N]` or `PATH_OR_ID#P%` (ms-swift's semantics):
- `#N` with N smaller than the dataset: a random subset of N rows, without replacement;
- `#N` with N larger: the whole dataset N // size times plus N % size random rows;
- `#P%`: P percent of the total rows taken from the other (non-%) specs, e.g. bad cases at 10%;
- no suffix: every row once;
- `ballast#N`: N general prompts answered by the base model itself (keel/ballast.py turns the spec
  into a rows file before this module runs: datasets never see a model).
Draws are seeded by `--data_seed` and the spec text, so a fixed seed gives the same mixture.

A hub id (`AI-ModelScope/alpaca-gpt4-data-zh`, `org/name`) is read from the local mirror folder
(`--data_dir` or $KEEL_DATA_DIR) when present, else from the Hugging Face hub when it is reachable.
"""

from __future__ import annotations

import os
import random
import re
import statistics
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from keel.core.errors import KeelError
from keel.core.flags import check_zh_en
from keel.data.formats import load_records
from keel.model.template import IGNORE_INDEX, render, with_system

# Where a mirror folder may hold the seeds' hub datasets (first match wins).
MIRROR_FILES = {
    "AI-ModelScope/alpaca-gpt4-data-zh": ["alpaca-gpt4-data-zh.json", "alpaca_gpt4_data_zh.json", "alpaca_zh_demo.json"],
    "AI-ModelScope/alpaca-gpt4-data-en": ["alpaca-gpt4-data-en.json", "alpaca_gpt4_data_en.json", "alpaca_en_demo.json"],
    "swift/self-cognition": ["self_cognition.json", "self-cognition.json", "identity.json"],
}
DATA_SUFFIXES = (".json", ".jsonl", ".csv")
PLACEHOLDER = re.compile(r"[ \t]*\{\{\s*(name|NAME|author|AUTHOR)\s*\}\}[ \t]*")
ANY_PLACEHOLDER = re.compile(r"\{\{\s*\w+\s*\}\}")
CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]")


@dataclass
class DataArgs:
    dataset: list[str] = field(default_factory=list)
    """Training data: files or hub ids, each optionally with #N (rows) or #P% (percent of the rest)."""
    val_dataset: list[str] = field(default_factory=list)
    """Validation data (same spec syntax). Default: --split_dataset_ratio of the training mixture."""
    split_dataset_ratio: float = 0.01
    """Share of the training mixture held out for validation when --val_dataset is not given."""
    data_seed: int = 42
    """Seed for #N sampling, shuffling and the validation split."""
    data_dir: str | None = None
    """Local mirror folder for hub dataset ids (default: $KEEL_DATA_DIR)."""
    model_name: list[str] = field(default_factory=list)
    """The new identity's name: one value, or two (Chinese, English). Fills {{NAME}} / {{name}}."""
    model_author: list[str] = field(default_factory=list)
    """The new identity's maker: one value, or two (Chinese, English). Fills {{AUTHOR}} / {{author}}."""
    max_length: int = 2048
    """Longest row in tokens; longer rows are truncated, rows left without answer tokens are dropped."""
    system: str | None = None
    """System prompt for rows that have none (replaces the chat template's default)."""
    ballast_system_mix: bool = True
    """ballast#N: answer and train each prompt under one of the identity rows' system prompts (training, none, 'You are a helpful assistant.', persona pool) instead of the training one only."""

    def __post_init__(self):
        if self.max_length < 8:
            raise KeelError(f"--max_length must be >= 8, got {self.max_length}")
        if not 0 <= self.split_dataset_ratio < 1:
            raise KeelError(f"--split_dataset_ratio must be in [0, 1), got {self.split_dataset_ratio}")
        for flag in ("model_name", "model_author"):
            check_zh_en(flag, getattr(self, flag), required=False)
        for spec in self.dataset + self.val_dataset:
            parse_spec(spec)


def parse_spec(spec: str) -> tuple[str, int | None, float | None]:
    """'file.json#500' -> ('file.json', 500, None); 'bad.jsonl#10%' -> ('bad.jsonl', None, 10.0)."""
    source, sep, count = spec.rpartition("#") if "#" in spec else (spec, "", "")
    if not sep:
        return spec, None, None
    if count.endswith("%"):
        try:
            pct = float(count[:-1])
        except ValueError:
            pct = -1
        if not 0 < pct <= 1000:
            raise KeelError(f"--dataset {spec}: '#{count}' must be a positive percentage like #10%")
        return source, None, pct
    if not count.isdigit() or int(count) == 0:
        raise KeelError(f"--dataset {spec}: '#{count}' must be a positive whole number of rows (e.g. #500) or a percentage (#10%)")
    return source, int(count), None


def resolve_source(source: str, data_dir: str | None) -> Path:
    """A local file, or a hub id found in the mirror folder or fetched from the hub."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    mirror = data_dir or os.environ.get("KEEL_DATA_DIR")
    looks_like_id = re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.endswith(DATA_SUFFIXES)
    if not looks_like_id:
        raise KeelError(f"--dataset {source}: file does not exist")
    org, name = source.split("/")
    candidates = MIRROR_FILES.get(source, []) + [f"{org}/{name}{s}" for s in DATA_SUFFIXES] + [f"{name}{s}" for s in DATA_SUFFIXES]
    if mirror:
        for cand in candidates:
            if (Path(mirror) / cand).is_file():
                return Path(mirror) / cand
    fetched = fetch_dataset(source)
    if fetched:
        return fetched
    where = f"in the mirror folder {mirror}" if mirror else "in a mirror folder (--data_dir or $KEEL_DATA_DIR)"
    raise KeelError(f"--dataset {source}: the hub cannot be reached; put the data as {candidates[0]} {where}")


def fetch_dataset(hub_id: str) -> Path | None:
    """Download a dataset repo from the Hugging Face hub; its first JSON/JSONL file, or None offline."""
    from keel.core.hub import hub_reachable
    if not hub_reachable():
        return None
    from huggingface_hub import snapshot_download
    try:
        folder = Path(snapshot_download(hub_id, repo_type="dataset", allow_patterns=["*.json", "*.jsonl"]))
    except Exception as e:  # the hub library raises many types; the user needs one line
        raise KeelError(f"--dataset {hub_id}: could not fetch from the hub: {e}") from None
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".json", ".jsonl"))
    if not files:
        raise KeelError(f"--dataset {hub_id}: the hub repo holds no .json or .jsonl file")
    return files[0]


def is_chinese(messages: list[dict]) -> bool:
    return any(CJK.search(m["content"]) for m in messages if m["role"] != "system")


def fill_placeholders(messages: list[dict], names: list[str], authors: list[str]) -> list[dict]:
    """Replace {{NAME}}/{{AUTHOR}} (any case) with the zh or en value chosen by the row's language.

    Spaces around a placeholder are kept only where both sides are non-CJK text, so LLaMA-Factory's
    `我是 {{name}}，` becomes `我是小黄，` but `I am {{name}}.` stays `I am Keel.`.
    """
    lang = 0 if is_chinese(messages) else -1  # zh value first, en value last (ms-swift order)
    values = {"name": names[lang] if names else None, "author": authors[lang] if authors else None}

    def swap(m: re.Match) -> str:
        value = values[m.group(1).lower()]
        if value is None:
            return m.group(0)
        text, start, end = m.string, m.start(), m.end()
        before = text[start - 1] if start > 0 else ""
        after = text[end] if end < len(text) else ""
        lead = " " if m.group(0)[:1] in " \t" and before and not CJK.match(before) and not CJK.match(value[:1]) else ""
        trail = " " if m.group(0)[-1:] in " \t" and after and not CJK.match(after) and not CJK.match(value[-1:]) else ""
        return f"{lead}{value}{trail}"

    return [{**m, "content": PLACEHOLDER.sub(swap, m["content"])} for m in messages]


def take(rows: list, n: int | None, rng: random.Random) -> tuple[list, int]:
    """Apply #N: a subset without replacement, or whole repeats plus a random remainder."""
    if n is None:
        return list(rows), 1
    repeats, rest = divmod(n, len(rows))
    return list(rows) * repeats + rng.sample(rows, rest), repeats


def _rng(seed: int, spec: str) -> random.Random:
    return random.Random(seed * 1_000_003 + zlib.crc32(spec.encode()))


def load_mixture(specs: list[str], args: DataArgs) -> tuple[list[dict], list[dict]]:
    """Rows (with their origin) and one manifest entry per spec."""
    loaded = []
    for spec in specs:
        source, n, pct = parse_spec(spec)
        if source == "ballast":  # resolved into a file by keel.synth.ballast.resolve_ballast before the data layer runs
            raise KeelError(f"--dataset {spec}: ballast is generated by the model being trained; use it with "
                            "keel sft, or write a file with keel data ballast")
        path = resolve_source(source, args.data_dir)
        records = load_records(path)
        rows = [{"messages": fill_placeholders(r["messages"], args.model_name, args.model_author),
                 "origin": (str(path), i)} for i, r in enumerate(records, 1)]
        loaded.append((spec, path, n, pct, rows))
    return mix_loaded(loaded, args.data_seed)


def mix_loaded(loaded: list[tuple], seed: int) -> tuple[list[dict], list[dict]]:
    """Rows taken from each loaded (spec, path, n, pct, rows) as its #N or #P% asks (percentages of the
    fixed-size sources' total), each tagged with its source, and one manifest entry per spec."""
    fixed_total = 0
    taken, manifest = [], []
    for spec, path, n, pct, rows in loaded:
        if pct is None:
            picked, _ = take(rows, n, _rng(seed, spec))
            fixed_total += len(picked)
            taken.append(picked)
        else:
            taken.append(None)
        manifest.append({"spec": spec, "path": str(path), "requested": n, "available": len(rows), "seed": seed})
    for i, (spec, path, n, pct, rows) in enumerate(loaded):
        if pct is not None:
            want = max(1, round(fixed_total * pct / 100))
            taken[i], _ = take(rows, want, _rng(seed, spec))
            manifest[i]["requested"] = f"{pct:g}% = {want}"
        manifest[i]["taken"] = len(taken[i])
        manifest[i]["repeats"] = len(taken[i]) // len(rows)
    return [{**row, "source": e["spec"]} for e, picked in zip(manifest, taken) for row in picked], manifest


def leftover_placeholder(messages: list[dict]) -> str | None:
    """The first `{{...}}` still in an answer after filling, or None (prompts may quote braces)."""
    for m in messages:
        left = ANY_PLACEHOLDER.search(m["content"])
        if left and m["role"] == "assistant":
            return left.group(0)
    return None


def check_placeholders(rows: list[dict]):
    for row in rows:
        left = leftover_placeholder(row["messages"])
        if left:
            path, n = row["origin"]
            hint = " (pass --model_name and --model_author)" if left.strip("{} ").lower() in ("name", "author") else ""
            raise KeelError(f"{path}: row {n}: placeholder {left} left in an answer{hint}")


def tokenize(rows: list[dict], tokenizer, args: DataArgs, manifest: list[dict]) -> list[tuple[list[int], list[int]]]:
    """Render every row once with the tokenizer's chat template; count what was dropped."""
    by_spec = {e["spec"]: e for e in manifest}
    for e in manifest:
        e.update(dropped_too_long=0, lengths=[], label_tokens=0)
    out = []
    cache = {}
    for row in rows:
        key = (row["origin"], row["source"])
        if key not in cache:  # repeated rows (#N > size) are rendered once
            cache[key] = render(tokenizer, with_system(row["messages"], args.system), args.max_length)
        item, entry = cache[key], by_spec[row["source"]]
        if item is None:
            entry["dropped_too_long"] += 1
            continue
        entry["lengths"].append(len(item[0]))
        entry["label_tokens"] += sum(x != IGNORE_INDEX for x in item[1])
        out.append(item)
    for e in manifest:
        lengths = e.pop("lengths")
        e["tokens"] = ({"min": min(lengths), "median": int(statistics.median(lengths)), "max": max(lengths),
                        "total": sum(lengths)} if lengths else None)
    return out


def build_datasets(args: DataArgs, tokenizer):
    """(train, val, manifest): lists of (ids, labels) and a JSON-able record of what was taken."""
    if not args.dataset:
        raise KeelError("--dataset is required (a file such as self_cognition.json, or a hub id)")
    rows, train_manifest = load_mixture(args.dataset, args)
    random.Random(args.data_seed).shuffle(rows)
    val_manifest = []
    if args.val_dataset:
        val_rows, val_manifest = load_mixture(args.val_dataset, args)
    else:
        n_val = int(round(len(rows) * args.split_dataset_ratio))
        if args.split_dataset_ratio > 0 and len(rows) >= 2:
            n_val = max(1, n_val)
        # Split by original row so a row repeated by #N never sits on both sides.
        origins = list(dict.fromkeys(r["origin"] for r in rows))
        held = set(origins[:n_val])
        val_rows = [r for r in rows if r["origin"] in held]
        val_rows = list({r["origin"]: r for r in val_rows}.values())
        rows = [r for r in rows if r["origin"] not in held]
    check_placeholders(rows + val_rows)
    train = tokenize(rows, tokenizer, args, train_manifest)
    if not train:
        raise KeelError("no training rows left: every row lost its answer to --max_length truncation")
    val = tokenize(val_rows, tokenizer, args, val_manifest or [dict(e) for e in train_manifest])
    manifest = {"sources": train_manifest, "val_sources": val_manifest, "train_rows": len(train),
                "val_rows": len(val), "max_length": args.max_length, "system": args.system,
                "data_seed": args.data_seed}
    return train, val, manifest


def format_manifest(manifest: dict) -> str:
    """A short table of what each source contributed."""
    lines = [f"{'source':<44} {'requested':>10} {'available':>9} {'taken':>6} {'repeats':>7} {'dropped':>7} {'tokens min/med/max':>19}"]
    for e in manifest["sources"]:
        t = e.get("tokens")
        stats = f"{t['min']}/{t['median']}/{t['max']}" if t else "-"
        req = "all" if e["requested"] is None else e["requested"]
        lines.append(f"{e['spec'][-44:]:<44} {req!s:>10} {e['available']:>9} {e['taken']:>6} {e['repeats']:>7} "
                     f"{e.get('dropped_too_long', 0):>7} {stats:>19}")
    lines.append(f"train rows {manifest['train_rows']}, validation rows {manifest['val_rows']}, "
                 f"max_length {manifest['max_length']}, seed {manifest['data_seed']}")
    return "\n".join(lines)
