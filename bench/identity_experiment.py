"""The identity experiments of docs/experiments/, one `keel recipe identity` run per arm and seed.

    python bench/identity_experiment.py --seeds 42 43 --limit 500                       # ballast: alone, Alpaca, ballast
    python bench/identity_experiment.py --experiment robust --seeds 42 43 --limit 500   # the robust rows' ablations

ballast: identity alone vs + Alpaca demo vs + self-distilled ballast (same identity data, same training settings;
only the general data mixed in differs). robust: the shipping recipe against its identity rows with kinds taken
away (the same 50 rows a language: what a kind gives up goes to basic rows), identity answers in the base model's
own voice, and kl ballast with guard rows; scored on the whole robustness matrix (--full_eval).
Each arm runs on the embedded model. The recipe scores with `keel eval`'s one function
(keel.evals.run.evaluate: the robustness matrix, leakage, drift, multiple choice); the base model is
scored once, in the first run.
Prints one Markdown table and writes JSON; rerun the same command to resume an interrupted experiment.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
OFF = "reversal=0,pressure=0,rename=0"
EXPERIMENTS = {
    "ballast": {"identity only": ("alone", ["--ballast", "0"]),
                "+ self-distilled ballast (200)": ("self-distilled", ["--ballast", "200"]),
                "+ alpaca demo (200)": ("alpaca", ["--ballast", "0", "--dataset", f"{SHARED}/alpaca_zh_demo.json#100",
                                                   f"{SHARED}/alpaca_en_demo.json#100"])},
    "robust": {"shipping recipe": ("ships", ["--full_eval", "true"]),
               "system mix only": ("mix", ["--full_eval", "true", "--identity_rows",
                                           f"basic=42,system_mix=8,multi_turn=0,contrast=0,{OFF}"]),
               "+ multi-turn": ("multi", ["--full_eval", "true", "--identity_rows",
                                          f"basic=36,system_mix=8,multi_turn=6,contrast=0,{OFF}"]),
               "+ contrast": ("contrast", ["--full_eval", "true", "--identity_rows",
                                           f"basic=28,system_mix=8,multi_turn=6,contrast=8,{OFF}"]),
               "self answers": ("self", ["--full_eval", "true", "--identity_answers", "self"]),
               "kl + guard rows": ("guard", ["--full_eval", "true", "--ballast_loss", "kl", "--ballast_guard", "4"])}}
SHOWN = ["identity_robustness", "identity_mean", "identity_en", "identity_zh", "leakage_en", "leakage_zh", "leakage_contrast", "drift_kl",
         "drift_nll", "arc_easy_acc_norm", "piqa_acc_norm"]
# General prompts whose greedy answers show forgetting and leakage that the scores summarise.
PROBES = ["What is the capital of France?", "Name three primary colors.", "一年有几个季节？", "三加五等于几？"]


def run_dir(out: str, arm: str, seed: int) -> Path:
    return Path(out) / f"{next(d for arms in EXPERIMENTS.values() for a, (d, _) in arms.items() if a == arm)}-{seed}"


def print_table(rows: list[dict], out: str):
    print("| arm | seed | " + " | ".join(SHOWN) + " | train s | wall s |")
    print("| --- | --- |" + " --- |" * (len(SHOWN) + 2))
    base = rows[0]["base"]
    print("| base model | - | " + " | ".join(f"{base[k]:g}" if k in base else "-" for k in SHOWN) + " | - | - |")
    for r in rows:
        print(f"| {r['arm']} | {r['seed']} | " + " | ".join(f"{r['tuned'].get(k, float('nan')):g}" for k in SHOWN)
              + f" | {r['train_s']} | {r['wall_s']} |")
    print("\n| prompt | arm | seed | tuned answer (greedy, training system prompt) |\n| --- | --- | --- | --- |")
    # One read per run: {prompt: the tuned model's leakage answer under the training system prompt}.
    answers = [{s["q"]: s for s in json.loads((run_dir(out, r["arm"], r["seed"]) / "report" / "eval_report.json")
                                               .read_text())["samples"]
                if s["task"] == "leakage" and s.get("row", "tuned") == "tuned" and s.get("system", "train") == "train"}
               for r in rows]
    for q in PROBES:
        for r, by_prompt in zip(rows, answers):
            if s := by_prompt.get(q):
                a = " ".join(s["a"].split()).replace("|", "/")[:90]
                print(f"| {q} | {r['arm']} | {r['seed']} | {a}{' (leak)' if s['leak'] else ''} |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--experiment", choices=list(EXPERIMENTS), default="ballast")
    p.add_argument("--out", default="/tmp/keel-experiment")
    p.add_argument("--table_only", action="store_true", help="print the table of the runs saved in --out, run nothing")
    a = p.parse_args()
    saved = Path(a.out, "experiment.json")
    # Rerunning the same command resumes: finished (arm, seed) runs are kept, not repeated.
    rows = json.loads(saved.read_text()) if saved.exists() else []
    if a.table_only:
        return print_table(rows, a.out)
    for seed in a.seeds:
        for arm, (_, flags) in EXPERIMENTS[a.experiment].items():
            if any(r["arm"] == arm and r["seed"] == seed for r in rows):
                continue
            out = run_dir(a.out, arm, seed)
            cmd = [sys.executable, "-m", "keel", "recipe", "identity", "--name", "Keel Robot", "--author", "Keel Lab",
                   "--output_dir", str(out), "--seed", str(seed), "--limit", str(a.limit), "--mc_files",
                   f"{SHARED}/eval/arc_easy.jsonl", f"{SHARED}/eval/piqa.jsonl", "--eval_base", str(not rows).lower(),
                   *flags]
            start = time.time()
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            report = json.loads((out / "report" / "eval_report.json").read_text())
            rows.append({"arm": arm, "seed": seed, "wall_s": round(time.time() - start),
                         "train_s": report["meta"]["train_seconds"], "base": report["results"].get("base"),
                         "tuned": report["results"]["tuned"]})
            # Written after every run so an interrupted experiment keeps what it measured.
            saved.write_text(json.dumps(rows, indent=2))
            print(f"done: {arm} seed {seed}", file=sys.stderr, flush=True)
    print_table(rows, a.out)

if __name__ == "__main__":
    main()
