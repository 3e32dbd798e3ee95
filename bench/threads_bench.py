"""Two Keel processes on one machine: each one's speed alone and side by side, under three thread settings.

    python bench/threads_bench.py                      # train, eval, generate; alone and in pairs; 30 s windows
    python bench/threads_bench.py --seconds 5 --settings default,split     # a smoke run

Workloads (each a child process with the embedded model, timed over the same window once every
child has loaded and warmed up, so side-by-side runs overlap for the whole window):
- train: LoRA training steps as keel sft runs them (256-token packed passes, backward, AdamW) -> tokens/s
- eval: multiple-choice scoring of ARC-Easy items with keel.evals.mc.score_mc -> items/s
- serve: greedy answers one at a time, as the server gives them (transformers generate) -> tokens/s
Settings: `default` (what Keel does today: torch's threads, one per core, OpenMP's default wait
policy), `passive` (OMP_WAIT_POLICY=PASSIVE: idle threads sleep instead of spinning), `split`
(--num_threads = cores / number of processes), `split+passive`. Printed: each workload's rate alone,
beside train (train's rate beside it too) and the share of its lone rate (target: >= 40% each).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVAL_FILE = ROOT.parent / "shared" / "data" / "eval" / "arc_easy.jsonl"
PAIRS = [("train",), ("eval",), ("serve",), ("train", "eval"), ("train", "serve")]


def child(kind: str, seconds: float, num_threads: int | None):
    """Load, warm up, say ready, wait for 'go' on stdin, work for `seconds`, print one JSON line."""
    sys.path.insert(0, str(ROOT))
    import torch

    from keel.model.load import ModelArgs, load_model

    model, tok, _ = load_model(ModelArgs(num_threads=num_threads))
    if kind == "train":
        from keel.model.lora import LoraArgs, apply_lora, use_cheap_dropout

        model = apply_lora(model, LoraArgs())
        use_cheap_dropout(model)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ids = torch.randint(100, 40000, (1, 256), generator=torch.Generator().manual_seed(0))   # (1, 256)

        def work():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return ids.numel()
    elif kind == "eval":
        from keel.evals.mc import read_mc_file, score_mc

        items, at = read_mc_file(str(EVAL_FILE), limit=400), [0]

        def work():
            batch = items[at[0] % 400:at[0] % 400 + 8]
            at[0] += 8
            score_mc(model, tok, batch)
            return len(batch)
    else:
        from keel.model.template import prompt_ids

        prompt = torch.tensor([prompt_ids(tok, [{"role": "user", "content": "Tell me about the history of Paris."}])])

        def work():  # no early end: every answer is 32 tokens
            with torch.inference_mode():
                out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                                     min_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
            return out.shape[1] - prompt.shape[1]
    work()                                                    # warm-up
    print("ready", flush=True)
    sys.stdin.readline()
    start, units = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        units += work()
    elapsed = time.perf_counter() - start
    print(json.dumps({"kind": kind, "rate": units / elapsed, "threads": torch.get_num_threads()}), flush=True)


def run_together(kinds: tuple, setting: str, seconds: float) -> dict:
    """Start one child per kind under `setting`; once all are ready, start their windows together."""
    cpus = os.cpu_count() or 1
    env = {**os.environ}
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY"):
        env.pop(var, None)                                    # each setting starts from torch's defaults
    if "passive" in setting:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    cmd = [sys.executable, __file__, "--child", "", "--seconds", str(seconds)]
    if "split" in setting:
        cmd += ["--num_threads", str(max(1, cpus // len(kinds)))]
    procs = []
    for kind in kinds:
        c = list(cmd)
        c[3] = kind
        procs.append(subprocess.Popen(c, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      text=True, env=env, cwd=ROOT))
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            raise SystemExit(f"bench: a {kinds} child failed under {setting}")
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    out = {}
    for kind, p in zip(kinds, procs):
        line = p.stdout.readline()
        p.wait()
        out[kind] = json.loads(line)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="timed window per run")
    ap.add_argument("--settings", default="default,passive,split,split+passive")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--num_threads", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, args.seconds, args.num_threads)

    sys.path.insert(0, str(ROOT))
    from bench.eval_bench import cpu_model

    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    results = {"machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
               "seconds": args.seconds, "runs": {}}
    for setting in settings:
        for kinds in PAIRS:
            results["runs"][f"{setting}|{'+'.join(kinds)}"] = run_together(kinds, setting, args.seconds)
    units = {"train": "tok/s", "eval": "items/s", "serve": "tok/s"}
    m = results["machine"]
    print(f"\ntwo processes on one machine; cpu: {m['cpu']} x {m['cpus']}, {args.seconds:.0f} s windows, "
          f"load avg at start {m['load_avg_1m']:.2f}")
    print("| setting | workload | threads | alone | beside train | share of alone | train beside it | train's share |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    base = results["runs"]
    for setting in settings:
        train_alone = base[f"{setting}|train"]["train"]["rate"]
        for other in ("eval", "serve"):
            alone = base[f"{setting}|{other}"][other]
            pair = base[f"{setting}|train+{other}"]
            print(f"| {setting} | {other} | {alone['threads']} / {pair[other]['threads']} | {alone['rate']:.2f} "
                  f"{units[other]} | {pair[other]['rate']:.2f} | {pair[other]['rate'] / alone['rate']:.0%} | "
                  f"{pair['train']['rate']:.1f} tok/s | {pair['train']['rate'] / train_alone:.0%} |")
        print(f"| {setting} | train | {base[f'{setting}|train']['train']['threads']} | {train_alone:.1f} tok/s | | | | |")
    if "default" in settings:
        ref = base["default|train"]["train"]["rate"]
        for setting in settings:
            print(f"{setting}: train alone at {base[f'{setting}|train']['train']['rate'] / ref:.2f}x the default's rate")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
