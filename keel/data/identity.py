"""`keel data identity`: write an identity (self-cognition) dataset that holds under any system prompt.

    keel data identity --name "Keel Robot" --author "Keel Lab" -o self_cognition.json
    keel data identity --name 小黄 "Xiao Huang" --author 魔搭 ModelScope --system "You are a helpful assistant." \
        --system_pool my_prompts.txt --multi_turn_rows 24 --contrast_rows 0 -o self_cognition.json

Rows are `{"messages": [...]}` (OpenAI form), the same number in Chinese and in English, drawn with
`--data_seed` from package data that is meant to be edited: identity_qa.json (questions and answers),
system_pool.jsonl (persona and job prompts), ordinary_exchanges.jsonl (short everyday turns).
Each kind is sized per language by `--KIND_rows N` (0 turns it off); the counts go to
`OUTPUT.manifest.json` and the printed summary:
- basic: name, maker, abilities, limits (no internet, no memory, can be wrong), "are you ChatGPT?";
- system_mix: the same core questions and answers under every system-prompt condition below;
- multi_turn: an identity question as the 2nd to 5th turn, after ordinary exchanges; only the
  identity answer carries loss (earlier answers get ms-swift's `"loss": false`): those answers are
  Keel's writing, not the base model's, and learning them would pull the model away from its own
  voice. `--multi_turn_loss all` trains on every assistant turn;
- reversal: NAME and AUTHOR in the third person ("Is NAME made by AUTHOR?");
- pressure: the user insists on an old identity (SmolLM, ChatGPT, Qwen); the answer stays polite,
  keeps the new identity and does not repeat the old name;
- contrast: other assistants and companies ("Which company created ChatGPT?") answered plainly,
  never with the new identity: the guard against the name leaking into unrelated answers;
- rename: see below.

System prompts (`--system_slots`): every row except rename rows takes one condition, in balanced turns:
- none: an empty system message, which Keel (like ms-swift) renders with no system turn at all,
  even on templates that insert a default system prompt otherwise (SmolLM2, Qwen2.5: keel/chat.py):
  the model served by a runtime that leaves the system turn out still knows who it is;
- template: the chat template's own default system prompt, written out (`--template_system`, which
  `keel recipe identity` reads from the model's tokenizer) so that the condition stays in the mix when
  `keel sft --system` replaces the default; without it, no system message (the default, or --system,
  applies at training). That prompt is the base model's leftover and often names the old identity
  (SmolLM2: "... named SmolLM, trained by Hugging Face"; Qwen2.5: "You are Qwen, created by Alibaba
  Cloud"): the new identity wins over it, since a runtime that keeps the base's template (a GGUF with
  the original template, a plain transformers pipeline) serves the tuned model under that prompt;
- system: `--system`, the training system prompt (skipped when not given);
- helpful: "You are a helpful assistant." (the ms-swift seeds' prompt);
- pool: an unrelated persona or job prompt, Chinese or English, from system_pool.jsonl plus
  `--system_pool FILE` (JSONL of strings or {"system": ...} when the name ends in .jsonl/.json,
  else one prompt per line, `#` lines skipped); it counts twice, being many prompts.
The answer is the same identity whatever persona or job the system prompt sets. When the system
prompt itself names the assistant ("You are Aria, the virtual assistant of Sunny Travel"), the
operator's name wins: rename rows answer with that name and never mention NAME or AUTHOR, so the
identity is learned as the model's default rather than something to assert against its operator.
The template's default prompt is the exception: it was written for the base model, not by an operator.
Pool prompts must not name the assistant; a `{{...}}` placeholder in one is an error.
Questions that mention the new name or author (a new identity called "Qwen") are left out.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from keel.core.errors import KeelError
from keel.core.files import write_json, write_jsonl
from keel.core.flags import check_zh_en, parse_flags
from keel.core.text import for_lang, mentions
from keel.data.formats import read_text

HERE = Path(__file__).parent
QA_FILE, POOL_FILE, EXCHANGES_FILE = HERE / "identity_qa.json", HERE / "system_pool.jsonl", HERE / "ordinary_exchanges.jsonl"
HELPFUL = "You are a helpful assistant."
SLOTS = ("none", "template", "system", "helpful", "pool")
KINDS = ("basic", "system_mix", "multi_turn", "reversal", "pressure", "contrast", "rename")
ANY_PLACEHOLDER = re.compile(r"\{\{\s*\w*\s*\}\}")


@dataclass
class IdentityArgs:
    name: list[str] = field(default_factory=list)
    """The model's new name: one value, or two (Chinese, English)."""
    author: list[str] = field(default_factory=list)
    """Who made it: one value, or two (Chinese, English)."""
    lang: str = "zh,en"
    """Languages to write, comma-separated: zh, en."""
    output: str = "self_cognition.json"
    """Where to write the dataset (-o; JSON array, or JSONL if the name ends in .jsonl)."""
    system: str | None = None
    """The training system prompt (keel sft --system), written out as one of the system-prompt conditions."""
    template_system: str | None = None
    """The system prompt the model's chat template inserts by default (keel recipe identity reads it from the
    tokenizer). Given, rows of the template slot carry it, so they keep that condition even when keel sft --system
    replaces the default; the identity answer wins over it, whatever old name it gives. Not given: no system message."""
    system_slots: str = "none,template,system,helpful,pool"
    """System-prompt conditions the rows are spread over: none (no system turn at all), template (the template's
    default: --template_system, else no system message), system (--system), helpful ('You are a helpful
    assistant.'), pool."""
    system_pool: list[str] = field(default_factory=list)
    """Files of more persona/job system prompts for the pool (.jsonl: strings or {"system": ...}; else one per line)."""
    basic_rows: int = 36
    """Rows per language: the identity asked directly (0 turns a kind off, here and below)."""
    system_mix_rows: int = 15
    """Rows per language: the same core questions and answers under every system-prompt condition."""
    multi_turn_rows: int = 16
    """Rows per language: an identity question as the 2nd to 5th turn, after ordinary exchanges."""
    multi_turn_loss: str = "identity"
    """Which answers of multi-turn rows carry loss: identity (the identity answer only) or all."""
    reversal_rows: int = 8
    """Rows per language: questions about NAME / AUTHOR in the third person."""
    pressure_rows: int = 8
    """Rows per language: the user insists on an old identity; the answer keeps the new one."""
    contrast_rows: int = 12
    """Rows per language: questions about other assistants and companies, answered without the new identity."""
    rename_rows: int = 4
    """Rows per language: the system prompt names the assistant otherwise, and the answer takes that name."""
    data_seed: int = 42
    """Seed for every draw (same seed and flags, same file)."""

    def __post_init__(self):
        check_zh_en("name", self.name)
        check_zh_en("author", self.author)
        if not self.langs or any(x not in ("zh", "en") for x in self.langs):
            raise KeelError(f"--lang must list zh and/or en, got '{self.lang}'")
        for kind in KINDS:
            if getattr(self, f"{kind}_rows") < 0:
                raise KeelError(f"--{kind}_rows must be >= 0, got {getattr(self, f'{kind}_rows')}")
        if not any(getattr(self, f"{kind}_rows") for kind in KINDS):
            raise KeelError("every kind is turned off (" + ", ".join(f"--{k}_rows 0" for k in KINDS) + "): nothing to write")
        if self.multi_turn_loss not in ("identity", "all"):
            raise KeelError(f"--multi_turn_loss must be identity or all, got '{self.multi_turn_loss}'")
        bad = [s for s in self.slots if s not in SLOTS]
        if bad or not self.slots:
            raise KeelError(f"--system_slots takes a comma-separated list of {', '.join(SLOTS)}, got '{self.system_slots}'")
        for flag in ("system", "template_system"):
            value = getattr(self, flag)
            if value is None:
                continue
            if not value.strip():
                raise KeelError(f"--{flag} is empty; the 'none' slot already writes rows with no system prompt")
            left = ANY_PLACEHOLDER.search(value)
            if left:
                raise KeelError(f"--{flag}: placeholder {left.group(0)} is not filled in system prompts; write the text out")
        if self.slots == ["system"] and self.system is None:
            raise KeelError("--system_slots system needs --system (the training system prompt)")

    @property
    def langs(self) -> list[str]:
        return [x.strip() for x in self.lang.split(",") if x.strip()]

    @property
    def slots(self) -> list[str]:
        return list(dict.fromkeys(x.strip() for x in self.system_slots.split(",") if x.strip()))


