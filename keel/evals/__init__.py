"""Evaluation tasks: identity, leakage, multiple choice, drift; and the probes used while training."""
