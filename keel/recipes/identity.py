"""`keel recipe identity`: the whole job in one command, measured before and after.

    keel recipe identity --name "Keel Robot" --author "Keel Lab"
    keel recipe identity --name 小黄 "Xiao Huang" --author 魔搭 ModelScope --model Qwen/Qwen2.5-7B-Instruct
    keel recipe identity --name Keel --author Acme --mc_files ../shared/data/eval/arc_easy.jsonl --limit 200

1. writes the identity dataset (`keel data identity`: the identity under a mix of system prompts, in
   later turns, reversed, under pressure, and contrast rows about other AIs; --identity_rows sizes the kinds;
   with --identity_answers self, the answers are the base model's own where it states the identity when told it),
2. trains LoRA on it mixed with self-distilled ballast (`ballast#N`: general prompts answered by the
   base model itself under the same mix of system prompts, so nothing but the identity is asked to
   change), with the neutral training system prompt --system as the tuned model's default,
3. evaluates base vs tuned with `keel eval`'s one function: the identity robustness matrix (held-out
   zh/en questions under many system prompts, turn depths, reversal and pressure; headline = the
   lowest cell), leakage of the name into ordinary answers, drift (KL to the base), and multiple
   choice if --mc_files are given,
   (with --stage2 dpo, then `keel rlhf --rlhf_type dpo` from that checkpoint on identity pairs whose
   rejected answer is the base model's own, and guard pairs (the contrast, rename and ballast rows, whose rejected
   answer is the identity's self-introduction) (`keel data identity --pairs --ballast N`), written to
   OUTPUT_DIR/identity_pairs.jsonl),
4. prints the answers before and after, the scores, the checkpoint and the command to chat with it.
Defaults were chosen by measurement on the embedded model on a 2-core CPU (docs/recipe.md), and serve that
model on any device; a model you pass gets the ms-swift seed's settings on a GPU.
"""

from __future__ import annotations

import dataclasses
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from keel.core.errors import KeelError
from keel.core.files import write_json, write_jsonl
from keel.core.flags import check_zh_en, parse_flags, to_argv
from keel.data.identity import KINDS, Builder, IdentityArgs
from keel.data.mix import DataArgs
from keel.evals.mc import read_mc_file
from keel.evals.report import card_scores, markdown, write_report
from keel.evals.run import EvalArgs, base_cache, evaluate, machine
from keel.evals.scoring import Identity
from keel.model.card import update_card
from keel.model.generate import GenerateArgs, generate_batch
from keel.model.load import ModelArgs, base_context, load_model, load_tokenizer, pick_device_dtype, resolve_model_path
from keel.model.lora import LoraArgs
from keel.model.template import default_system
from keel.synth.identity_pairs import IdentityPairsArgs, identity_pairs
from keel.synth.self_answers import self_answers
from keel.train.args import SftArgs, TrainArgs, check_ballast_loss
from keel.train.rlhf import RlhfArgs, rlhf
from keel.train.sft import train

# None of the demo's questions is a probe set's (keel/evals/sets/: the report scores those), and the maker is asked
# as no training row asks it (keel/data/identity_qa.json), so the demo shows whether the maker generalised.
MAKER_QUESTION = "Which company trained the model I'm talking to?"
DEMO_QUESTIONS = ["Who are you?", MAKER_QUESTION, "你是谁？", "What is the capital of Italy?", "意大利的首都是哪里？"]
# Identity rows per language and kind (keel data identity): on CPU about half of the builder's defaults,
# so the demo stays within its time budget; on GPU the full set (docs/recipe.md).
CPU_IDENTITY = {"basic_rows": 16, "system_mix_rows": 8, "multi_turn_rows": 6, "reversal_rows": 4, "pressure_rows": 6,
                "contrast_rows": 8, "rename_rows": 2}
# The report's evaluation on CPU: 4 questions per matrix cell and 24 ordinary prompts per language (keel eval
# asks 12 and 54), a quarter of the time; --full_eval true asks everything.
CPU_DEFAULTS = {"learning_rate": 2e-4, "gradient_accumulation_steps": 4, "num_train_epochs": 3, "ballast": 48,
                "ballast_loss": "ce+kl", "ballast_guard": 0.0,
                "identity": CPU_IDENTITY,
                "eval": {"questions_per_cell": 4, "leakage_per_lang": 24}}
# ms-swift's self-cognition seed for a 7B model on one GPU (lr 1e-4, accumulation 16), with 500 ballast rows and
# the builder's full identity set: for a model you pass, on a GPU. The embedded model learns nothing at these
# settings (docs/recipe.md), so it keeps CPU_DEFAULTS everywhere.
GPU_DEFAULTS = {"learning_rate": 1e-4, "gradient_accumulation_steps": 16, "num_train_epochs": 3, "ballast": 500,
                "ballast_loss": "ce+kl", "ballast_guard": 0.0, "identity": {}, "eval": {}}
