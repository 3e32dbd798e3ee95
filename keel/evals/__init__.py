"""Evaluation: `keel eval` (run.py: EvalArgs, evaluate(), main), the robustness matrix and leakage (matrix.py), the
scoring rules (scoring.py), the probe sets (sets.py, sets/*.jsonl), multiple choice (mc.py), drift (drift.py), the
in-training probe (probe.py), the report (report.py) and progress bars (progress.py). Imports core, model and data.
"""
