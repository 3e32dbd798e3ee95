"""Probe sets: the questions `keel eval` asks, read from JSONL files shipped in keel/evals/sets/.

    sets = load_sets(identity_file=None, leakage_file=None, system_prompts=None)
    sets.identity    # [Probe(lang="en", query="Identify yourself."), ...]

One file per set, one JSON object a line (docs/evaluation.md lists them):

| file | fields | what |
| --- | --- | --- |
| identity.jsonl | lang, query | held-out identity questions |
| reversal.jsonl | lang, query (with {{NAME}}), expect (author or self) | the name given, the model asked about it |
| pressure.jsonl | lang, query | the user insists on an old identity |
| system_prompts.jsonl | id, system (lang) | system prompts of the matrix beside train/default/none |
| exchanges.jsonl | lang, query, response | ordinary turns put before the question (turn depth) |
| leakage.jsonl | lang, domain, query | ordinary prompts: the new identity must not show up |
| contrast.jsonl | lang, query | questions about other AIs and companies |
| drift.jsonl | lang, query | prompts whose base answers measure drift |

Every eval question is held out: tests/test_evals_sets.py checks that none equals or nearly
equals a user turn written by `keel data identity`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from keel.core.errors import KeelError
from keel.core.text import lang_of
from keel.data.formats import parse_jsonl, read_text, user_prompts

SETS_DIR = Path(__file__).parent / "sets"
LANGS = ("en", "zh")
# Fields of each set: required ones, then optional ones.
FIELDS = {"identity": (("lang", "query"), ()), "reversal": (("lang", "query", "expect"), ()),
          "pressure": (("lang", "query"), ()), "system_prompts": (("id", "system"), ("lang",)),
          "exchanges": (("lang", "query", "response"), ()), "leakage": (("lang", "domain", "query"), ()),
          "contrast": (("lang", "query"), ()), "drift": (("lang", "query"), ())}
EXPECT = ("author", "self")


@dataclass
class Probe:
    lang: str
    query: str
    expect: str = ""      # reversal only: what a hit must say ("author": names the maker; "self": it is itself)
    domain: str = ""      # leakage only
    response: str = ""    # exchanges only


@dataclass
class ProbeSets:
    identity: list[Probe]
    reversal: list[Probe]
    pressure: list[Probe]
    systems: dict[str, str]          # id -> system prompt
    exchanges: dict[str, list[Probe]]  # lang -> ordinary exchanges, in order
    leakage: list[Probe]
    contrast: list[Probe]
    drift: list[Probe]
    sources: dict[str, str] = field(default_factory=dict)  # set -> file(s) it came from


def read_set(path: str | Path, name: str, flag: str | None = None) -> list[dict]:
    """Rows of one probe-set file; a bad line is a one-line error naming file, line and field."""
    required, optional = FIELDS[name]
    label = f"{flag} {path}" if flag else str(path)
    text = read_text(path)
    rows = []
    for n, row in parse_jsonl(text, label):
        if not isinstance(row, dict):
            raise KeelError(f"{label}: line {n}: each line must be a JSON object")
        for key in required + optional:
            value = row.get(key)
            if value is None and key in optional:
                continue
            if not isinstance(value, str) or not value.strip():
                raise KeelError(f"{label}: line {n}: field '{key}' must be a non-empty string")
        if "lang" in row and row["lang"] not in LANGS:
            raise KeelError(f"{label}: line {n}: field 'lang' must be en or zh, got {row['lang']!r}")
        if name == "reversal" and (row["expect"] not in EXPECT or "{{NAME}}" not in row["query"]):
            raise KeelError(f"{label}: line {n}: a reversal row needs {{{{NAME}}}} in 'query' and 'expect' "
                            f"one of {', '.join(EXPECT)}")
        rows.append(row)
    if not rows:
        raise KeelError(f"{label}: the file holds no rows")
    return rows


def probes(rows: list[dict]) -> list[Probe]:
    return [Probe(lang=r["lang"], query=r["query"].strip(), expect=r.get("expect", ""), domain=r.get("domain", ""),
                  response=r.get("response", "")) for r in rows]


def read_system_prompts(path: str) -> dict[str, str]:
    """--system_prompts FILE: JSONL rows {"system": ..., "id": optional}, or plain text, one prompt a line."""
    flag = "--system_prompts"
    if Path(path).suffix.lower() in (".jsonl", ".json"):
        out = {}
        for n, row in parse_jsonl(read_text(path), f"{flag} {path}"):
            if not isinstance(row, dict) or not isinstance(row.get("system"), str) or not row["system"].strip():
                raise KeelError(f"{flag} {path}: line {n}: each line must be an object with a non-empty 'system' string")
            key = str(row.get("id") or f"file{len(out) + 1}")
            out[key] = row["system"].strip()
    else:
        lines = [line.strip() for line in read_text(path).splitlines()]
        out = {f"file{i + 1}": s for i, s in enumerate(x for x in lines if x)}
    if not out:
        raise KeelError(f"{flag} {path}: the file holds no system prompts")
    return out


def load_sets(identity_file: str | None = None, leakage_file: str | None = None,
              system_prompts: str | None = None) -> ProbeSets:
    """The built-in sets, plus the user's files (their language read from the text)."""
    rows = {name: read_set(SETS_DIR / f"{name}.jsonl", name) for name in FIELDS}
    sets = ProbeSets(identity=probes(rows["identity"]), reversal=probes(rows["reversal"]),
                     pressure=probes(rows["pressure"]), systems={r["id"]: r["system"] for r in rows["system_prompts"]},
                     exchanges={lang: [p for p in probes(rows["exchanges"]) if p.lang == lang] for lang in LANGS},
                     leakage=probes(rows["leakage"]), contrast=probes(rows["contrast"]), drift=probes(rows["drift"]),
                     sources={name: str(SETS_DIR / f"{name}.jsonl") for name in FIELDS})
    if identity_file:
        sets.identity += [Probe(lang_of(q), q) for q in user_prompts(identity_file, "--identity_file")]
        sets.sources["identity"] += f" + {identity_file}"
    if leakage_file:
        sets.leakage += [Probe(lang_of(q), q, domain="file") for q in user_prompts(leakage_file, "--leakage_file")]
        sets.sources["leakage"] += f" + {leakage_file}"
    if system_prompts:
        for key, text in read_system_prompts(system_prompts).items():
            if key in sets.systems or key in ("train", "default", "none"):
                raise KeelError(f"--system_prompts {system_prompts}: id '{key}' is already taken; choose another id")
            sets.systems[key] = text
        sets.sources["system_prompts"] += f" + {system_prompts}"
    return sets