STAGES = ("none", "dpo")
ANSWERS = ("written", "self")


def recipe_defaults(device_type: str, model: str | None) -> dict:
    """The recipe's settings: the measured ones (CPU_DEFAULTS) on a CPU and for the embedded model (model None)
    anywhere; the seed's (GPU_DEFAULTS) for a model you pass, on a GPU. A GPU asks the whole evaluation."""
    if device_type != "cuda":
        return CPU_DEFAULTS
    return {**(CPU_DEFAULTS if model is None else GPU_DEFAULTS), "eval": {}}


@dataclass
class RecipeArgs:
    name: list[str] = field(default_factory=list)
    """The new name: one value, or two (Chinese, English)."""
    author: list[str] = field(default_factory=list)
    """The new maker: one value, or two (Chinese, English)."""
    model: str | None = None
    """Base model (default: the embedded SmolLM2-135M-Instruct)."""
    output_dir: str = "keel-identity"
    """Where the data, the run and the report go."""
    ballast: int | None = None
    """Self-distilled general rows mixed in (default: 48 on CPU, 500 on GPU; 0 for identity only)."""
    ballast_loss: str | None = None
    """How the ballast rows are learned (keel sft --ballast_loss: ce, kl or ce+kl; default ce+kl; docs/recipe.md)."""
    ballast_guard: float | None = None
    """Guard rows at this weight: ordinary prompts on which the identity's self-introduction is learned as unlikely
    (keel sft --ballast_guard; default 0, none; docs/recipe.md)."""
    num_train_epochs: float | None = None
    """Epochs (default: 3)."""
    learning_rate: float | None = None
    """Learning rate (default: 2e-4 on CPU with accumulation 4; 1e-4 with accumulation 16 on GPU)."""
    seed: int = 42
    """Training seed."""
    system: str = "You are a helpful assistant."
    """Training system prompt, and the tuned model's default one (adapter, merged and GGUF exports). It names no
    identity on purpose: the identity is learned as the model's own, not as something its system prompt says."""
    dataset: list[str] = field(default_factory=list)
    """More training data to mix in (dataset specs, e.g. alpaca_en_demo.json#100)."""
    mc_files: list[str] = field(default_factory=list)
    """Multiple-choice JSONL files to score base and tuned on (e.g. ../shared/data/eval/arc_easy.jsonl)."""
    limit: int = 200
    """Items per multiple-choice file."""
    eval_base: bool = True
    """Also score the base model (false skips it when the base was already scored, e.g. in an experiment)."""
    full_eval: bool = False
    """Ask the whole robustness matrix and leakage set, as keel eval does (on CPU the recipe asks a slice by default)."""
    identity_rows: str = ""
    """Identity rows per language and kind (keel data identity's kinds), e.g. 'contrast=0,basic=24', over the recipe's
    sizes (CPU_IDENTITY on a CPU and for the embedded model; keel data identity's defaults for a model you pass on a GPU)."""
    identity_answers: str = "written"
    """Answers of the rows that teach the identity: written (Keel's, identity_qa.json), or self: the base model's own,
    asked with the identity in its system prompt and kept where they state it (context distillation,
    keel/synth/self_answers.py; the written answer stays where it does not); trained without that system prompt."""
    stage2: str = "none"
    """After SFT: none, or dpo (keel rlhf --rlhf_type dpo --beta 0.1 --rpo_alpha 1.0, 1 epoch at 5e-5, from the SFT
    checkpoint, on identity pairs whose rejected answer is the base model's own, and guard pairs: the contrast, rename
    and ballast rows, whose rejected answer is the identity's self-introduction); docs/preference.md."""

    def __post_init__(self):
        for flag in ("name", "author"):
            check_zh_en(flag, getattr(self, flag))
        if self.ballast is not None and self.ballast < 0:
            raise KeelError("--ballast must be >= 0")
        if self.ballast_loss is not None:
            check_ballast_loss(self.ballast_loss)
        self.identity_sizes()  # a bad --identity_rows fails here, before anything runs
        if self.identity_answers not in ANSWERS:
            raise KeelError(f"--identity_answers must be written or self, got '{self.identity_answers}'")
        if self.stage2 not in STAGES:
            raise KeelError(f"--stage2 must be none or dpo, got '{self.stage2}'")

    def identity_sizes(self) -> dict[str, int]:
        """--identity_rows as {"KIND_rows": N}."""
        sizes = {}
        for item in filter(None, (x.strip() for x in self.identity_rows.split(","))):
            kind, _, n = item.partition("=")
            if kind.strip() not in KINDS or not n.strip().isdigit():
                raise KeelError(f"--identity_rows takes KIND=N items (N >= 0; kinds: {', '.join(KINDS)}), got '{item}'")
            sizes[f"{kind.strip()}_rows"] = int(n)
        return sizes


