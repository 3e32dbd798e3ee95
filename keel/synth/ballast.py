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

from keel.core.errors import KeelError
from keel.core.files import write_jsonl
from keel.core.text import lang_of
from keel.data.formats import user_prompts
from keel.data.mix import parse_spec
from keel.evals.scoring import OLD_IDENTITY, mentions
from keel.model.generate import GenerateArgs, generate_batch
from keel.model.load import base_context, cache_root, eval_mode
from keel.model.template import default_system, with_system

PROMPTS_FILE = Path(__file__).parents[1] / "data" / "ballast_prompts.jsonl"
SENTENCE_END = (".", "!", "?", "。", "！", "？", "\n", "`")
REPLACE_ROUNDS = 4  # rounds of replacing prompts whose answers were unusable
# Unused prompts tried at once for each unusable answer: an unusable answer is usually one cut off at max_new_tokens,
# so a round costs its longest answer and two candidates a slot save rounds (docs/performance.md).
CANDIDATES = 2
# Answers per generation batch. Decoding a small model on a CPU is mostly per-step overhead, so one large batch
# beats several small ones (bench/generate_bench.py, docs/performance.md).
GENERATE_BATCH = 48


def builtin_prompts() -> list[str]:
    return [json.loads(line)["query"] for line in PROMPTS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]


