"""`keel eval`: the identity robustness matrix, leakage, multiple choice and drift; base vs tuned.

    keel eval --adapters output/v0-.../checkpoint-69
    keel eval --adapters CKPT --tasks identity,mc --mc_files ../shared/data/eval/arc_easy.jsonl \
        ../shared/data/eval/piqa.jsonl --limit 500
    keel eval --adapters CKPT --system_prompts my_server_prompts.txt     # more system-prompt cells
    keel eval --model Qwen/Qwen2.5-7B-Instruct --model_name 小黄 "Xiao Huang" --model_author 魔搭 ModelScope

Writes eval_report.json, eval_report.md and eval_report.png to --output_dir (default: a folder
eval-CHECKPOINT next to the checkpoint). With --adapters the base model (adapters disabled) is
evaluated too; its scores are cached, so a second checkpoint of the same base is quick.
`evaluate()` is the one place the tasks are run: `keel eval`, `keel recipe` and the experiment use it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from keel.core.errors import KeelError
from keel.core.files import write_json
from keel.evals import sets as probe_sets
from keel.evals.drift import base_answers, drift
from keel.evals.matrix import build_cells, run_leakage, run_matrix, template_view
from keel.evals.mc import count_requests, read_mc_file, score_mc
from keel.evals.progress import Progress
from keel.evals.report import card_scores, markdown, write_report
from keel.evals.scoring import Identity
from keel.evals.sets import LANGS, ProbeSets, load_sets
from keel.model.card import update_card
from keel.model.generate import GenerateArgs
from keel.model.load import ModelArgs, base_context, eval_mode

TASKS = ("identity", "leakage", "mc", "drift")
# Part of the base cache key: a base row scored under other rules or sets is scored again.
SCORING_VERSION = 2
# The base answers drift is measured on: a fixed length, so drift figures stay comparable across runs.
DRIFT_NEW_TOKENS = 48


@dataclass
class EvalArgs:
    tasks: str = "identity,leakage,mc,drift"
    """Comma-separated tasks: identity (the robustness matrix), leakage, mc, drift (each runs only if it has data)."""
    mc_files: list[str] = field(default_factory=list)
    """Multiple-choice JSONL files (query/choices/gold or context_options/continuation/gold), e.g. ../shared/data/eval/arc_easy.jsonl."""
    limit: int | None = None
    """Use only the first N items of each multiple-choice file."""
    output_dir: str | None = None
    """Where the report goes (default: eval-CHECKPOINT next to the checkpoint, else ./eval)."""
    model_name: list[str] = field(default_factory=list)
    """The identity's name(s) (default: from the adapter's args.json)."""
    model_author: list[str] = field(default_factory=list)
    """The identity's maker(s) (default: from the adapter's args.json)."""
    old_identity: list[str] = field(default_factory=list)
    """More words of an old identity that a hit must not claim (SmolLM, Qwen, ChatGPT, Alibaba Cloud... are built in)."""
    identity_file: str | None = None
    """More held-out identity questions (any dataset format; answers are ignored), asked in every cell."""
    leakage_file: str | None = None
    """More ordinary prompts for the leakage task (any dataset format; answers are ignored)."""
    system_prompts: str | None = None
    """More system prompts for the matrix: JSONL rows {"system", "id"} or a text file, one prompt a line."""
    system: str | None = None
    """The training system prompt (default: the adapter's; none saved means the template's default)."""
    batch_size: int = 16
    """Items per forward pass of multiple-choice scoring (each item's shared context once, its options after it;
    the output head only at the options' tokens)."""
    generate_batch_size: int = 32
    """Conversations answered together (identity, leakage, drift): larger batches answer faster, at more memory."""
    max_new_tokens: int = 32
    """Tokens generated per identity or leakage answer (a name comes within the first ~15; more tokens cost time)."""
    questions_per_cell: int | None = None
    """Ask only the first N questions of every matrix cell and language, reversal and pressure included (default: all;
    the recipe's CPU slice asks 4)."""
    leakage_per_lang: int | None = None
    """Ask only N ordinary prompts and N/3 questions about other AIs per language, spread over the set (default: all)."""

    def __post_init__(self):
        if not self.task_list():
            raise KeelError(f"--tasks: no task given (choose from {', '.join(TASKS)})")
        bad = [t for t in self.task_list() if t not in TASKS]
        if bad:
            raise KeelError(f"--tasks: unknown task '{bad[0]}' (choose from {', '.join(TASKS)})")
        for flag, ok in (("--limit", self.limit is None or self.limit >= 1), ("--batch_size", self.batch_size >= 1),
                         ("--questions_per_cell", self.questions_per_cell is None or self.questions_per_cell >= 1),
                         ("--leakage_per_lang", self.leakage_per_lang is None or self.leakage_per_lang >= 1),
                         ("--generate_batch_size", self.generate_batch_size >= 1),
                         ("--max_new_tokens", self.max_new_tokens >= 1)):
            if not ok:
                raise KeelError(f"{flag} must be >= 1")
        for flag in ("identity_file", "leakage_file", "system_prompts"):
            path = getattr(self, flag)
            if path and not Path(path).is_file():
                raise KeelError(f"--{flag}: '{path}' does not exist")

    def task_list(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]


@dataclass
class Evaluation:
    results: dict = field(default_factory=dict)   # row ("base", "tuned" or "model") -> flat scores
    details: dict = field(default_factory=dict)   # row -> matrix cells, worst cell, leak counts
    samples: list = field(default_factory=list)   # every answer, with its row
    seconds: dict = field(default_factory=dict)   # "row · task [set]" -> seconds
    notes: list = field(default_factory=list)
    template: dict = field(default_factory=dict)  # how "default" and "no system turn" render


def _score_row(model, tok, row: str, args: EvalArgs, ident: Identity, sets: ProbeSets, mc_sets: dict, cells,
               progress: Progress) -> tuple[dict, dict, list]:
    """One row's identity, leakage and multiple-choice scores (drift needs both rows: see evaluate)."""
    tasks, scores, details, samples = args.task_list(), {}, {}, []
    gen = GenerateArgs(temperature=0.0, max_new_tokens=args.max_new_tokens)
    if cells:
        with progress.bar(f"{row} · identity matrix", sum(len(c.items) for c in cells)) as step:
            s, smp, d = run_matrix(model, tok, cells, ident, gen, args.generate_batch_size, step)
        scores.update(s)
        details.update(d)
        samples.extend(smp)
    if "leakage" in tasks:
        with progress.bar(f"{row} · leakage", 2 * (len(sets.leakage) + len(sets.contrast))) as step:
            s, smp, d = run_leakage(model, tok, sets, ident, gen, args.generate_batch_size, step)
        scores.update(s)
        details.update(d)
        samples.extend(smp)
    for name, items in mc_sets.items():
        with progress.bar(f"{row} · mc {name} ({len(items)} items)", count_requests(items), unit="option") as step:
            r = score_mc(model, tok, items, args.batch_size, step)
        scores.update({f"{name}_acc": r["acc"], f"{name}_acc_norm": r["acc_norm"]}
                      | ({f"{name}_truncated": r["truncated"]} if r["truncated"] else {}))
    return scores, details, [{"row": row, **s} for s in samples]


def subset(sets: ProbeSets, args: EvalArgs) -> ProbeSets:
    """The leakage sets cut to --leakage_per_lang per language, every k-th prompt so all domains stay in."""
    if args.leakage_per_lang is None:
        return sets

    def spread(probes, n):
        out = []
        for lang in LANGS:
            mine = [p for p in probes if p.lang == lang]
            step = max(1, len(mine) // max(n, 1))
            out += mine[::step][:n]
        return out

    return dataclasses.replace(sets, leakage=spread(sets.leakage, args.leakage_per_lang),
                               contrast=spread(sets.contrast, max(1, args.leakage_per_lang // 3)))


def evaluate(model, tok, args: EvalArgs, ident: Identity, sets: ProbeSets | None = None, mc_sets: dict | None = None,
             base: bool | Path = True, progress: Progress | None = None) -> Evaluation:
    """Run every requested task: with adapters a "base" row (adapters off) and a "tuned" row, else a "model" row.

    base: True scores the base row; a path (base_cache()) reads it from there, or scores and keeps it
    there; False leaves it out. The base row's drift_kl is 0 and its drift_nll is the base model's NLL
    of its own answers: the reference the tuned drift_nll is read against.
    """
    tasks = args.task_list()
    has_base = hasattr(model, "disable_adapter")
    sets = subset(sets or load_sets(args.identity_file, args.leakage_file, args.system_prompts), args)
    if mc_sets is None:
        mc_sets = {Path(f).stem: read_mc_file(f, args.limit) for f in args.mc_files} if "mc" in tasks else {}
    progress = progress or Progress()
    ev = Evaluation()
    renders, ev.template = template_view(tok)
    cells = (build_cells(sets, ident, none_ok=renders is not None, per_lang=args.questions_per_cell)
             if "identity" in tasks else [])
    if ev.template["note"] and "identity" in tasks:
        ev.notes.append(ev.template["note"])
    if "identity" in tasks and ident.system is None:
        ev.notes.append("no training system prompt was saved: cell sys:train is the template's default")
    if "drift" in tasks and not has_base:
        ev.notes.append("drift skipped: it compares with a base model, which needs --adapters")
    cache = base if isinstance(base, Path) else None
    with eval_mode(model):
        if has_base and cache is not None and cache.is_file():
            saved = json.loads(cache.read_text(encoding="utf-8"))
            ev.results["base"], ev.details["base"], ev.samples = saved["scores"], saved["details"], saved["samples"]
            ev.notes.append(f"base row read from the cache {cache}")
        elif has_base and base:
            with base_context(model):
                ev.results["base"], ev.details["base"], ev.samples = _score_row(model, tok, "base", args, ident, sets,
                                                                                mc_sets, cells, progress)
            if cache is not None:  # kept before drift: drift's base figures come with the tuned row
                cache.parent.mkdir(parents=True, exist_ok=True)
                write_json(cache, {"scores": ev.results["base"], "details": ev.details["base"], "samples": ev.samples})
        row = "tuned" if has_base else "model"
        ev.results[row], ev.details[row], smp = _score_row(model, tok, row, args, ident, sets, mc_sets, cells,
                                                           progress)
        ev.samples += smp
        if "drift" in tasks and has_base:
            prompts = [p.query for p in sets.drift]
            with progress.bar("base · drift answers", len(prompts)) as step:
                references = base_answers(model, tok, ident.system, prompts, DRIFT_NEW_TOKENS, args.generate_batch_size,
                                          step)
            with progress.bar(f"{row} · drift", len(references)) as step:
                d = drift(model, tok, references, step)
            base_nll = d.pop("base_nll")
            ev.results[row].update(d)
            if "base" in ev.results:
                ev.results["base"].update({"drift_kl": 0.0, "drift_nll": base_nll})
    ev.seconds = dict(progress.seconds)
    return ev


def sets_digest() -> str:
    """The built-in probe sets' content, so an edited set is never answered from the cache."""
    h = hashlib.sha256()
    for path in sorted(probe_sets.SETS_DIR.glob("*.jsonl")):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def base_cache(model_path: str, args: EvalArgs, ident: Identity, mc_sets: dict) -> Path:
    """Where the base row of this base model, these flags, sets and rules is kept ($KEEL_CACHE/eval/)."""
    from keel.model.load import cache_root

    parts = [SCORING_VERSION, sets_digest(), model_path, args.task_list(), ident.names, ident.authors, ident.system,
             ident.old, args.limit, args.mc_files, {k: len(v) for k, v in mc_sets.items()}, args.identity_file,
             args.leakage_file, args.system_prompts, args.max_new_tokens, args.generate_batch_size,
             args.questions_per_cell, args.leakage_per_lang]
    key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    return cache_root() / "eval" / f"{key.hexdigest()[:16]}.json"


def machine() -> str:
    """The device the figures were measured on (they differ between CPUs of the same core count)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "CPU")
    except OSError:
        name = "CPU"
    return f"{name}, {len(os.sched_getaffinity(0))} CPU cores, {torch.get_num_threads()} torch threads"


def evaluated_folder(margs: ModelArgs) -> tuple[Path | None, str]:
    """The artifact folder whose model card gets the figures (the last adapter, or the --model folder or GGUF's
    folder), and how it was run; update_card writes only where Keel wrote a card."""
    if margs.adapters:
        return Path(margs.adapters[-1]), "on this adapter (base: the same model with the adapter disabled)"
    path = Path(margs.model).expanduser() if margs.model else None
    if path is not None and path.is_file():
        return path.parent, f"on {path.name}, dequantized and run by transformers"
    return (path, "on this folder") if path is not None and path.is_dir() else (None, "")


CONFIGS = (ModelArgs, EvalArgs)


def main(argv: list[str]):
    """keel eval --adapters CKPT [--tasks identity,leakage,mc,drift] [--mc_files F...] [--limit N]"""
    from keel.core.flags import parse_flags
    from keel.model.load import load_model

    margs, args = parse_flags(argv, CONFIGS, prog="keel eval", description=__doc__.split("\n")[0]).configs
    tasks = args.task_list()
    # Probe and multiple-choice files are read before the model loads: a bad line fails in a second.
    sets = load_sets(args.identity_file, args.leakage_file, args.system_prompts)
    mc_sets = {Path(f).stem: read_mc_file(f, args.limit) for f in args.mc_files} if "mc" in tasks else {}
    model, tok, info = load_model(margs)
    names = args.model_name or info.model_name or []
    authors = args.model_author or info.model_author or []
    if ("identity" in tasks or "leakage" in tasks) and not (names or authors):
        raise KeelError("identity and leakage need the identity: the adapter has no saved model_name/model_author; "
                        "pass --model_name and --model_author (or --tasks mc,drift)")
    ident = Identity(names, authors, args.system if args.system is not None else info.system, args.old_identity)
    start = time.time()
    ev = evaluate(model, tok, args, ident, sets, mc_sets, base=base_cache(info.path, args, ident, mc_sets))
    if args.output_dir:
        out_dir = Path(args.output_dir)
    elif margs.adapters:
        ckpt = Path(margs.adapters[-1]).resolve()
        out_dir = ckpt.parent / f"eval-{ckpt.name}"
    else:
        out_dir = Path("eval")
    meta = {"model": info.as_dict(), "tasks": tasks, "limit": args.limit, "mc_files": args.mc_files,
            "seconds": round(time.time() - start, 1), "seconds_per_task": ev.seconds, "machine": machine(),
            "model_name": names, "model_author": authors, "system": ident.system, "template": ev.template,
            "notes": ev.notes, "max_new_tokens": args.max_new_tokens}
    meta = write_report(out_dir, ev.results, ev.samples, meta, ev.details)
    folder, measured_on = evaluated_folder(margs)
    if folder is not None and update_card(folder, scores=card_scores(ev.results, meta, out_dir, measured_on)):
        print(f"model card: {folder / 'README.md'} has these figures")
    print(markdown(ev.results, ev.details))
    if "identity" in tasks and ev.template.get("none"):
        print("\nno system turn, as rendered for the 'none' cell:\n" + ev.template["none"].rstrip())
    for note in ev.notes:
        print(f"note: {note}")
    print(f"\nreport: {out_dir / 'eval_report.md'} ({meta['seconds']} s on {meta['machine']})")
