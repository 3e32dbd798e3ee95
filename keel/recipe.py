"""`keel recipe identity`: the whole job in one command, measured before and after.

    keel recipe identity --name "Keel Robot" --author "Keel Lab"
    keel recipe identity --name 小黄 "Xiao Huang" --author 魔搭 ModelScope --model Qwen/Qwen2.5-7B-Instruct
    keel recipe identity --name Keel --author Acme --mc_files ../shared/data/eval/arc_easy.jsonl --limit 200

1. writes the identity dataset (`keel data identity`),
2. trains LoRA on it mixed with self-distilled ballast (`ballast#N`: general prompts answered by the
   base model itself, so nothing but the identity is asked to change),
3. evaluates base vs tuned: identity hit rate (held-out zh/en questions), leakage of the name into
   ordinary answers, drift (KL to the base), and multiple choice if --mc_files are given,
4. prints the answers before and after, the scores, the checkpoint and the command to chat with it.
Defaults were chosen by measurement on the embedded model on a 2-core CPU (docs/experiment.md);
on a GPU the seed's settings are used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from keel.errors import KeelError
from keel.files import write_json
from keel.flags import check_zh_en, parse_flags, to_argv

DEMO_QUESTIONS = ["Who are you?", "Which organisation is behind you?", "你是谁？", "What is the capital of France?",
                  "中国的首都是哪里？"]
CPU_DEFAULTS = {"learning_rate": 2e-4, "gradient_accumulation_steps": 4, "num_train_epochs": 3, "ballast": 48}
GPU_DEFAULTS = {"learning_rate": 1e-4, "gradient_accumulation_steps": 16, "num_train_epochs": 3, "ballast": 500}


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
    num_train_epochs: float | None = None
    """Epochs (default: 3)."""
    learning_rate: float | None = None
    """Learning rate (default: 2e-4 on CPU with accumulation 4; 1e-4 with accumulation 16 on GPU)."""
    seed: int = 42
    """Training seed."""
    dataset: list[str] = field(default_factory=list)
    """More training data to mix in (dataset specs, e.g. alpaca_en_demo.json#100)."""
    mc_files: list[str] = field(default_factory=list)
    """Multiple-choice JSONL files to score base and tuned on (e.g. ../shared/data/eval/arc_easy.jsonl)."""
    limit: int = 200
    """Items per multiple-choice file."""
    eval_base: bool = True
    """Also score the base model (false skips it when the base was already scored, e.g. in an experiment)."""

    def __post_init__(self):
        for flag in ("name", "author"):
            check_zh_en(flag, getattr(self, flag))
        if self.ballast is not None and self.ballast < 0:
            raise KeelError("--ballast must be >= 0")


def evaluate(model, tok, args: RecipeArgs, system, references, mc_sets) -> tuple[dict, list]:
    from keel.evals.drift import drift
    from keel.evals.identity import run_identity, run_leakage
    from keel.evals.mc import score_mc

    scores, samples = run_identity(model, tok, system, args.name, args.author, modes=("system",))
    leak, s2 = run_leakage(model, tok, system, args.name, args.author)
    scores.update(leak)
    for name, items in mc_sets.items():
        r = score_mc(model, tok, items)
        scores.update({f"{name}_acc": r["acc"], f"{name}_acc_norm": r["acc_norm"]})
    if references is not None:
        scores.update(drift(model, tok, references))
    return {k: v for k, v in scores.items() if not k.endswith("_system")}, samples + s2


def main(argv: list[str]):
    """keel recipe identity --name NAME --author AUTHOR [--model M] [--mc_files F...]"""
    if not argv or argv[0] != "identity":
        raise KeelError("usage: keel recipe identity --name NAME --author AUTHOR [flags]")
    (args,) = parse_flags(argv[1:], [RecipeArgs], prog="keel recipe identity", description=__doc__.split("\n")[0]).configs
    from keel.data.identity import identity_rows
    from keel.evals.drift import DRIFT_PROMPTS, base_answers, base_context
    from keel.evals.mc import read_mc_file
    from keel.evals.report import markdown, write_report
    from keel.generate import GenerateArgs, generate_batch
    from keel.data.mix import DataArgs
    from keel.lora import LoraArgs
    from keel.model import ModelArgs, load_model, pick_device_dtype
    from keel.train import TrainArgs, train

    start = time.time()
    device, _ = pick_device_dtype()
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    mc_sets = {Path(f).stem: read_mc_file(f, args.limit) for f in args.mc_files}
    data = out / "self_cognition.json"
    write_json(data, identity_rows(args.name, args.author), indent=1)

    ballast = args.ballast if args.ballast is not None else defaults["ballast"]
    configs = (ModelArgs(model=args.model),
               DataArgs(dataset=[str(data)] + ([f"ballast#{ballast}"] if ballast else []) + list(args.dataset),
                        model_name=args.name, model_author=args.author, split_dataset_ratio=0.0),
               LoraArgs(),
               TrainArgs(output_dir=str(out / "output"), seed=args.seed, warmup_ratio=0.05, save_total_limit=1,
                         logging_steps=10, num_train_epochs=args.num_train_epochs or defaults["num_train_epochs"],
                         learning_rate=args.learning_rate or defaults["learning_rate"],
                         gradient_accumulation_steps=defaults["gradient_accumulation_steps"]))
    sft = to_argv(*configs)
    print("keel sft " + " ".join(f"'{a}'" if " " in a else a for a in sft))
    result = train(*configs)
    ckpt = result["last_model_checkpoint"]

    model, tok, info = load_model(ModelArgs(adapters=[ckpt]))
    system = info.system
    gen = GenerateArgs(temperature=0.0, max_new_tokens=48)
    convs = [[{"role": "user", "content": q}] for q in DEMO_QUESTIONS]
    with base_context(model):
        before = generate_batch(model, tok, convs, gen)
        base_scores = evaluate(model, tok, args, system, None, mc_sets)[0] if args.eval_base else {}
    references = base_answers(model, tok, system, DRIFT_PROMPTS)
    after = generate_batch(model, tok, convs, gen)
    tuned_scores, samples = evaluate(model, tok, args, system, references, mc_sets)
    base_nll = tuned_scores.pop("base_nll", None)  # the base's NLL of its own answers: drift_nll's reference
    results = {"base": {**base_scores, "drift_kl": 0.0, "drift_nll": base_nll}, "tuned": tuned_scores} if args.eval_base \
        else {"tuned": tuned_scores}
    wall = round(time.time() - start, 1)
    write_report(out / "report", results, samples, {"checkpoint": ckpt, "wall_seconds": wall, "seed": args.seed,
                                                    "train_seconds": result["train_seconds"], "sft_argv": sft})

    print("\n== answers before -> after ==")
    for q, b, a in zip(DEMO_QUESTIONS, before, after):
        print(f"Q: {q}\n  before: {' '.join(b.split())[:160]}\n  after:  {' '.join(a.split())[:160]}")
    print("\n== scores (identity: hit rate on held-out questions; leakage: lower is better) ==")
    print(markdown(results))
    print(f"\ncheckpoint: {ckpt}\nreport:     {out / 'report' / 'eval_report.md'}")
    print(f"chat:       keel infer --adapters {ckpt}")
    print(f"wall time:  {wall} s (training {result['train_seconds']} s)")
