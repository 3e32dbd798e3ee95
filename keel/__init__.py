"""Keel: give an open instruct LLM its own identity with LoRA, while it keeps what it knew."""

__version__ = "0.1.0"
