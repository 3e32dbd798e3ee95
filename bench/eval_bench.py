"""Multiple-choice scoring side by side: Keel's `score_mc` vs lm-evaluation-harness, same model object, one invocation.

    pip install -e '.[bench]'                          # lm-eval, for this benchmark only
    python bench/eval_bench.py                         # arc_easy and piqa, 500 items each, the embedded model
    OMP_NUM_THREADS=1 python bench/eval_bench.py --limit 100      # the parity check
    python bench/eval_bench.py --sets arc_easy --limit 20         # a smoke run

Both score the same items of /work/shared/data/eval/*.jsonl (the first --limit rows) with the same
model object (loaded once by keel.model.load.load_model, handed to the harness's HFLM as `pretrained`),
the same zero-shot prompt "QUERY\\nAnswer:" + " CHOICE" (a local task YAML written here, in the
harness's format) and the same acc / acc_norm definitions. Printed per set: acc and acc_norm of
each and their difference in points (parity: within 0.5), the largest difference of a single
option's log-likelihood, and items/s of each with Keel's ratio. The harness's time is that of its
loglikelihood calls only (task and dataset building excluded, in its favour); Keel's is score_mc.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")   # the task reads a local file; never the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EVAL_DATA = ROOT.parent / "shared" / "data" / "eval"

# The harness's form of Keel's prompt (keel/evals/mc.py options()): context "QUERY\nAnswer:", continuation " CHOICE".
TASK_YAML = """task: keel_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query.rstrip()}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def run_harness(lm, name: str, limit: int, tasks_dir: Path) -> dict:
    """acc, acc_norm, per-option log-likelihoods (doc order) and the seconds spent in loglikelihood calls."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    spent = [0.0]
    original = lm.loglikelihood

    def timed(requests, *a, **kw):
        start = time.perf_counter()
        try:
            return original(requests, *a, **kw)
        finally:
            spent[0] += time.perf_counter() - start

    lm.loglikelihood = timed
    try:
        out = simple_evaluate(model=lm, tasks=[f"keel_{name}"], task_manager=TaskManager(include_path=str(tasks_dir)),
                              limit=limit, log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                              torch_random_seed=0, fewshot_random_seed=0)
    finally:
        lm.loglikelihood = original
    res = out["results"][f"keel_{name}"]
    samples = sorted(out["samples"][f"keel_{name}"], key=lambda s: s["doc_id"])
    lls = [float(r[0][0]) for s in samples for r in s["resps"]]
    return {"acc": res["acc,none"], "acc_norm": res["acc_norm,none"], "seconds": spent[0], "lls": lls,
            "n": len(samples)}


def work_ratio(model, tok, items: list[dict]) -> float:
    """The harness's matmul work over Keel's on these items: the speed-up Keel would reach at equal efficiency.

    The harness feeds every option with its context and runs the output head at every position; Keel feeds
    what an item's options share once and runs the head only where a continuation is scored. Attention
    scores are left out (small at these lengths).
    """
    import torch

    from keel.evals.mc import layout, model_window, requests

    head_module = model.get_output_embeddings()
    head = head_module.weight.numel()
    body = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head_module)
    reqs = requests(tok, items)
    seqs, _ = layout(reqs, model_window(model))
    harness = sum(len(ctx) + len(cont) - 1 for _, _, ctx, cont in reqs) * (body + head)
    heads = sum(len({t for _, where, _ in s["score"] for t in where}) for s in seqs)  # a shared position runs once
    keel = sum(len(s["ids"]) for s in seqs) * body + heads * head
    return harness / keel


def run_keel(model, tok, path: Path, limit: int, batch_size: int, max_tokens: int) -> dict:
    from keel.evals.mc import count_requests, loglikelihoods, read_mc_file, requests, score_mc
    from keel.evals.progress import Progress

    items = read_mc_file(str(path), limit=limit)
    start = time.perf_counter()
    with Progress().bar(f"keel · mc {path.stem} ({len(items)} items)", count_requests(items), unit="choice") as step:
        r = score_mc(model, tok, items, batch_size=batch_size, max_tokens=max_tokens, step=step)
    seconds = time.perf_counter() - start
    lls, _ = loglikelihoods(model, tok, requests(tok, items), max_tokens, batch_size)   # untimed: for the comparison
    return {"acc": r["acc"], "acc_norm": r["acc_norm"], "seconds": seconds, "lls": lls, "n": r["n"],
            "truncated": r["truncated"], "work_ratio": work_ratio(model, tok, items)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="arc_easy,piqa", help="names of /work/shared/data/eval/NAME.jsonl")
    ap.add_argument("--limit", type=int, default=500, help="first N items of each set")
    ap.add_argument("--harness_batch_size", type=int, default=16, help="HFLM batch_size (requests per forward)")
    ap.add_argument("--batch_size", type=int, default=64, help="Keel: items per forward pass at most")
    ap.add_argument("--max_tokens", type=int, default=2048, help="Keel: tokens per forward pass (padding included)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    import torch
    from lm_eval.models.huggingface import HFLM

    from keel.model.load import ModelArgs, load_model

    model, tok, info = load_model(ModelArgs())
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.harness_batch_size, device=str(model.device),
              add_bos_token=False)   # Keel encodes MC text without special tokens; this tokenizer adds none anyway
    with torch.no_grad():                                               # warm-up, outside both timings
        model(torch.tensor([tok("Question: warm up\nAnswer: yes")["input_ids"] * 8]))
    machine = {"cpu": cpu_model(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
               "load_avg_1m": os.getloadavg()[0], "torch": torch.__version__}
    results = {"machine": machine, "model": info.name, "limit": args.limit, "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
            path = EVAL_DATA / f"{name}.jsonl"
            if not path.is_file():
                raise SystemExit(f"bench: {path} does not exist")
            (Path(tmp) / f"keel_{name}.yaml").write_text(TASK_YAML.format(name=name, path=path))
            harness = run_harness(lm, name, args.limit, Path(tmp))
            keel = run_keel(model, tok, path, args.limit, args.batch_size, args.max_tokens)
            if len(harness["lls"]) != len(keel["lls"]):
                raise SystemExit(f"bench: {name}: the harness scored {len(harness['lls'])} options, Keel {len(keel['lls'])}")
            max_diff = max(abs(a - b) for a, b in zip(harness["lls"], keel["lls"]))
            results["sets"][name] = {
                "n": keel["n"], "truncated": keel["truncated"], "max_ll_diff": max_diff, "work_ratio": keel["work_ratio"],
                **{f"{tool}_{k}": r[k] for tool, r in (("harness", harness), ("keel", keel))
                   for k in ("acc", "acc_norm", "seconds")}}
    print(f"\nmultiple choice, {info.name}, first {args.limit} items per set; cpu: {machine['cpu']} x {machine['cpus']}, "
          f"torch threads {machine['threads']}, load avg {machine['load_avg_1m']:.2f}")
    print("| set | tool | items | acc | acc_norm | s | items/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    parity = True
    for name, r in results["sets"].items():
        for tool in ("harness", "keel"):
            print(f"| {name} | {tool} | {r['n']} | {r[f'{tool}_acc']:.4f} | {r[f'{tool}_acc_norm']:.4f} | "
                  f"{r[f'{tool}_seconds']:.1f} | {r['n'] / r[f'{tool}_seconds']:.2f} |")
        d_acc = 100 * (r["keel_acc"] - r["harness_acc"])
        d_norm = 100 * (r["keel_acc_norm"] - r["harness_acc_norm"])
        r["speedup"] = r["harness_seconds"] / r["keel_seconds"]
        r["parity"] = abs(d_acc) <= 0.5 and abs(d_norm) <= 0.5
        parity &= r["parity"]
        print(f"| {name} | **keel / harness** | | {d_acc:+.2f} pt | {d_norm:+.2f} pt | | **{r['speedup']:.2f}x** "
              f"(work {r['work_ratio']:.2f}x less) |")
    for name, r in results["sets"].items():
        print(f"{name}: largest |log-likelihood difference| over {r['n']} items' options {r['max_ll_diff']:.2e}; "
              f"truncated contexts {r['truncated']}; acc within 0.5 pt: {'yes' if r['parity'] else 'NO'}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0 if parity else 1


if __name__ == "__main__":
    raise SystemExit(main())
