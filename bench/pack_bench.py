"""Tokens per second of one LoRA training pass by packed length (the `--packing_length` table in docs/performance.md).

    python bench/pack_bench.py                       # lengths 64 256 512 1024, fp32 and bf16 autocast
    python bench/pack_bench.py --lengths 256 --no_bf16

Rows of 64 tokens (an identity-sized row, the answer half labelled) are packed into one sequence of
each length; one pass is `token_loss` + backward on the embedded model with Keel's LoRA (r 8, all
seven projections, cheap dropout). Each length runs in its own child process so peak RSS is per
length. Best of 3 timed passes after one warm-up pass.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = 64


def child(length: int, bf16: bool) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    from keel.model.load import ModelArgs, load_model
    from keel.model.lora import LoraArgs, apply_lora, use_cheap_dropout
    from keel.model.template import IGNORE_INDEX
    from keel.train.batching import pack
    from keel.train.losses import token_loss

    model, _, _ = load_model(ModelArgs())
    model = apply_lora(model, LoraArgs())
    use_cheap_dropout(model)
    model.train()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(max(1, length // ROW)):
        ids = torch.randint(100, 40_000, (ROW,), generator=gen).tolist()
        rows.append((ids, [IGNORE_INDEX] * (ROW // 2) + ids[ROW // 2:]))
    batch = pack(rows, length)[0]
    tokens = batch["input_ids"].numel()
    times = []
    for _ in range(4):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, n, _ = token_loss(model, batch, device)
        (loss / n).backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"length": tokens, "bf16": bf16, "tok_s": round(tokens / min(times[1:]), 1),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 512, 1024])
    p.add_argument("--no_bf16", action="store_true", help="skip the bf16 autocast column")
    p.add_argument("--child", nargs=2, metavar=("LENGTH", "BF16"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(int(a.child[0]), a.child[1] == "1")), flush=True)
        return
    results = []
    for length in a.lengths:
        for bf16 in ([False] if a.no_bf16 else [False, True]):
            out = subprocess.run([sys.executable, __file__, "--child", str(length), str(int(bf16))],
                                 capture_output=True, text=True, check=True).stdout
            results.append(json.loads(out.splitlines()[-1]))
            print(f"done: {length} {'bf16' if bf16 else 'fp32'}", file=sys.stderr, flush=True)
    print("| tokens per pass | fp32 tok/s | bf16 autocast tok/s | peak RSS fp32 |")
    print("| --- | --- | --- | --- |")
    for length in a.lengths:
        f = next(r for r in results if r["length"] == length and not r["bf16"])
        b = next((r for r in results if r["length"] == length and r["bf16"]), None)
        print(f"| {length} | {f['tok_s']} | {b['tok_s'] if b else '-'} | {f['peak_rss_gb']} GB |")


if __name__ == "__main__":
    main()