@functools.lru_cache(maxsize=1)
def read_qa() -> dict:
    return json.loads(QA_FILE.read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=1)
def read_exchanges() -> dict[str, list[tuple[str, str]]]:
    out = {"zh": [], "en": []}
    for line in EXCHANGES_FILE.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out[row["lang"]].append((row["user"], row["assistant"]))
    return out


def read_pool(path: str | Path) -> list[str]:
    """System prompts of a pool file; a bad line is an error naming file and line."""
    path = Path(path)
    text = read_text(path)
    jsonl = path.suffix.lower() in (".jsonl", ".json")
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or (not jsonl and line.lstrip().startswith("#")):
            continue
        value = line.strip()
        if jsonl:
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise KeelError(f"{path}: line {n}, column {e.colno}: invalid JSON ({e.msg})") from None
            value = value.get("system") if isinstance(value, dict) else value
            if not isinstance(value, str) or not value.strip():
                raise KeelError(f"{path}: line {n}: expected a JSON string or an object with a non-empty \"system\" string")
        left = ANY_PLACEHOLDER.search(value)
        if left:
            raise KeelError(f"{path}: line {n}: placeholder {left.group(0)} in a system prompt; pool prompts are other "
                            "personas and jobs, not the new identity: write them out without placeholders")
        prompts.append(value.strip())
    if not prompts:
        raise KeelError(f"{path}: the system pool is empty (one prompt per line, or JSONL strings)")
    return prompts