def draw(prompts: list[str], n: int, rng: random.Random, balance: bool) -> list[str]:
    """n prompts without repeats; balance: as many Chinese as English (as far as each has prompts).

    The identity rows are half Chinese, half English. Ballast drawn at random from the built-in set
    (a third Chinese) leaves Chinese questions mostly answered by identity rows, and the tuned model
    then opens ordinary Chinese answers with its new name (docs/recipe.md).
    """
    if not balance:
        return rng.sample(prompts, min(n, len(prompts)))
    zh = [p for p in prompts if lang_of(p) == "zh"]
    en = [p for p in prompts if lang_of(p) != "zh"]
    k_zh = min(len(zh), max(n // 2, n - len(en)))
    chosen = rng.sample(zh, k_zh) + rng.sample(en, min(len(en), n - k_zh))
    rng.shuffle(chosen)
    return chosen


def teachable(answer: str | None) -> bool:
    return bool(answer) and not mentions(answer, OLD_IDENTITY)


def finish(answer: str, truncated: bool) -> str | None:
    """A cut-off answer is trimmed to its last full sentence (or dropped): rows teach where to stop."""
    answer = answer.strip()
    if not truncated:
        return answer or None
    cut = max(answer.rfind(c) for c in SENTENCE_END)
    return answer[:cut + 1].strip() if cut > len(answer) // 3 else None


def system_mix(system: str | None, pool: list[str] | None = None,
               template: str | None = None) -> tuple[list[str | None], list[str]]:
    """(main conditions, pool): the system prompts the identity rows are trained under (keel/data/identity.py):
    the training one (None: the template's default), none (no system turn: an empty system message), the seeds'
    'You are a helpful assistant.', the template's own default `template` when --system replaced it, and the
    persona/job pool. Ballast answered under each keeps the base model's general answers whatever system prompt
    the tuned model is later served with."""
    from keel.data.identity import HELPFUL, POOL_FILE, read_pool

    main = list(dict.fromkeys([system, "", HELPFUL] + ([template] if template and system is not None else [])))
    return main, pool or read_pool(POOL_FILE)


def model_mix(system: str | None, tokenizer) -> tuple[list[str | None], list[str]]:
    """system_mix for a model: its template's own default is read from the tokenizer. keel sft's ballast#N and the
    identity pairs' --ballast both call this, so the DPO stage's ballast rows are the SFT run's."""
    return system_mix(system, template=default_system(tokenizer))


def cached_generations(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int,
                       name: str, desc: str | None = None) -> dict[str, str | None]:
    """The base model's greedy answers to conversations, {json(conversation): answer or None (cut off with
    no full sentence)}, from the cache `cache_root()/name/` or generated into it batch by batch, so a
    second run, or one after an interruption, generates only what is missing. Ballast and identity
    pairs (keel/identity_pairs.py) share it."""
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    # "no-system-turn": an empty system prompt has been asked without a system turn since keel/chat.py
    # renders it so (older caches asked it under an empty system block).
    version = [source, max_new_tokens, "greedy", name, "by-conversation", "no-system-turn"]
    key = hashlib.sha256(json.dumps(version).encode()).hexdigest()[:16]
    cache = cache_root() / name / f"{key}.jsonl"
    cache.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if cache.is_file():
        for line in cache.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                done[row["prompt"]] = row["answer"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut by an interruption: generate it again
    todo = list(dict.fromkeys(k for k in (json.dumps(c, ensure_ascii=False) for c in conversations) if k not in done))
    if todo:
        from tqdm import tqdm

        gen = GenerateArgs(temperature=0.0, max_new_tokens=max_new_tokens)
        bar = tqdm(total=len(todo), desc=desc or name, leave=False)
        with open(cache, "a", encoding="utf-8") as f, base_context(model), eval_mode(model):
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                answers = generate_batch(model, tokenizer, [json.loads(k) for k in batch], gen, batch_size=batch_size)
                for k, a in zip(batch, answers):
                    truncated = len(tokenizer(a, add_special_tokens=False)["input_ids"]) >= max_new_tokens - 2
                    done[k] = finish(a, truncated)
                    f.write(json.dumps({"prompt": k, "answer": done[k]}, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                bar.update(len(batch))
        bar.close()
    return done


def cached_answers(model, tokenizer, pairs: list[tuple[str | None, str]], max_new_tokens: int,
                   batch_size: int) -> dict[tuple[str | None, str], str | None]:
    """The base model's greedy answers to (system prompt, prompt) pairs, in batches that mix system
    prompts (one pass, however many prompts the mix has)."""
    convs = {pair: with_system([{"role": "user", "content": pair[1]}], pair[0]) for pair in pairs}
    answers = cached_generations(model, tokenizer, list(convs.values()), max_new_tokens, batch_size, "ballast")
    return {pair: answers[json.dumps(conv, ensure_ascii=False)] for pair, conv in convs.items()}


def assign_systems(n: int, system: str | None, systems: tuple[list[str | None], list[str]] | None,
                   rng: random.Random) -> list[str | None]:
    """The system prompt of each of n rows: with systems (system_mix's (main, pool)) the main conditions in turn
    and, as the last slot of each round, one drawn from the pool; else `system` for all."""
    if not systems:
        return [system] * n
    main, pool = systems[0], systems[1] or systems[0][:1]
    rnd = len(main) + 1
    return [main[i % rnd] if i % rnd < len(main) else rng.choice(pool) for i in range(n)]


def spare_conversations(used: set[str], n: int, system: str | None, seed: int,
                        systems: tuple[list[str | None], list[str]] | None = None) -> list[list[dict]]:
    """n conversations (system prompt + one user turn) on built-in prompts outside `used` (the ballast's own),
    as many Chinese as English as far as each has prompts, under the ballast's system prompts: the guard rows'
    prompts (--ballast_guard), ordinary questions the model is not trained to answer in any particular way."""
    rng = random.Random(seed)
    chosen = draw([p for p in builtin_prompts() if p not in used], n, rng, balance=True)
    return [with_system([{"role": "user", "content": p}], s)
            for s, p in zip(assign_systems(len(chosen), system, systems, rng), chosen)]


def ballast_records(model, tokenizer, n: int, system: str | None, prompts: list[str] | None = None, seed: int = 42,
                    max_new_tokens: int = 96, batch_size: int = GENERATE_BATCH, repeat: bool = False,
                    systems: tuple[list[str | None], list[str]] | None = None) -> list[dict]:
    """n rows {"messages": [system?, user, assistant]} answered greedily by the base model.

    systems: if given, (main, pool) (system_mix): the prompts take the main system prompts in turn and then one
    drawn from the pool, each answered and trained under its own; else all under `system`.
    """
    builtin = not prompts
    prompts = prompts or builtin_prompts()
    if n > len(prompts) and not repeat:
        print(f"ballast: {n} rows asked, {len(prompts)} prompts available: using all {len(prompts)}")
    rng = random.Random(seed)
    chosen = draw(prompts, n, rng, balance=builtin)  # your own prompts are taken as they come
    slots = list(zip(assign_systems(len(chosen), system, systems, rng), chosen))
    answers = cached_answers(model, tokenizer, slots, max_new_tokens, batch_size)
    # A slot whose answer is unusable (cut off with no full sentence, or naming the base's identity, which must not
    # be taught back) goes to an unused prompt of the same language under the same system prompt, so ballast#N keeps
    # N rows and its language balance: a small model's Chinese answers are cut off far more often.
    taken = set(chosen)
    spare = {lang: [p for p in prompts if p not in taken and lang_of(p) == lang] for lang in ("zh", "en")}
    for lang in spare:
        rng.shuffle(spare[lang])
    for _ in range(REPLACE_ROUNDS):
        failing = [i for i, slot in enumerate(slots) if not teachable(answers.get(slot))]
        tries = {i: [] for i in failing}
        for _ in range(CANDIDATES):  # each slot's first candidate first, so one candidate a slot takes the same prompts
            for i in failing:
                pool = spare[lang_of(slots[i][1])]
                if pool:
                    tries[i].append(pool.pop())
        tries = {i: ps for i, ps in tries.items() if ps}
        if not tries:
            break
        answers.update(cached_answers(model, tokenizer, [(slots[i][0], p) for i, ps in tries.items() for p in ps],
                                      max_new_tokens, batch_size))
        for i, ps in tries.items():
            slots[i] = (slots[i][0], next((p for p in ps if teachable(answers.get((slots[i][0], p)))), ps[-1]))
    rows = []
    for sys_prompt, p in slots:
        a = answers.get((sys_prompt, p))
        if teachable(a):
            msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": a}]
            rows.append({"messages": with_system(msgs, sys_prompt)})
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
    system_mix: bool = False
    """Answer each prompt under one of the identity rows' system prompts (--system, none, 'You are a helpful
    assistant.', the template's default, the persona pool), written into the rows, as ballast#N in keel sft does."""

    def __post_init__(self):
        if self.n < 1:
            raise KeelError(f"-n must be >= 1, got {self.n}")
        if self.prompts and not Path(self.prompts).is_file():
            raise KeelError(f"--prompts: '{self.prompts}' does not exist")


CONFIGS = (BallastArgs,)


def main(argv: list[str]):
    """keel data ballast [--model M] [--prompts FILE] -n 200 -o ballast.jsonl"""
    from keel.core.flags import parse_flags

    (args,) = parse_flags(argv, CONFIGS, prog="keel data ballast", description=__doc__.split("\n")[0]).configs
    write_ballast(args)


def write_ballast(args: BallastArgs):
    from keel.model.load import ModelArgs, load_model

    prompts = user_prompts(args.prompts, "--prompts") if args.prompts else None
    model, tok, _ = load_model(ModelArgs(model=args.model))
    rows = ballast_records(model, tok, args.n, args.system, prompts, max_new_tokens=args.max_new_tokens, repeat=args.repeat,
                           systems=model_mix(args.system, tok) if args.system_mix else None)
    write_jsonl(args.output, rows)
    print(f"wrote {len(rows)} rows to {args.output}")


def resolve_ballast(specs: list[str], model, tokenizer, system: str | None, out_dir: Path,
                    mix: bool = False) -> tuple[list[str], dict]:
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
        records = ballast_records(model, tokenizer, n or 200, system, systems=model_mix(system, tokenizer) if mix else None)
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
