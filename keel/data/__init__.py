"""Datasets: readers, mixing, placeholders, the identity builder, checks."""