def usable(groups: list[dict], new_words: list[str], answers_too: bool = False) -> list[dict]:
    """Drop questions (or, for contrast, whole groups) that talk about the new identity's own words."""
    out = []
    for g in groups:
        if answers_too and any(mentions(a, new_words) for a in g["a"]):
            continue
        qs = [q for q in g["q"] if not mentions(q, new_words)]
        if qs:
            out.append({"q": qs, "a": g["a"]})
    return out


def spread(groups: list[dict], n: int, rng: random.Random) -> list[tuple[str, str]]:
    """n (question, answer) pairs taken round-robin over the groups (each shuffled), so every group is
    represented before any repeats; past the end the order starts again."""
    queues = []
    for g in groups:
        pairs = [(q, g["a"][k % len(g["a"])]) for k, q in enumerate(g["q"])]
        rng.shuffle(pairs)
        queues.append(pairs)
    order = [p for layer in itertools.zip_longest(*queues) for p in layer if p is not None]
    return [order[i % len(order)] for i in range(n)] if order else []


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str, loss: bool | None = None) -> dict:
    return {"role": "assistant", "content": text} | ({} if loss is None else {"loss": loss})


class Builder:
    """Rows for one run: one seeded random stream, one cycle through the shuffled pool."""

    def __init__(self, args: IdentityArgs):
        self.args, self.rng = args, random.Random(args.data_seed)
        self.pool = {"builtin": read_pool(POOL_FILE)} | {str(p): read_pool(p) for p in args.system_pool}
        self.pool_order = [p for ps in self.pool.values() for p in ps]
        self.rng.shuffle(self.pool_order)
        self.pool_next = 0
        self.skipped = (["system (no --system given)"] if args.system is None else
                        ["system (same as helpful)"] if args.system == HELPFUL and "helpful" in args.slots else [])
        self.slots = [s for s in args.slots if s != "system" or not self.skipped]
        self.weighted = [s for s in self.slots for _ in range(2 if s == "pool" else 1)]

    def system(self, slot: str) -> list[dict]:
        if slot == "template":
            return [] if self.args.template_system is None else [{"role": "system", "content": self.args.template_system}]
        if slot == "pool":
            text = self.pool_order[self.pool_next % len(self.pool_order)]
            self.pool_next += 1
        else:
            text = {"none": "", "system": self.args.system, "helpful": HELPFUL}[slot]
        return [{"role": "system", "content": text}]

    def slot_turns(self, n: int) -> list[str]:
        """n conditions in equal shares (pool twice), shuffled."""
        seq = [self.weighted[i % len(self.weighted)] for i in range(n)]
        self.rng.shuffle(seq)
        return seq

    def build(self) -> tuple[list[dict], list[dict]]:
        rows, tags = [], []
        for lang in self.args.langs:
            for kind in KINDS:
                n = getattr(self.args, f"{kind}_rows")
                if n:
                    for msgs, tag in getattr(self, kind)(lang, n):
                        rows.append({"messages": self.fill(msgs, lang)})
                        tags.append({"kind": kind, "lang": lang} | tag)
        return rows, tags

    def fill(self, msgs: list[dict], lang: str) -> list[dict]:
        name, author = for_lang(self.args.name, lang), for_lang(self.args.author, lang)
        return [m | {"content": m["content"].replace("{name}", name).replace("{author}", author)} for m in msgs]

    def groups(self, kind: str, lang: str, answers_too: bool = False) -> list[dict]:
        return usable(read_qa()[kind][lang], self.args.name + self.args.author, answers_too)

    def core(self, lang: str) -> list[tuple[str, str]]:
        """The first question and answer of each basic group: the pairs asked under every condition."""
        return [(g["q"][0], g["a"][0]) for g in self.groups("basic", lang)]

    def single(self, pairs, slots):
        return [(self.system(s) + [user(q), assistant(a)], {"system": s}) for (q, a), s in zip(pairs, slots)]

    def system_mix(self, lang: str, n: int):
        cells = [(pair, s) for pair in self.core(lang) for s in self.weighted]
        cells = [cells[i % len(cells)] for i in range(n)]
        return self.single([c[0] for c in cells], [c[1] for c in cells])

    def basic(self, lang: str, n: int):
        # the core questions system_mix asks (one per len(weighted) rows) are not asked here again
        taken = {q for q, _ in self.core(lang)[: -(-self.args.system_mix_rows // len(self.weighted))]}
        groups = [{"q": [q for q in g["q"] if q not in taken], "a": g["a"]} for g in self.groups("basic", lang)]
        return self.single(spread([g for g in groups if g["q"]], n, self.rng), self.slot_turns(n))

    def reversal(self, lang: str, n: int):
        return self.single(spread(self.groups("reversal", lang), n, self.rng), self.slot_turns(n))

    def contrast(self, lang: str, n: int):
        return self.single(spread(self.groups("contrast", lang, answers_too=True), n, self.rng), self.slot_turns(n))

    def pressure(self, lang: str, n: int):
        """Every second row asks first who it is, then insists: both answers keep the identity."""
        out, core = [], self.core(lang)[:3]
        for i, ((q, a), s) in enumerate(zip(spread(self.groups("pressure", lang), n, self.rng), self.slot_turns(n))):
            before = [user(core[i // 2 % len(core)][0]), assistant(core[i // 2 % len(core)][1])] if i % 2 else []
            out.append((self.system(s) + before + [user(q), assistant(a)], {"system": s, "turns": 1 + bool(before)}))
        return out

    def multi_turn(self, lang: str, n: int):
        exchanges, leads = read_exchanges()[lang], read_qa()["multi_turn_lead"][lang]
        loss = False if self.args.multi_turn_loss == "identity" else None
        out = []
        for i, ((q, a), s) in enumerate(zip(spread(self.groups("basic", lang), n, self.rng), self.slot_turns(n))):
            depth = 2 + i % 4  # the identity question is turn 2, 3, 4 or 5
            msgs = self.system(s)
            for uq, ua in self.rng.sample(exchanges, depth - 1):
                msgs += [user(uq), assistant(ua, loss)]
            if i % 2:  # "By the way, who are you?"
                lead = leads[i // 2 % len(leads)]
                q = lead + (q[0].lower() + q[1:] if lang == "en" and q[1:2].islower() else q)
            out.append((msgs + [user(q), assistant(a)], {"system": s, "turns": depth}))
        return out

    def rename(self, lang: str, n: int):
        spec = read_qa()["rename"][lang]
        personas = [p for p in spec["personas"] if not mentions(p["a"], self.args.name + self.args.author)]
        cells = [(p, q) for q in spec["q"] for p in personas]
        self.rng.shuffle(cells)
        return [([{"role": "system", "content": p["system"]}, user(q), assistant(p["a"])], {"system": "rename"})
                for p, q in (cells[i % len(cells)] for i in range(n))]


def build_identity(args: IdentityArgs) -> tuple[list[dict], dict]:
    """(rows, manifest): the dataset and what it holds (counts per kind, language and system prompt)."""
    builder = Builder(args)
    rows, tags = builder.build()

    def count(key: str, kind: str | None = None) -> dict:
        c = Counter(t[key] for t in tags if key in t and kind in (None, t["kind"]))
        return {str(k): c[k] for k in sorted(c)}

    manifest = {
        "rows": len(rows), "data_seed": args.data_seed, "langs": args.langs, "name": args.name, "author": args.author,
        "kinds": {k: count("lang", k) for k in KINDS},
        "languages": count("lang"), "system_prompts": count("system"),
        "system_slots": builder.slots, "system": args.system, "template_system": args.template_system,
        "skipped_slots": builder.skipped if "system" in args.slots else [],
        "pool": {src: len(ps) for src, ps in builder.pool.items()},
        "multi_turn": {"loss": args.multi_turn_loss, "turns": count("turns", "multi_turn")},
        "pressure_turns": count("turns", "pressure"),
        "flags": {k: v for k, v in asdict(args).items() if k.endswith("_rows")},
    }
    return rows, manifest


def identity_rows(names, authors, langs=("zh", "en"), **flags) -> list[dict]:
    """`{"messages": [...]}` rows teaching the identity; names/authors: one value or (Chinese, English);
    flags: any IdentityArgs field (`contrast_rows=0`, `data_seed=7`, ...)."""
    as_list = lambda v: [v] if isinstance(v, str) else list(v)  # noqa: E731
    return build_identity(IdentityArgs(name=as_list(names), author=as_list(authors), lang=",".join(langs), **flags))[0]


def format_summary(manifest: dict) -> str:
    langs = manifest["langs"]
    lines = [f"{'kind':<12}" + "".join(f"{x:>6}" for x in langs) + f"{'total':>7}"]
    for kind, per in manifest["kinds"].items():
        lines.append(f"{kind:<12}" + "".join(f"{per.get(x, 0):>6}" for x in langs) + f"{sum(per.values()):>7}")
    lines.append(f"{'all':<12}" + "".join(f"{manifest['languages'].get(x, 0):>6}" for x in langs) + f"{manifest['rows']:>7}")
    lines.append("system prompts: " + ", ".join(f"{k} {v}" for k, v in manifest["system_prompts"].items())
                 + (f" (skipped: {', '.join(manifest['skipped_slots'])})" if manifest["skipped_slots"] else ""))
    lines.append("multi-turn rows by turn of the identity question: "
                 + ", ".join(f"{k}: {v}" for k, v in manifest["multi_turn"]["turns"].items())
                 + f"; loss on {'the identity answer only' if manifest['multi_turn']['loss'] == 'identity' else 'every answer'}")
    return "\n".join(lines)


CONFIGS = (IdentityArgs,)


def main(argv: list[str]):
    """keel data identity --name NAME --author AUTHOR [--system S] [--system_pool FILE] [--KIND_rows N] -o self_cognition.json"""
    argv = ["--output" if a == "-o" else a for a in argv]
    (args,) = parse_flags(argv, CONFIGS, prog="keel data identity",
                          description="Write an identity dataset (OpenAI messages rows).").configs
    out = Path(args.output)
    if not out.parent.is_dir():
        raise KeelError(f"-o {out}: folder {out.parent} does not exist")
    rows, manifest = build_identity(args)
    (write_jsonl if out.suffix.lower() == ".jsonl" else write_json)(out, rows)
    manifest_path = out.with_name(out.stem + ".manifest.json")
    write_json(manifest_path, manifest)
    print(format_summary(manifest))
    print(f"wrote {len(rows)} rows to {out} (manifest: {manifest_path})")
