"""DPO vs SFT on the same rows: `keel rlhf --rlhf_type dpo` over pairs vs `keel sft` over both answers.

    python bench/rlhf_bench.py                       # embedded model, 48 identity pairs, 2 epochs, CPU
    python bench/rlhf_bench.py --model PATH --pairs 16 --epochs 1

The pairs are identity rows (chosen) with another row's answer as rejected (lengths as real pairs
have); SFT trains on each pair's two conversations as two rows, which is what a DPO step's forward
and backward cover. Each tool runs in its own child process (peak RSS is per run), same model, LoRA,
batch, accumulation and seed, no evaluation, final checkpoint only. Prints seconds per pair (training
loop only; the DPO process also runs its one reference pass), wall time per process, peak RSS and
the DPO/SFT ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
argv = {argv!r}
t0 = time.time()
if {tool!r} == "sft":
    from keel.train.sft import parse_args, train as run
else:
    from keel.train.rlhf import parse_args, rlhf as run
result = run(*parse_args(argv))
print("RESULT " + json.dumps({{**result, "wall": time.time() - t0}}))
"""


def make_data(workdir: Path, n: int) -> tuple[Path, Path, int]:
    sys.path.insert(0, str(ROOT))
    from keel.data.identity import identity_rows

    rows = [r for r in identity_rows(["Keel Robot"], ["Keel Lab"], langs=("en",)) if len(r["messages"]) <= 3]
    pairs, sft = [], []
    for i, r in enumerate(rows[:n]):
        # the next row with another answer (rows next to each other can share one; a pair needs two)
        other = next(x["messages"][-1]["content"] for x in rows[i + 1:] + rows[:i]
                     if x["messages"][-1]["content"] != r["messages"][-1]["content"])
        pairs.append({"messages": r["messages"], "rejected_response": other})
        sft += [{"messages": r["messages"]}, {"messages": r["messages"][:-1] + [{"role": "assistant", "content": other}]}]
    (workdir / "pairs.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    (workdir / "sft.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in sft))
    return workdir / "pairs.jsonl", workdir / "sft.jsonl", len(pairs)


def run(tool: str, data: Path, out: Path, common: list[str]) -> dict:
    argv = ["--dataset", str(data), "--output_dir", str(out), *common]
    if tool == "sft":  # two rows per pair: twice the rows per step for the same pairs per step
        i = argv.index("--per_device_train_batch_size") + 1
        argv[i] = str(2 * int(argv[i]))
    proc = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), argv=argv, tool=tool)],
                          capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{tool} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(line[7:])
    log = [json.loads(x) for x in (Path(result["run_dir"]) / "logging.jsonl").read_text().splitlines()]
    result["peak_rss_gb"] = max(r.get("memory", 0) for r in log)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="default: the embedded model")
    p.add_argument("--pairs", type=int, default=48)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pairs, sft, n = make_data(work, args.pairs)
        common = ["--num_train_epochs", str(args.epochs), "--per_device_train_batch_size", "1",
                  "--gradient_accumulation_steps", "4", "--split_dataset_ratio", "0", "--save_steps", "100000",
                  "--logging_steps", "1", "--seed", "1"] + (["--model", args.model] if args.model else [])
        results = {}
        for tool, data in (("sft", sft), ("dpo", pairs)):
            t0 = time.time()
            results[tool] = run(tool, data, work / tool, common)
            results[tool]["process_seconds"] = round(time.time() - t0, 1)
    per_pair = {t: r["train_seconds"] / (n * args.epochs) for t, r in results.items()}
    print(f"{n} pairs x {args.epochs} epochs, model {args.model or 'embedded'}")
    print(f"{'tool':<5} {'s/pair (loop)':>14} {'wall s (process)':>17} {'peak RSS GB':>12}")
    for tool, r in results.items():
        print(f"{tool:<5} {per_pair[tool]:>14.3f} {r['process_seconds']:>17.1f} {r['peak_rss_gb']:>12.3f}")
    print(f"DPO/SFT: time per pair x{per_pair['dpo'] / per_pair['sft']:.2f}, "
          f"peak RSS x{results['dpo']['peak_rss_gb'] / results['sft']['peak_rss_gb']:.2f} "
          "(DPO's wall time also holds its one reference pass)")


if __name__ == "__main__":
    main()
