"""`keel eval`: identity hit rate, leakage, multiple choice and drift, base vs tuned.

    keel eval --adapters output/v0-.../checkpoint-69
    keel eval --adapters CKPT --tasks identity,mc --mc_files ../shared/data/eval/arc_easy.jsonl \
        ../shared/data/eval/piqa.jsonl --limit 500
    keel eval --model Qwen/Qwen2.5-7B-Instruct --model_name 小黄 "Xiao Huang" --model_author 魔搭 ModelScope

Writes eval_report.json, eval_report.md and eval_report.png to --output_dir (default: a folder
eval-CHECKPOINT next to the checkpoint). With --adapters the base model (adapters disabled) is
evaluated too; its scores are cached, so a second checkpoint of the same base is quick.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from keel.files import write_json
from keel.data.formats import load_records
from keel.errors import KeelError
from keel.evals.drift import DRIFT_PROMPTS, base_answers, base_context, drift
from keel.evals.identity import OLD_IDENTITY, run_identity, run_leakage
from keel.evals.mc import read_mc_file, score_mc
from keel.evals.report import markdown, write_report
from keel.flags import parse_flags
from keel.model import ModelArgs, cache_root, load_model

TASKS = ("identity", "leakage", "mc", "drift")


@dataclass
class EvalArgs:
    tasks: str = "identity,leakage,mc,drift"
    """Comma-separated tasks: identity, leakage, mc, drift (each runs only if it has data)."""
    mc_files: list[str] = field(default_factory=list)
    """Multiple-choice JSONL files (query, choices, gold), e.g. ../shared/data/eval/arc_easy.jsonl."""
    limit: int | None = None
    """Use only the first N items of each multiple-choice file."""
    output_dir: str | None = None
    """Where the report goes (default: eval-CHECKPOINT next to the checkpoint, else ./eval)."""
    model_name: list[str] = field(default_factory=list)
    """The identity's name(s) (default: from the adapter's args.json)."""
    model_author: list[str] = field(default_factory=list)
    """The identity's maker(s) (default: from the adapter's args.json)."""
    old_identity: list[str] = field(default_factory=list)
    """More words of the old identity that a hit must not mention (SmolLM, Qwen, Alibaba Cloud... are built in)."""
    identity_file: str | None = None
    """More held-out identity questions (any dataset format; answers are ignored)."""
    leakage_file: str | None = None
    """More ordinary prompts for the leakage task (any dataset format; answers are ignored)."""
    system: str | None = None
    """System prompt (default: the adapter's training system prompt)."""
    batch_size: int = 16
    """Sequences per forward pass."""

    def __post_init__(self):
        bad = [t for t in self.task_list() if t not in TASKS]
        if bad:
            raise KeelError(f"--tasks: unknown task '{bad[0]}' (choose from {', '.join(TASKS)})")
        if self.limit is not None and self.limit < 1:
            raise KeelError("--limit must be >= 1")
        for f in (self.identity_file, self.leakage_file):
            if f and not Path(f).is_file():
                raise KeelError(f"'{f}' does not exist")

    def task_list(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]


def user_prompts(path: str) -> list[str]:
    return [r["messages"][[m["role"] for m in r["messages"]].index("user")]["content"] for r in load_records(path)]


def run_tasks(model, tok, args: EvalArgs, names, authors, system, mc_sets, references, samples: list) -> dict:
    """One model's scores on every requested task."""
    tasks, out = args.task_list(), {}
    if "identity" in tasks:
        questions = None
        if args.identity_file:
            from keel.evals.identity import HELD_OUT
            questions = {**HELD_OUT, "file": user_prompts(args.identity_file)}
        scores, s = run_identity(model, tok, system, names, authors, OLD_IDENTITY + args.old_identity, questions)
        out.update(scores)
        samples += s
    if "leakage" in tasks:
        from keel.evals.identity import LEAKAGE
        prompts = [p for ps in LEAKAGE.values() for p in ps] + (user_prompts(args.leakage_file) if args.leakage_file else [])
        scores, s = run_leakage(model, tok, system, names, authors, prompts)
        out.update(scores)
        samples += s
    for name, items in mc_sets.items():
        scores = score_mc(model, tok, items, args.batch_size)
        out.update({f"{name}_acc": scores["acc"], f"{name}_acc_norm": scores["acc_norm"]})
    if references:
        out.update(drift(model, tok, references))
    return out


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def main(argv: list[str]):
    """keel eval --adapters CKPT [--tasks identity,leakage,mc,drift] [--mc_files F...] [--limit N]"""
    margs, args = parse_flags(argv, [ModelArgs, EvalArgs], prog="keel eval", description=__doc__.split("\n")[0]).configs
    tasks = args.task_list()
    mc_sets = {Path(f).stem: read_mc_file(f, args.limit) for f in args.mc_files} if "mc" in tasks else {}
    model, tok, info = load_model(margs)
    names = args.model_name or info.model_name or []
    authors = args.model_author or info.model_author or []
    if ("identity" in tasks or "leakage" in tasks) and not (names or authors):
        raise KeelError("identity and leakage need the identity: the adapter has no saved model_name/model_author; "
                        "pass --model_name and --model_author (or --tasks mc,drift)")
    system = args.system if args.system is not None else info.system
    start = time.time()
    results, samples = {}, []
    if margs.adapters:
        key = cache_key(info.path, tasks, names, authors, system, args.old_identity, args.limit,
                        {k: len(v) for k, v in mc_sets.items()}, args.mc_files, args.identity_file, args.leakage_file)
        cached = cache_root() / "eval" / f"{key}.json"
        if cached.is_file():
            results["base"] = json.loads(cached.read_text())
        else:
            with base_context(model):
                results["base"] = run_tasks(model, tok, args, names, authors, system, mc_sets, None, [])
            results["base"].update({"drift_kl": 0.0} if "drift" in tasks else {})
            cached.parent.mkdir(parents=True, exist_ok=True)
            write_json(cached, results["base"])
    references = base_answers(model, tok, system, DRIFT_PROMPTS) if "drift" in tasks and margs.adapters else None
    results["tuned" if margs.adapters else "model"] = run_tasks(model, tok, args, names, authors, system, mc_sets,
                                                                references, samples)
    if references:  # the base's NLL of its own answers: drift_nll's reference
        results["base"]["drift_nll"] = results["tuned"].pop("base_nll")
    if args.output_dir:
        out_dir = Path(args.output_dir)
    elif margs.adapters:
        ckpt = Path(margs.adapters[-1]).resolve()
        out_dir = ckpt.parent / f"eval-{ckpt.name}"
    else:
        out_dir = Path("eval")
    meta = {"model": info.as_dict(), "tasks": tasks, "limit": args.limit, "mc_files": args.mc_files,
            "seconds": round(time.time() - start, 1), "model_name": names, "model_author": authors, "system": system}
    write_report(out_dir, results, samples, meta)
    print(markdown(results))
    print(f"report: {out_dir / 'eval_report.json'} ({meta['seconds']} s)")
