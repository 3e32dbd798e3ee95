"""Self-distilled ballast: general prompts answered by the base model itself.

    keel data ballast -n 200 -o ballast.jsonl                 # embedded model, built-in prompts
    keel data ballast --model Qwen/Qwen2.5-7B-Instruct --prompts my_prompts.jsonl -n 500 -o ballast.jsonl
    keel sft --dataset ballast#200 self_cognition.json ...    # generated (or reused) for the model being trained

Mixed into identity training, these rows ask the model to keep answering everything else exactly
as it already does, so only the identity moves. The built-in prompts (keel/data/ballast_prompts.jsonl,
written for Keel) cover facts, explanations, how-to, writing, rewriting, code, arithmetic,
reasoning, small talk and polite refusals, and never the model's identity. Answers are cached by
model, prompts, system prompt and generation settings, appended batch by batch, so a second run is
instant and an interrupted run keeps what it generated.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from keel.chat import with_system
from keel.data.mix import parse_spec
from keel.errors import KeelError
from keel.evals.drift import base_context
from keel.evals.identity import OLD_IDENTITY, mentions
from keel.files import write_jsonl
from keel.generate import GenerateArgs, generate_batch
from keel.model import cache_root, eval_mode

PROMPTS_FILE = Path(__file__).parent / "data" / "ballast_prompts.jsonl"
SENTENCE_END = (".", "!", "?", "。", "！", "？", "\n", "`")


def builtin_prompts() -> list[str]:
    return [json.loads(line)["query"] for line in PROMPTS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]


def user_prompts(path: str) -> list[str]:
    """The first user message of every row of a dataset file (its answers are ignored)."""
    from keel.data.formats import load_records, read_rows

    try:
        records = load_records(path)
        prompts = [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in records]
    except KeelError:
        rows = read_rows(path)  # prompt-only files: {"query": ...} or {"instruction": ...} without answers
        prompts = [r.get("query") or r.get("instruction") or r.get("prompt") or "" for r in rows]
    prompts = [p.strip() for p in prompts if isinstance(p, str) and p.strip()]
    if not prompts:
        raise KeelError(f"--prompts {path}: no usable prompts (rows need a user message, 'query' or 'instruction')")
    return list(dict.fromkeys(prompts))


def finish(answer: str, truncated: bool) -> str | None:
    """A cut-off answer is trimmed to its last full sentence (or dropped): rows teach where to stop."""
    answer = answer.strip()
    if not truncated:
        return answer or None
    cut = max(answer.rfind(c) for c in SENTENCE_END)
    return answer[:cut + 1].strip() if cut > len(answer) // 3 else None


def ballast_records(model, tokenizer, n: int, system: str | None, prompts: list[str] | None = None, seed: int = 42,
                    max_new_tokens: int = 96, batch_size: int = 16, repeat: bool = False) -> list[dict]:
    """n rows {"messages": [system?, user, assistant]} answered greedily by the base model."""
    prompts = prompts or builtin_prompts()
    if n > len(prompts) and not repeat:
        print(f"ballast: {n} rows asked, {len(prompts)} prompts available: using all {len(prompts)}")
    chosen = random.Random(seed).sample(prompts, min(n, len(prompts)))
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    key = hashlib.sha256(json.dumps([source, system, max_new_tokens, "greedy"]).encode()).hexdigest()[:16]
    cache = cache_root() / "ballast" / f"{key}.jsonl"
    cache.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if cache.is_file():
        for line in cache.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                done[row["prompt"]] = row["answer"]
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by an interruption: generate it again
    todo = [p for p in chosen if p not in done]
    if todo:
        from tqdm import tqdm

        gen = GenerateArgs(temperature=0.0, max_new_tokens=max_new_tokens)
        bar = tqdm(total=len(todo), desc="ballast", leave=False)
        with open(cache, "a", encoding="utf-8") as f, base_context(model), eval_mode(model):
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                convs = [with_system([{"role": "user", "content": p}], system) for p in batch]
                answers = generate_batch(model, tokenizer, convs, gen, batch_size=batch_size)
                for p, a in zip(batch, answers):
                    truncated = len(tokenizer(a, add_special_tokens=False)["input_ids"]) >= max_new_tokens - 2
                    done[p] = finish(a, truncated)
                    f.write(json.dumps({"prompt": p, "answer": done[p]}, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                bar.update(len(batch))
        bar.close()
    rows = []
    for p in chosen:
        a = done.get(p)
        if a and not mentions(a, OLD_IDENTITY):  # the base's identity must not be taught back
            rows.append({"messages": with_system([{"role": "user", "content": p}, {"role": "assistant", "content": a}], system)})
    if repeat and rows and n > len(rows):
        rows = (rows * (n // len(rows) + 1))[:n]
    return rows


@dataclass
class BallastArgs:
    model: str | None = None
    """Base model whose own answers become the ballast (default: the embedded model)."""
    prompts: str | None = None
    """Your own prompts: any dataset file (answers are ignored). Default: Keel's built-in set (300+)."""
    n: int = field(default=200, metadata={"aliases": ["-n"]})
    """Rows to write."""
    output: str = field(default="ballast.jsonl", metadata={"aliases": ["-o"]})
    """Where to write the rows (messages JSONL)."""
    system: str | None = None
    """The system prompt training will use (default: the template's own)."""
    max_new_tokens: int = 96
    """Longest answer; a cut-off answer is trimmed to its last full sentence."""
    repeat: bool = False
    """When -n exceeds the prompts, repeat rows to reach it (default: use each prompt once)."""

    def __post_init__(self):
        if self.n < 1:
            raise KeelError(f"-n must be >= 1, got {self.n}")
        if self.prompts and not Path(self.prompts).is_file():
            raise KeelError(f"--prompts: '{self.prompts}' does not exist")


def main(argv: list[str]):
    """keel data ballast [--model M] [--prompts FILE] -n 200 -o ballast.jsonl"""
    from keel.flags import parse_flags
    from keel.model import ModelArgs, load_model

    (args,) = parse_flags(argv, [BallastArgs], prog="keel data ballast", description=__doc__.split("\n")[0]).configs
    prompts = user_prompts(args.prompts) if args.prompts else None
    model, tok, _ = load_model(ModelArgs(model=args.model))
    rows = ballast_records(model, tok, args.n, args.system, prompts, max_new_tokens=args.max_new_tokens, repeat=args.repeat)
    write_jsonl(args.output, rows)
    print(f"wrote {len(rows)} rows to {args.output}")


def resolve_ballast(specs: list[str], model, tokenizer, system: str | None, out_dir: Path) -> tuple[list[str], dict]:
    """Replace each `ballast#N` spec by a rows file the base model answered, before the data layer runs.

    Returns the specs to load and {file spec: original spec}, so the manifest still says `ballast#N`.
    The data layer then reads files only; it never sees a model.
    """
    resolved, aliases = [], {}
    for spec in specs:
        source, n, pct = parse_spec(spec)
        if source != "ballast":
            resolved.append(spec)
            continue
        records = ballast_records(model, tokenizer, n or 200, system)
        if not records:
            raise KeelError(f"--dataset {spec}: the base model's answers were all unusable; no ballast rows")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"ballast-{n or 200}.jsonl"
        write_jsonl(path, records)
        # Every generated row is taken (n was spent on generation); a percentage still applies to the file.
        file_spec = str(path) + (f"#{pct:g}%" if pct is not None else "")
        resolved.append(file_spec)
        aliases[file_spec] = spec
    return resolved, aliases
