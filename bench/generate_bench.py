"""Greedy generation by batch size: the ballast's job (48 answers of up to 96 tokens) and the eval's (104 of up to 32).

    python bench/generate_bench.py                   # both jobs, batch sizes 16/24/48 and 32/52/104
    python bench/generate_bench.py --jobs ballast    # one job

Each job answers built-in ballast prompts (as many Chinese as English, drawn as ballast#N draws them) under "You are
a helpful assistant." with the embedded model, through keel.model.generate.generate_batch (sorted, left-padded batches),
once per batch size, in one invocation. Printed: wall seconds per batch size, the ratio against the job's first
size, and how many answers equal that size's: left padding changes a batch's arithmetic, so an answer may change
where two tokens are nearly tied. Run it alone: another process on the machine changes every figure.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_bench import cpu_model  # noqa: E402  (bench/ is the script's own folder)

JOBS = {"ballast": (48, 96, (16, 24, 48)), "eval": (104, 32, (32, 52, 104))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", default="ballast,eval", help="comma-separated: " + ", ".join(JOBS))
    args = parser.parse_args()
    import torch

    from keel.model.generate import GenerateArgs, generate_batch
    from keel.model.load import ModelArgs, load_model
    from keel.synth.ballast import builtin_prompts, draw

    model, tok, _ = load_model(ModelArgs())
    print(f"cpu: {cpu_model()} | cores {os.cpu_count()} | torch threads {torch.get_num_threads()}")
    for job in args.jobs.split(","):
        n, tokens, sizes = JOBS[job]
        convs = [[{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": p}]
                 for p in draw(builtin_prompts(), n, random.Random(42), balance=True)]  # as many zh as en, as ballast#N
        gen = GenerateArgs(temperature=0.0, max_new_tokens=tokens)
        first = None
        for size in sizes:
            t = time.time()
            out = generate_batch(model, tok, convs, gen, batch_size=size)
            s = time.time() - t
            first = first or (s, out)
            same = sum(a == b for a, b in zip(first[1], out))
            print(f"{job}: {n} answers, up to {tokens} tokens, batch {size:>3}: {s:6.1f} s | "
                  f"{first[0] / s:.2f}x batch {sizes[0]} | same answers {same}/{n}", flush=True)


if __name__ == "__main__":
    main()
