"""Training: batching (packing), losses, the run folder, checkpoints and tracking shared by `keel sft` (sft.py) and
`keel rlhf` (rlhf.py, preference.py), and the base model's soft targets (teacher.py).
Imports core, model, data, evals (the in-training probe) and synth."""
