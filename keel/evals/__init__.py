"""`keel eval` and the probes used while training.

run.py (EvalArgs, evaluate(), main), matrix.py (the identity robustness matrix, leakage), identity.py
(scoring rules), sets.py + sets/*.jsonl (the probe sets), mc.py, drift.py, probe.py (training),
report.py, progress.py.
"""