CONFIGS = (RecipeArgs,)


def run_stage2(args: RecipeArgs, identity, ckpt: str, train_args: TrainArgs, ballast: int) -> dict:
    """--stage2 dpo: identity pairs for the same identity rows (rejected = the base model's greedy answer) and
    guard pairs for the rows that must not carry the identity (the SFT run's ballast rows among them), then keel
    rlhf's DPO continuing the SFT adapter (the reference is that adapter, before any step). Returns the report's
    stage-2 record; its checkpoint is None when no identity pair survived (SFT's is kept)."""
    # The base model is loaded here and freed on return, so it never sits beside rlhf's own copy.
    pairs, manifest = identity_pairs(identity, IdentityPairsArgs(pairs=True, model=args.model, ballast=ballast))
    record = {"type": "dpo", "pairs": len(pairs), "identity_pairs": manifest["identity_pairs"],
              "guard_pairs": manifest["guard_pairs"], "dropped": manifest["dropped"], "checkpoint": None,
              "train_seconds": 0.0}
    if not pairs:  # no identity pair survived (and then no guard pairs either)
        print("stage 2 skipped: no identity pairs (" + ", ".join(f"{k}: {v}" for k, v in manifest["dropped"].items())
              + "); keeping the SFT checkpoint")
        return record
    path = Path(args.output_dir) / "identity_pairs.jsonl"
    write_jsonl(path, pairs)
    configs = (ModelArgs(model=args.model, adapters=[ckpt]),
               DataArgs(dataset=[str(path)], model_name=args.name, model_author=args.author, split_dataset_ratio=0.0,
                        system=args.system),
               LoraArgs(),
               dataclasses.replace(train_args, num_train_epochs=1, learning_rate=5e-5),  # the SFT run's other settings
               RlhfArgs(rlhf_type="dpo", beta=0.1, rpo_alpha=1.0))
    argv = to_argv(*configs)
    print(f"stage 2: {manifest['identity_pairs']} identity + {manifest['guard_pairs']} guard pairs -> {path}")
    print("keel rlhf " + shlex.join(argv))
    result = rlhf(*configs)
    return {**record, "checkpoint": result["last_model_checkpoint"], "train_seconds": result["train_seconds"],
            "rlhf_argv": argv}


def build_rows(args: RecipeArgs, defaults: dict, out: Path) -> tuple[IdentityArgs, Path, dict]:
    """Step 1: the identity rows (`keel data identity`; with --identity_answers self, the base model's own answers
    where they state the identity), written to OUTPUT_DIR/self_cognition.json. Returns (identity, file, answers)."""
    # The template's own default system prompt stays one of the training conditions although --system replaces it.
    template = default_system(load_tokenizer(resolve_model_path(args.model)[0]))
    identity = IdentityArgs(name=args.name, author=args.author, system=args.system, template_system=template,
                            data_seed=args.seed, **{**defaults["identity"], **args.identity_sizes()})
    rows, tags = Builder(identity).build()
    answers = {"type": args.identity_answers}
    if args.identity_answers == "self":
        base, tok, _ = load_model(ModelArgs(model=args.model))
        rows, manifest = self_answers(rows, tags, base, tok, args.name, args.author)
        answers |= manifest
        del base  # training loads its own copy
        print(f"identity answers in the base model's voice: {answers['kept']} of {answers['asked']} kept; written "
              "answers kept for the rest (" + ", ".join(f"{k}: {v}" for k, v in answers["dropped"].items()) + ")")
    data = out / "self_cognition.json"
    write_json(data, rows, indent=1)
    return identity, data, answers


def sft_configs(args: RecipeArgs, defaults: dict, data: Path, ballast: int, out: Path) -> tuple:
    """Step 2's flags: the identity rows mixed with ballast#N, keel sft's dataclasses at the recipe's settings."""
    return (ModelArgs(model=args.model),
            DataArgs(dataset=[str(data)] + ([f"ballast#{ballast}"] if ballast else []) + list(args.dataset),
                     model_name=args.name, model_author=args.author, split_dataset_ratio=0.0, system=args.system),
            LoraArgs(),
            TrainArgs(output_dir=str(out / "output"), seed=args.seed, warmup_ratio=0.05, save_total_limit=1,
                      logging_steps=10, num_train_epochs=args.num_train_epochs or defaults["num_train_epochs"],
                      learning_rate=args.learning_rate or defaults["learning_rate"],
                      gradient_accumulation_steps=defaults["gradient_accumulation_steps"]),
            SftArgs(ballast_loss=args.ballast_loss or defaults["ballast_loss"],
                    ballast_guard=defaults["ballast_guard"] if args.ballast_guard is None else args.ballast_guard))


