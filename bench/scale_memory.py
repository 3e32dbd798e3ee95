"""Weight memory of a base model as keel sft holds it: full precision, QLoRA's 4-bit (nf4, double quant), 8-bit.

    python bench/scale_memory.py                      # the embedded SmolLM2-135M-Instruct
    python bench/scale_memory.py --model DIR          # any local Hugging Face folder

Prints, per way of loading, the bytes of the model's parameters and buffers as loaded for training (peft's
kbit preparation keeps the non-quantized rest in fp32) and the ratio to fp32. Needs the .[qlora] extra.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def footprint(model) -> int:
    """Parameters and buffers, plus what bitsandbytes keeps beside a quantized weight (block scales, row scales)."""
    import torch

    tensors = [*model.parameters(), *model.buffers()]
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        tensors += [t for t in (state.as_dict(packed=True).values() if state else ()) if isinstance(t, torch.Tensor)]
        tensors += [t for t in (getattr(p, "SCB", None),) if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def main():
    import torch

    from keel.model.load import ModelArgs, load_model
    from keel.model.quant import QuantArgs

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    rows = [("fp32", None), ("nf4 + double quant", QuantArgs(quant_method="bnb", quant_bits=4)),
            ("int8", QuantArgs(quant_method="bnb", quant_bits=8))]
    base = None
    for label, quant in rows:
        model, _, info = load_model(ModelArgs(model=args.model), device=torch.device("cpu"), quant=quant)
        size = footprint(model)
        base = base or size
        print(f"{info.name:<28} {label:<20} {size / 1e6:8.1f} MB  {size / base:5.2f}x of fp32")
        del model


if __name__ == "__main__":
    main()
