"""Side-by-side training benchmark: `keel sft` vs a plain transformers Trainer + peft baseline.

    python bench/train_bench.py                 # identity, mixed and seed50x10 jobs, embedded model, CPU
    python bench/train_bench.py --quick         # a smoke run (few rows)
    python bench/train_bench.py --jobs identity --out bench/results.json

Both tools run the same job in their own child process (so wall time includes start-up and model
load, and peak RSS is per tool): same model, rows, rendering and label masking, LoRA config,
batch, accumulation, max_length and epochs. Prints one table with Keel/baseline ratios and an
achieved FLOP/s figure against a matmul peak measured in this run; writes the results as JSON.
Where the CPU has native bf16 (AVX-512 BF16 or AMX), Keel also runs with `--cpu_autocast_bf16 true`
(bf16 frozen weights), against the same fp32 baseline (`--bf16 false` skips it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
N_PARAMS = 134_515_008  # SmolLM2-135M; every matmul of the forward, including the (tied) output head


def job_specs(quick: bool, workdir: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from keel.data.identity import identity_rows

    ident = workdir / "self_cognition.json"
    rows = identity_rows(["Keel Robot"], ["Keel Lab"])
    ident.write_text(json.dumps(rows[:24] if quick else rows, ensure_ascii=False), encoding="utf-8")
    seed_ident = workdir / "self_cognition_50.json"
    seed_ident.write_text(json.dumps(rows[:12] if quick else rows[:50], ensure_ascii=False), encoding="utf-8")
    n = 8 if quick else 100
    return {
        "identity": {"dataset": [str(ident)], "epochs": 1 if quick else 3, "max_length": 2048},
        # the seed's pure identity run at the size: 50 rows x 10 epochs (target: <= 3 min wall)
        "seed50x10": {"dataset": [str(seed_ident)], "epochs": 2 if quick else 10, "max_length": 2048},
        "mixed": {"dataset": [f"{SHARED}/alpaca_zh_demo.json#{n}", f"{SHARED}/alpaca_en_demo.json#{n}", str(ident)],
                  "epochs": 1, "max_length": 512},
    }


def run_child(cmd: list[str], env: dict) -> tuple[dict, float]:
    """Run a child; return its last JSON line (it reports its own peak RSS) and the wall seconds."""
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    out, err = proc.communicate()
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench: child failed: {' '.join(cmd[:4])}...\n{err[-3000:]}")
    line = [x for x in out.splitlines() if x.startswith("{")][-1]
    return json.loads(line), wall


def keel_cmd(spec: dict, batch: int, accum: int, outdir: Path, extra: list[str]) -> list[str]:
    argv = ["--dataset", *spec["dataset"], "--num_train_epochs", str(spec["epochs"]), "--per_device_train_batch_size",
            str(batch), "--gradient_accumulation_steps", str(accum), "--learning_rate", "1e-4", "--max_length",
            str(spec["max_length"]), "--warmup_ratio", "0.05", "--split_dataset_ratio", "0", "--output_dir", str(outdir),
            "--model_name", "Keel Robot", "--model_author", "Keel Lab", "--logging_steps", "1000", *extra]
    code = ("import json, resource, sys, time; t=time.time(); from keel.train.sft import parse_args, train; r=train(*parse_args(sys.argv[1:])); "
            "print(json.dumps({'train_seconds': r['train_seconds'], "
            "'peak_rss_gb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1e6, 3)}))")
    return [sys.executable, "-c", code, *argv]


def baseline_cmd(spec: dict, batch: int, accum: int) -> list[str]:
    return [sys.executable, str(ROOT / "bench" / "baseline_trainer.py"), "--dataset", *spec["dataset"], "--epochs",
            str(spec["epochs"]), "--batch", str(batch), "--accum", str(accum), "--max_length", str(spec["max_length"])]


def token_counts(spec: dict) -> tuple[int, int]:
    """Non-padding tokens and label tokens the job trains on (rows x epochs)."""
    from keel.data.mix import DataArgs, build_datasets
    from keel.model.load import ModelArgs, base_model_spec, load_tokenizer, resolve_model_path
    from keel.model.template import IGNORE_INDEX

    tok = load_tokenizer(resolve_model_path(base_model_spec(ModelArgs()))[0])
    train, _, _ = build_datasets(DataArgs(dataset=spec["dataset"], split_dataset_ratio=0, max_length=spec["max_length"],
                                          model_name=["Keel Robot"], model_author=["Keel Lab"]), tok)
    tokens = sum(len(ids) for ids, _ in train)
    labels = sum(sum(x != IGNORE_INDEX for x in lab) for _, lab in train)
    return int(tokens * spec["epochs"]), int(labels * spec["epochs"])


def cpu_info() -> tuple[str, set]:
    """CPU model name and flags: figures differ between CPUs of the same core count."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown", set()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    return name, set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))


def cpu_model() -> str:
    name, flags = cpu_info()
    extras = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(extras) or 'no AVX2'})"


