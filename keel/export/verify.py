"""The export gate: every artifact must still be the identity the adapter was, in the runtime users serve it with.

    gate = Gate(Identity(names, authors, system), hf_tok)    # hf_tok: the adapter's tokenizer, export's template
    rows = [gate.score("adapter", model, hf_tok, ckpt, load_s)]  # the first row scored is the reference
    rows.append(gate.score("gguf-q8_0", *load_gguf(path)[:2], path, load_s, [prompt_mismatch(gguf_tok, hf_tok)]))
    failed = gate.judge(rows, max_drop=0.05); print(gate.table(rows))

Each artifact (the merged folder through transformers, each GGUF through llama.cpp) answers:
- identity: a slice of keel eval's robustness matrix (keel/evals/matrix.py: held-out questions in
  English and Chinese under the training prompt, the template's default, the seeds' helpful prompt,
  and after one ordinary exchange), scored by the eval's own rules; `identity` is the mean hit rate;
- leakage: the eval's leakage rule on a few ordinary prompts and questions about other AIs;
- agreement: the share of fixed general prompts whose greedy answer is the adapter's, word for word;
- for a GGUF, the prompt check: the token ids llama.cpp builds from the GGUF's own chat template
  must equal those of the Hugging Face template, for a conversation with and without a system
  prompt and a two-turn one (BOS, EOS, system turn, generation prompt);
- for a Modelfile, when Go is installed: its TEMPLATE rendered by Go's text/template (as Ollama
  does) must give the Hugging Face template's text.
An artifact FAILS when its identity falls more than --max_identity_drop below the adapter's, or a
check above fails; the table says why.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from keel.evals.matrix import build_cells, run_leakage, run_matrix
from keel.evals.scoring import Identity
from keel.evals.sets import load_sets
from keel.model.generate import GenerateArgs, generate_batch
from keel.model.load import eval_mode
from keel.model.template import prompt_ids, with_system

GENERAL_PROMPTS = ["What is the capital of France?", "Name three primary colors.", "Give me a tip for sleeping well.",
                   "中国的首都是哪里？", "Translate 'good morning' into French."]
CHECK_CONVERSATIONS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "你是谁？"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Who made you?"}],
]
NEW_TOKENS = 32


@dataclass
class Row:
    artifact: str
    path: str
    identity: float = 0.0
    worst: float = 0.0
    leakage: float = 0.0
    agreement: float = 1.0
    size_mb: float = 0.0
    load_s: float = 0.0
    tokens_per_s: float = 0.0
    problems: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 2**20, 1)


def prompt_mismatch(tok, hf_tok) -> str | None:
    """Where the artifact's prompt ids first differ from the Hugging Face template's, or None."""
    for conv in CHECK_CONVERSATIONS:
        got, want = prompt_ids(tok, conv), prompt_ids(hf_tok, conv)
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            shown = hf_tok.decode(want[at:at + 6])
            return (f"prompt ids differ from the HF chat template's at token {at} ({len(got)} vs {len(want)} ids; "
                    f"HF has {shown!r} there){' - the GGUF has no chat template' if not tok.chat_template else ''}")
    return None


GO_RENDER = """package main

import (
\t"encoding/json"
\t"os"
\t"text/template"
)

type Message struct {
\tRole    string `json:"role"`
\tContent string `json:"content"`
}

type Case struct {
\tSystem   string    `json:"system"`
\tMessages []Message `json:"messages"`
\tPrompt   string    `json:"prompt"`
\tResponse string    `json:"response"`
}

func main() {
\tvar in struct {
\t\tTemplate string `json:"template"`
\t\tCases    []Case `json:"cases"`
\t}
\tif err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
\t\tpanic(err)
\t}
\tt := template.Must(template.New("modelfile").Parse(in.Template))
\tout := []string{}
\tfor _, c := range in.Cases {
\t\tvar b []byte
\t\tw := &buffer{&b}
\t\tif err := t.Execute(w, c); err != nil {
\t\t\tpanic(err)
\t\t}
\t\tout = append(out, string(b))
\t}
\tjson.NewEncoder(os.Stdout).Encode(out)
}

type buffer struct{ b *[]byte }

