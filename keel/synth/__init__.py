"""Rows the base model writes: self-distilled ballast, guard rows, identity preference pairs, and identity answers in
the model's own voice (self answers), each cached by what produced it. Imports core, model, data and evals."""
