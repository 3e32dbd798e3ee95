"""Tokens computed per optimizer step with a shared prefix, rows as drawn against rows ordered by their start.

    python bench/prefix_bench.py --run_dir keel-identity/output/v0-...   # a keel sft run folder (args.json, data)

Counts only: the packed passes of every step of the run's first epoch, built by keel's own batching from the run's
data and flags, with the embedded tokenizer. No model runs, so the figure is the same on every machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from keel.data.mix import DataArgs, build_datasets
from keel.model.load import load_tokenizer, resolve_model_path
from keel.train.batching import by_start, epoch_windows, micro_batches


def count(rows, windows, budget: int, ordered: bool) -> tuple[int, int]:
    """(tokens computed, forward passes) over the windows."""
    tokens = passes = 0
    for window in windows:
        step = [rows[i] for i in window]
        for batch in micro_batches(by_start(step) if ordered else step, True, 1, budget, 0, share_prefix=True):
            tokens, passes = tokens + batch["input_ids"].shape[1], passes + 1
    return tokens, passes


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run_dir", required=True)
    ap.add_argument("--packing_length", type=int, default=256)
    a = ap.parse_args()
    args = json.loads((Path(a.run_dir) / "args.json").read_text())
    tok = load_tokenizer(resolve_model_path(args.get("model"))[0])
    # ballast#N was answered into the run folder before training (keel/synth/ballast.py)
    dataset = [str(Path(a.run_dir) / f"ballast-{s.split('#')[1]}.jsonl") if s.startswith("ballast#") else s
               for s in args["dataset"]]
    fields = {f.name for f in dataclasses.fields(DataArgs)}
    data = DataArgs(**{**{k: v for k, v in args.items() if k in fields}, "dataset": dataset})
    rows = build_datasets(data, tok)[0]
    per_step = args["per_device_train_batch_size"] * args["gradient_accumulation_steps"]
    windows = epoch_windows(len(rows), per_step, args["seed"], 0)
    plain, grouped = count(rows, windows, a.packing_length, False), count(rows, windows, a.packing_length, True)
    own = sum(len(ids) for ids, _ in rows)
    print(f"{len(rows)} rows, {len(windows)} steps, {own} row tokens, passes of at most {a.packing_length} tokens")
    print(f"as drawn:         {plain[0]} tokens computed in {plain[1]} passes")
    print(f"ordered by start: {grouped[0]} tokens computed in {grouped[1]} passes "
          f"({plain[0] / grouped[0]:.2f}x fewer tokens)")


if __name__ == "__main__":
    main()
