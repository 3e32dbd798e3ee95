"""The CPU runtime term of the memory plan (keel/train/memory.py, CPU_RUNTIME_GIB), measured.

    python bench/memory_baseline.py

RSS of a process that imports what `keel sft` imports and loads the embedded model with its tokenizer,
with every weight page touched, less the weights' own bytes: what the process costs besides the tensors
the plan counts. Prints one JSON line (GB = 1e9 bytes, GiB = 2^30).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("memory_baseline: needs Linux /proc")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main():
    start = rss_bytes()
    import torch

    import keel.train.sft  # noqa: F401  (everything `keel sft` imports before it loads the model)
    from keel.model.load import ModelArgs, load_model

    imported = rss_bytes()
    model, _, _ = load_model(ModelArgs(num_threads=1), device=torch.device("cpu"))
    with torch.no_grad():  # the weights are memory-mapped: a training step reads every page of them
        for p in model.parameters():
            p.sum()
    loaded = rss_bytes()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "torch": torch.__version__,
                      "rss_start_gb": round(start / 1e9, 3), "rss_imports_gb": round(imported / 1e9, 3),
                      "rss_model_loaded_gb": round(loaded / 1e9, 3), "weights_gb": round(weights / 1e9, 3),
                      "runtime_gib": round((loaded - weights) / 2 ** 30, 3)}))


if __name__ == "__main__":
    main()
