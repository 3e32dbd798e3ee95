"""Datasets: readers and converters (formats.py), `#N` mixing and placeholders (mix.py), the identity builder
(identity.py), preference rows (pairs.py) and `keel data check` (check.py). Files and a tokenizer only, never a
model: imports core and keel.model's templates and tokenizer loading."""