def matmul_peak() -> dict:
    import torch

    out = {}
    # Without AVX-512 BF16 or AMX, bf16 matmuls are emulated and one 2048^3 product takes minutes.
    native_bf16 = bool(cpu_info()[1] & {"avx512_bf16", "amx_bf16"})
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if dtype == torch.bfloat16 and not native_bf16:
            continue
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        torch.matmul(a, b)
        start, n = time.time(), 0
        while time.time() - start < 2.0:
            torch.matmul(a, b)
            n += 1
        out[name] = 2 * 2048 ** 3 * n / (time.time() - start)
    return out


def main():
    p = argparse.ArgumentParser(description="Keel vs Trainer+peft, same jobs, one invocation.")
    p.add_argument("--quick", action="store_true", help="a smoke run on a few rows")
    p.add_argument("--jobs", default="identity,mixed,seed50x10")
    p.add_argument("--batch", type=int, default=1, help="per-device batch (the seed uses 1)")
    p.add_argument("--accum", type=int, default=16, help="gradient accumulation (the seed uses 16)")
    p.add_argument("--keel_flags", default="", help="extra keel sft flags, e.g. '--packing_length 128'")
    p.add_argument("--bf16", choices=["auto", "true", "false"], default="auto",
                   help="also run Keel with --cpu_autocast_bf16 true (auto: when this CPU has native bf16)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    a = p.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    sys.path.insert(0, str(ROOT))
    load = os.getloadavg()[0]
    peak = matmul_peak()
    keel_arms = {"keel": a.keel_flags.split()}
    if a.bf16 == "true" or (a.bf16 == "auto" and "bf16" in peak):  # the baseline stays fp32: Trainer's CPU default
        keel_arms["keel_bf16"] = a.keel_flags.split() + ["--cpu_autocast_bf16", "true"]
    suffix = {tool: tool[len("keel"):] for tool in keel_arms}  # the ratio keys: speedup_tokens_per_s, ..._bf16
    results = {"machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "load_avg_1m_at_start": load,
                           "matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in peak.items()}},
               "settings": {"batch": a.batch, "accum": a.accum, "keel_flags": a.keel_flags, "quick": a.quick}, "jobs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        specs = job_specs(a.quick, Path(tmp))
        for job in [j.strip() for j in a.jobs.split(",") if j.strip()]:
            spec = specs[job]
            tokens, labels = token_counts(spec)
            row = {"tokens": tokens, "label_tokens": labels}
            arms = [(tool, keel_cmd(spec, a.batch, a.accum, Path(tmp) / f"out-{job}-{tool}", flags))
                    for tool, flags in keel_arms.items()] + [("baseline", baseline_cmd(spec, a.batch, a.accum))]
            for tool, cmd in arms:
                print(f"bench: {job} / {tool} ...", file=sys.stderr, flush=True)
                child, wall = run_child(cmd, env)
                tps = tokens / child["train_seconds"]
                row[tool] = {"wall_s": round(wall, 1), "train_s": child["train_seconds"], "tokens_per_s": round(tps, 1),
                             "peak_rss_gb": child["peak_rss_gb"],
                             "pct_of_fp32_peak": round(100 * 4 * N_PARAMS * tps / peak["fp32"], 1)}
            for tool in keel_arms:
                row["speedup_tokens_per_s" + suffix[tool]] = round(row[tool]["tokens_per_s"] / row["baseline"]["tokens_per_s"], 2)
                row["rss_ratio" + suffix[tool]] = round(row[tool]["peak_rss_gb"] / row["baseline"]["peak_rss_gb"], 2)
            results["jobs"][job] = row
    Path(a.out).write_text(json.dumps(results, indent=2))
    print(f"\ncpu: {results['machine']['cpu']} x {os.cpu_count()}")
    bf16 = f"{peak['bf16'] / 1e9:.0f} GFLOP/s" if "bf16" in peak else "not native on this CPU"
    print(f"matmul peak here: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {bf16}; "
          f"load average at start {load:.2f}; FLOPs counted as 4 x {N_PARAMS:,} x tokens (forward 2N, backward to "
          "activations 2N; frozen weights get no weight gradient)")
    print(f"{'job':<9} {'tool':<9} {'wall s':>7} {'train s':>8} {'tokens':>8} {'labels':>7} {'tok/s':>7} {'peak RSS':>9} {'% peak':>7}")
    for job, row in results["jobs"].items():
        for tool in [*keel_arms, "baseline"]:
            r = row[tool]
            print(f"{job:<9} {tool:<9} {r['wall_s']:>7} {r['train_s']:>8} {row['tokens']:>8} {row['label_tokens']:>7} "
                  f"{r['tokens_per_s']:>7} {r['peak_rss_gb']:>8}G {r['pct_of_fp32_peak']:>6}%")
        for tool in keel_arms:
            print(f"{job:<9} {tool + '/b':<9} {'':>7} {'':>8} {'':>8} {'':>7} {row['speedup_tokens_per_s' + suffix[tool]]:>6}x "
                  f"{row['rss_ratio' + suffix[tool]]:>8}x")
    print(f"results: {a.out}")


if __name__ == "__main__":
    main()