func (w *buffer) Write(p []byte) (int, error) { *w.b = append(*w.b, p...); return len(p), nil }
"""


def render_go(template: str, cases: list[tuple[str, list[dict]]]) -> list[str]:
    """Render an Ollama TEMPLATE with Go's own text/template, as Ollama does: .System is the request's
    system message or the Modelfile's SYSTEM, .Messages every message (system ones included)."""
    go = shutil.which("go")
    if go is None:
        raise FileNotFoundError("go")
    with tempfile.TemporaryDirectory(prefix="keel-go-") as d:
        (Path(d) / "main.go").write_text(GO_RENDER, encoding="utf-8")
        # .Prompt (the last user message) and .Response: the fields of Ollama's older single-turn templates
        data = json.dumps({"template": template, "cases": [
            {"system": s or "", "messages": m, "response": "",
             "prompt": next((x["content"] for x in reversed(m) if x["role"] == "user"), "")} for s, m in cases]})
        done = subprocess.run([go, "run", "main.go"], cwd=d, input=data, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise ValueError(next((line for line in done.stderr.splitlines() if line.strip()), "go run failed"))
    return json.loads(done.stdout)


def modelfile_parts(text: str) -> tuple[str, str | None]:
    """(TEMPLATE, SYSTEM) of a Modelfile Keel wrote (triple-quoted values)."""
    import re

    def value(key):
        m = re.search(rf'^{key} """(.*?)"""', text, re.S | re.M)
        return m.group(1) if m else None

    return value("TEMPLATE") or "", value("SYSTEM")


def modelfile_mismatch(modelfile: Path, hf_tok) -> str | None:
    """Whether the Modelfile renders, through Go, what the HF chat template renders; None if it does or Go is absent."""
    template, system = modelfile_parts(modelfile.read_text(encoding="utf-8"))
    convs = [CHECK_CONVERSATIONS[0], CHECK_CONVERSATIONS[2], CHECK_CONVERSATIONS[1]]
    cases = [(c[0]["content"] if c[0]["role"] == "system" else system, c) for c in convs]
    try:
        got = render_go(template, cases)
    except FileNotFoundError:
        return None
    except ValueError as e:
        return f"Modelfile TEMPLATE does not render with Go's text/template: {e}"
    for conv, text in zip(convs, got):
        want = hf_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        if text != want:
            at = next((i for i, (a, b) in enumerate(zip(text, want)) if a != b), min(len(text), len(want)))
            return f"Modelfile TEMPLATE renders differently from the HF chat template (at character {at}: {text[at:at + 20]!r})"
    return None


class Gate:
    """Scores artifacts against the adapter with one set of questions; prints the table."""

    def __init__(self, ident: Identity, hf_tok, per_lang: int = 4):
        self.ident, self.hf_tok = ident, hf_tok
        sets = load_sets()
        self.sets = sets
        self.cells = build_cells(sets, ident, none_ok=False, systems=("train", "default", "helpful"), depths=(1,),
                                 extras=(), per_lang=per_lang)
        pick = lambda lang, items, n: [p for p in items if p.lang == lang][:n]  # noqa: E731
        self.leak = [("ordinary", p) for lang in ("en", "zh") for p in pick(lang, sets.leakage, 3)] + \
                    [("contrast", p) for lang in ("en", "zh") for p in pick(lang, sets.contrast, 1)]
        self.gen = GenerateArgs(temperature=0.0, max_new_tokens=NEW_TOKENS)
        self.reference: Row | None = None

    def score(self, artifact: str, model, tok, path: Path, load_s: float, checks: list[str | None] = ()) -> Row:
        """One artifact's row; the first row scored is the reference (the adapter)."""
        row = Row(artifact, str(path), size_mb=size_mb(path) if path.exists() else 0.0, load_s=round(load_s, 1),
                  problems=[c for c in checks if c])
        with eval_mode(model):
            scores, row.samples, _ = run_matrix(model, tok, self.cells, self.ident, self.gen)
            _, leaks, _ = run_leakage(model, tok, self.sets, self.ident, self.gen, probes=self.leak, conditions="train")
            convs = [with_system([{"role": "user", "content": q}], self.ident.system) for q in GENERAL_PROMPTS]
            start = time.perf_counter()
            row.answers = generate_batch(model, tok, convs, GenerateArgs(temperature=0.0, max_new_tokens=48), batch_size=1)
            seconds = time.perf_counter() - start
        # generated tokens counted by the artifact's own tokenizer (+1: the end-of-turn token, when it stopped)
        n = sum(len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for a in row.answers)
        row.tokens_per_s = round(n / max(seconds, 1e-9), 1)
        row.identity, row.worst = scores["identity_mean"], scores["identity_robustness"]
        row.leakage = round(sum(s["leak"] for s in leaks) / len(leaks), 3)
        if self.reference is None:
            self.reference = row
        else:
            same = [a == b for a, b in zip(row.answers, self.reference.answers)]
            row.agreement = round(sum(same) / len(same), 2)
        return row

    def judge(self, rows: list[Row], max_drop: float) -> list[Row]:
        """Mark every row whose identity fell more than max_drop below the reference's; returns the failed rows."""
        ref = self.reference.identity
        for row in rows[1:]:
            if row.identity < ref - max_drop - 1e-9:
                row.problems.append(f"identity {row.identity:.2f} is more than {max_drop:.2f} below the adapter's {ref:.2f}")
        return [r for r in rows[1:] if r.problems]

    @staticmethod
    def table(rows: list[Row]) -> str:
        head = (f"{'artifact':<16} {'identity':>8} {'worst':>6} {'leakage':>7} {'agree':>6} {'size MB':>8} "
                f"{'load s':>6} {'tok/s':>7}  verdict")
        lines = [head]
        for i, r in enumerate(rows):
            verdict = "reference" if i == 0 else ("FAILED: " + "; ".join(r.problems) if r.problems else "passed")
            lines.append(f"{r.artifact:<16} {r.identity:>8.2f} {r.worst:>6.2f} {r.leakage:>7.2f} {r.agreement:>6.2f} "
                         f"{r.size_mb:>8.1f} {r.load_s:>6.1f} {r.tokens_per_s:>7.1f}  {verdict}")
        return "\n".join(lines)
