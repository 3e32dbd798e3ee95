"""Cheap identity, leakage and drift probes for `keel sft --eval_identity true`: a slice of the matrix.

    probe = TrainingProbe(model, tok, system, model_name, model_author)   # before training
    metrics = probe.probe(model)
    # {"identity_hit", "identity_robustness", "leakage", "drift_kl"} at each eval

The slice: 4 held-out questions per language under the training system prompt, under the seeds'
'You are a helpful assistant.' and as the question after one ordinary exchange (24 answers), so
the best checkpoint is chosen on robustness, not on the training prompt alone. `identity_hit` is the
mean over those cells and `identity_robustness` the lowest; leakage is asked on 6 ordinary prompts
and 2 questions about other AIs under the training prompt.
"""

from __future__ import annotations

from keel.evals.drift import base_answers, drift
from keel.evals.matrix import build_cells, run_leakage, run_matrix
from keel.evals.scoring import Identity
from keel.evals.sets import load_sets
from keel.model.generate import GenerateArgs
from keel.model.load import eval_mode

SYSTEMS = ("train", "helpful")
NEW_TOKENS = 32


class TrainingProbe:
    def __init__(self, model, tokenizer, system, model_name, model_author, n_questions: int = 4):
        self.tok = tokenizer
        self.ident = Identity(list(model_name or []), list(model_author or []), system)
        self.sets = load_sets()
        self.cells = build_cells(self.sets, self.ident, none_ok=False, systems=SYSTEMS, depths=(1,), extras=(),
                                 per_lang=n_questions)
        pick = lambda items, lang, n: [p for p in items if p.lang == lang][:n]  # noqa: E731
        self.leak = [("ordinary", p) for lang in ("en", "zh") for p in pick(self.sets.leakage, lang, 3)] + \
                    [("contrast", p) for lang in ("en", "zh") for p in pick(self.sets.contrast, lang, 1)]
        self.gen = GenerateArgs(temperature=0.0, max_new_tokens=NEW_TOKENS)
        self.references = base_answers(model, tokenizer, system, [p.query for p in self.sets.drift][:4], NEW_TOKENS)

    def probe(self, model) -> dict:
        with eval_mode(model):
            ident, _, _ = run_matrix(model, self.tok, self.cells, self.ident, self.gen)
            _, leaks, _ = run_leakage(model, self.tok, self.sets, self.ident, self.gen, probes=self.leak,
                                      conditions="train")
            return {"identity_hit": ident["identity_mean"], "identity_robustness": ident["identity_robustness"],
                    "leakage": round(sum(s["leak"] for s in leaks) / len(leaks), 3),
                    "drift_kl": drift(model, self.tok, self.references)["drift_kl"]}


def identity_check(model, tokenizer, system, model_name, model_author, per_lang: int = 4) -> float:
    """Hit rate on a few held-out identity questions under the training system prompt (end of `keel sft`)."""
    ident = Identity(list(model_name or []), list(model_author or []), system)
    cells = build_cells(load_sets(), ident, none_ok=False, systems=("train",), depths=(), extras=(), per_lang=per_lang)
    with eval_mode(model):
        scores, _, _ = run_matrix(model, tokenizer, cells, ident, GenerateArgs(temperature=0.0, max_new_tokens=NEW_TOKENS))
    return scores["identity_mean"]
