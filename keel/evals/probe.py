"""Cheap identity, leakage and drift probes for `keel sft --eval_identity true`.

    probe = TrainingProbe(model, tok, system, model_name, model_author)   # before training
    metrics = probe.probe(model)   # {"identity_hit", "leakage", "drift_kl"} at each eval
"""

from __future__ import annotations

from keel.evals.drift import DRIFT_PROMPTS, base_answers, drift
from keel.evals.identity import HELD_OUT, LEAKAGE, run_identity, run_leakage


class TrainingProbe:
    def __init__(self, model, tokenizer, system, model_name, model_author, n_questions: int = 4):
        self.tok, self.system = tokenizer, system
        self.names, self.authors = list(model_name or []), list(model_author or [])
        self.questions = {lang: qs[:n_questions] for lang, qs in HELD_OUT.items()}
        self.leak_prompts = LEAKAGE["en"][:3] + LEAKAGE["zh"][:2]
        was_training = model.training
        model.eval()
        self.references = base_answers(model, tokenizer, system, DRIFT_PROMPTS[:4], max_new_tokens=32)
        if was_training:
            model.train()

    def probe(self, model) -> dict:
        was_training = model.training
        model.eval()
        ident, _ = run_identity(model, self.tok, self.system, self.names, self.authors, questions=self.questions,
                                max_new_tokens=32, modes=("system",))
        leak, _ = run_leakage(model, self.tok, self.system, self.names, self.authors, self.leak_prompts, max_new_tokens=32)
        out = {"identity_hit": round(sum(v for k, v in ident.items() if k.count("_") == 1) / len(self.questions), 3),
               **leak, "drift_kl": drift(model, self.tok, self.references)["drift_kl"]}
        if was_training:
            model.train()
        return out