def report(args: RecipeArgs, defaults: dict, ckpt: str, mc_sets: dict, out: Path, meta: dict, start: float) -> tuple:
    """Step 4: the demo questions before and after, and `keel eval`'s scores for base and tuned, written to
    OUTPUT_DIR/report. Returns (answers before, answers after, evaluation)."""
    model, tok, info = load_model(ModelArgs(adapters=[ckpt]))
    gen = GenerateArgs(temperature=0.0, max_new_tokens=48)
    convs = [[{"role": "user", "content": q}] for q in DEMO_QUESTIONS]
    with base_context(model):
        before = generate_batch(model, tok, convs, gen)
    after = generate_batch(model, tok, convs, gen)
    eval_args = EvalArgs(mc_files=args.mc_files, limit=args.limit, **({} if args.full_eval else defaults["eval"]))
    ident = Identity(args.name, args.author, info.system)
    # The base row depends on the base model and the identity only: a second run reads it from keel eval's cache.
    ev = evaluate(model, tok, eval_args, ident, mc_sets=mc_sets,
                  base=base_cache(info.path, eval_args, ident, mc_sets) if args.eval_base else False)
    meta = {"checkpoint": ckpt, "wall_seconds": round(time.time() - start, 1), **meta, "machine": machine(),
            "model_name": args.name, "model_author": args.author, "system": info.system,
            "seconds_per_task": ev.seconds, "notes": ev.notes, "template": ev.template}
    meta = write_report(out / "report", ev.results, ev.samples, meta, ev.details)
    update_card(Path(ckpt), recipe_command="keel recipe identity " + shlex.join(to_argv(args)),
                scores=card_scores(ev.results, meta, out / "report", "on this adapter, by the recipe's evaluation "
                                   "(base: the same model with the adapter disabled)"))
    return before, after, ev, meta["wall_seconds"]


def print_summary(before: list[str], after: list[str], ev, ckpt: str, out: Path, stage2: dict, wall: float,
                  train_seconds: float):
    print("\n== answers before -> after ==")
    for q, b, a in zip(DEMO_QUESTIONS, before, after):
        print(f"Q: {q}\n  before: {' '.join(b.split())[:160]}\n  after:  {' '.join(a.split())[:160]}")
    print("\n== scores (identity_robustness: the lowest cell of the matrix; leakage: lower is better) ==")
    print(markdown(ev.results, ev.details))
    print(f"\ncheckpoint: {ckpt}\nreport:     {out / 'report' / 'eval_report.md'}")
    print(f"chat:       keel infer --adapters {ckpt}")
    if stage2["type"] != "none":
        print(f"stage 2:    {stage2['type']} on {stage2['identity_pairs']} identity + {stage2['guard_pairs']} guard pairs "
              f"({stage2['train_seconds']} s)"
              if stage2["checkpoint"] else "stage 2:    skipped (no identity pairs): the checkpoint is SFT's")
    print(f"wall time:  {wall} s (training {train_seconds} s)")


def recipe(args: RecipeArgs):
    """The recipe, top to bottom: identity rows, SFT with ballast, optional DPO stage, the before/after report."""
    start = time.time()
    device, _ = pick_device_dtype()
    defaults = recipe_defaults(device.type, args.model)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    mc_sets = {Path(f).stem: read_mc_file(f, args.limit) for f in args.mc_files}  # a bad file fails before training

    identity, data, answers = build_rows(args, defaults, out)
    ballast = args.ballast if args.ballast is not None else defaults["ballast"]
    configs = sft_configs(args, defaults, data, ballast, out)
    sft_argv = to_argv(*configs)
    print("keel sft " + shlex.join(sft_argv))
    result = train(*configs)
    ckpt, stage2 = result["last_model_checkpoint"], {"type": "none"}
    if args.stage2 == "dpo":
        stage2 = run_stage2(args, identity, ckpt, configs[3], ballast)
        ckpt = stage2["checkpoint"] or ckpt

    meta = {"seed": args.seed, "train_seconds": result["train_seconds"], "sft_argv": sft_argv, "stage2": stage2,
            "identity_answers": answers}
    before, after, ev, wall = report(args, defaults, ckpt, mc_sets, out, meta, start)
    print_summary(before, after, ev, ckpt, out, stage2, wall, result["train_seconds"])


def main(argv: list[str]):
    """keel recipe identity --name NAME --author AUTHOR [--model M] [--mc_files F...]"""
    if not argv or argv[0] != "identity":
        raise KeelError("usage: keel recipe identity --name NAME --author AUTHOR [flags]")
    recipe(*parse_flags(argv[1:], list(CONFIGS), prog="keel recipe identity", description=__doc__.split("\n")[0]).configs)
