"""Batched greedy generation: Keel's loop (`keel.generate.generate_batch`) vs transformers' `generate`, one invocation.

    python bench/gen_bench.py                         # 64 eval prompts, batch 16, 32 new tokens, the embedded model
    python bench/gen_bench.py --batch_size 16 --n 128 --max_new_tokens 64
    python bench/gen_bench.py --n 8 --batch_size 4 --max_new_tokens 8      # a smoke run

Same model object, same prompts (the eval's identity and leakage questions, en and zh, under the
recipe's training system prompt, rendered by the chat template), same batches (sorted by prompt
length, left-padded for generate), greedy. transformers' side is what Keel did before: one
`model.generate` per batch. Prints seconds and answer tokens/s of each (answer tokens: up to and
including the end token, the same for both when the answers agree) and Keel's ratio, and how
many answers are identical. Each tool runs --repeats times, alternating; the best time counts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SYSTEM = "You are a helpful assistant."


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def eval_prompts(n: int) -> list[list[dict]]:
    """n conversations, alternating identity and leakage questions, both languages."""
    from keel.data.formats import parse_jsonl, read_text

    sets = Path(ROOT / "keel" / "evals" / "sets")
    queries = [[row["query"] for _, row in parse_jsonl(read_text(sets / f"{name}.jsonl"), name)]
               for name in ("identity", "leakage")]
    mixed = [q for pair in zip(*queries) for q in pair] + queries[0] + queries[1]
    return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in mixed[:n]]


def transformers_generate(model, tok, convs, max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """Keel's batching before its own loop: sorted by length, left-padded, one generate call per batch."""
    import torch

    from keel.batching import pad_batch
    from keel.chat import prompt_ids
    from keel.generate import GenerateArgs, eos_ids, sampling_kwargs

    prompts = [prompt_ids(tok, c) for c in convs]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    ends, out = eos_ids(model, tok), [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = pad_batch([prompts[i] for i in idx], tok.pad_token_id, left=True)
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=mask,
                                 **sampling_kwargs(tok, GenerateArgs(max_new_tokens=max_new_tokens)))
        for row, i in enumerate(idx):
            new = gen[row, ids.shape[1]:].tolist()
            cut = next((k + 1 for k, t in enumerate(new) if t in ends), len(new))
            out[i] = new[:cut]
    return out


def keel_generate(model, tok, convs, max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """generate_batch's own path, token ids kept (generate_batch itself decodes them)."""
    from keel.chat import prompt_ids
    from keel.generate import eos_ids, greedy_batch, plain_greedy

    if not plain_greedy(model):
        raise SystemExit("bench: this model's generation config asks for logits processors: Keel uses generate for it")
    prompts = [prompt_ids(tok, c) for c in convs]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        for i, new in zip(idx, greedy_batch(model, [prompts[i] for i in idx], max_new_tokens, eos_ids(model, tok),
                                            tok.pad_token_id)):
            out[i] = new
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="prompts")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each tool, alternating; the best counts")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    import torch

    from keel.model import ModelArgs, load_model

    model, tok, info = load_model(ModelArgs())
    convs = eval_prompts(args.n)
    keel_generate(model, tok, convs[:2], 2, 2)                              # warm-up, untimed
    best, outputs = {"transformers": float("inf"), "keel": float("inf")}, {}
    for _ in range(args.repeats):
        for name, fn in (("transformers", transformers_generate), ("keel", keel_generate)):
            start = time.perf_counter()
            outputs[name] = fn(model, tok, convs, args.max_new_tokens, args.batch_size)
            best[name] = min(best[name], time.perf_counter() - start)
    same = sum(a == b for a, b in zip(outputs["transformers"], outputs["keel"]))
    machine = {"cpu": cpu_model(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
               "load_avg_1m": os.getloadavg()[0]}
    print(f"\ngreedy generation, {info.name}, {len(convs)} eval prompts, batch {args.batch_size}, "
          f"max_new_tokens {args.max_new_tokens}; cpu: {machine['cpu']} x {machine['cpus']}, "
          f"torch threads {machine['threads']}, load avg {machine['load_avg_1m']:.2f}")
    print("| tool | s (best of %d) | answer tokens | tokens/s |" % args.repeats)
    print("| --- | --- | --- | --- |")
    rows = {}
    for name in ("transformers", "keel"):
        tokens = sum(len(x) for x in outputs[name])
        rows[name] = {"seconds": best[name], "tokens": tokens, "tokens_per_s": tokens / best[name]}
        print(f"| {name} generate | {best[name]:.2f} | {tokens} | {tokens / best[name]:.1f} |")
    ratio = rows["keel"]["tokens_per_s"] / rows["transformers"]["tokens_per_s"]
    print(f"| **keel / transformers** | | | **{ratio:.2f}x** |")
    print(f"identical answers: {same} of {len(convs)}")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine, "model": info.name, "args": vars(args),
                                              "results": rows, "ratio": ratio, "identical": same}, indent=1) + "\n")


if __name__ == "__main__":
    main()
