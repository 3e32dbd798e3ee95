"""The robustness matrix: its cells, "no system turn" rendered, the headline figures, leakage counts."""

import keel.evals.matrix as matrix
from keel.evals.matrix import NO_SYSTEM, build_cells, run_leakage, run_matrix, template_view
from keel.evals.scoring import Identity
from keel.evals.sets import load_sets
from keel.model.generate import GenerateArgs
from keel.model.template import template_text
from tests.conftest import TINY_SYSTEM, build_tokenizer

GEN = GenerateArgs(temperature=0.0, max_new_tokens=8)
IDENT = Identity(["小黄", "Keel"], ["魔搭", "Acme Lab"], None)


def test_no_system_turn_is_rendered_without_the_default(tiny_tokenizer):
    ok, shown = template_view(tiny_tokenizer, "Who are you?")
    assert ok is tiny_tokenizer and TINY_SYSTEM in shown["default"]   # the template inserts its default...
    assert shown["none"] == "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"   # ...cut out
    conv = [{"role": "system", "content": NO_SYSTEM}, {"role": "user", "content": "Hi"}]
    assert template_text(tiny_tokenizer, conv, add_generation_prompt=True).startswith("<|im_start|>user\nHi")


def test_templates_that_cannot_render_no_system_turn():
    tok = build_tokenizer()
    # Llama-2 style: the system prompt lives inside the first user turn; there is no turn to cut out.
    tok.chat_template = ("{% set sys = messages[0]['content'] if messages[0]['role'] == 'system' else 'DEFAULT' %}"
                         "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] <<SYS>>' + sys + '<</SYS>> ' "
                         "+ m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}{{ m['content'] }}"
                         "{% endif %}{% endfor %}")
    ok, shown = template_view(tok)
    assert ok is None and "cannot render" in shown["note"]
    assert not [c for c in build_cells(load_sets(), IDENT, none_ok=False) if c.name == "sys:none"]
    # No system role at all: every conversation already has no system turn.
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                         "supported') }}{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}")
    ok, shown = template_view(tok)
    assert ok is not None and shown["none"] == shown["default"] and "no system role" in shown["note"]


def test_cells_cover_every_condition():
    sets = load_sets()
    cells = {(c.name, c.lang): c for c in build_cells(sets, IDENT)}
    names = {name for name, _ in cells}
    assert {"sys:train", "sys:none", "sys:helpful", "sys:helpful_zh", "turn:after_1", "turn:after_4", "reversal",
            "pressure"} <= names
    assert "sys:default" not in names   # trained without a system prompt, the template's default is the training one
    # train, none, the seeds' helpful prompt in en and zh, and at least 3 personas (Chinese ones among them)
    assert len([n for n in names if n.startswith("sys:")]) >= 2 + 2 + 3
    q, conv, rule = cells[("sys:none", "en")].items[0]
    assert conv[0] == {"role": "system", "content": NO_SYSTEM} and rule == "identity"
    assert cells[("sys:train", "zh")].items[0][1][0]["role"] == "user"
    deep = cells[("turn:after_4", "zh")].items[0][1]
    assert len(deep) == 9 and deep[-1]["content"] == cells[("sys:train", "zh")].items[0][0]
    reversal = cells[("reversal", "zh")].items + cells[("reversal", "en")].items
    assert all("{{" not in q for q, _, _ in reversal) and any("小黄" in q for q, _, _ in reversal)
    assert any("Keel" in q for q, _, _ in reversal) and {r for _, _, r in reversal} == {"author", "self"}
    with_system = {c.name for c in build_cells(sets, Identity(["Keel"], ["Acme"], "You are Keel."))}
    assert {"sys:train", "sys:default"} <= with_system
    slice_ = build_cells(sets, IDENT, none_ok=False, systems=("train", "helpful"), depths=(1,), extras=(), per_lang=4)
    assert sorted({c.name for c in slice_}) == ["sys:helpful", "sys:train", "turn:after_1"]
    assert all(len(c.items) == 4 for c in slice_)
    # the slice caps the reversal and pressure cells too (the whole set asks 8 and 12 per language)
    capped = {(c.name, c.lang): c for c in build_cells(sets, IDENT, none_ok=False, per_lang=4)}
    full = {(c.name, c.lang): c for c in build_cells(sets, IDENT, none_ok=False)}
    for key in (("reversal", "zh"), ("reversal", "en"), ("pressure", "zh"), ("pressure", "en")):
        assert len(full[key].items) > 4 and capped[key].items == full[key].items[:4]


def test_robustness_is_the_lowest_cell(monkeypatch):
    sets = load_sets()
    cells = build_cells(sets, IDENT, none_ok=False)

    def fake(model, tok, convs, gen, batch_size, step):
        # the identity holds everywhere except under the seeds' helpful prompt, where half the answers miss
        out = []
        for i, conv in enumerate(convs):
            helpful = conv[0]["content"] == sets.systems["helpful"]
            out.append("I am SmolLM." if helpful and i % 2 else "I am Keel, made by Acme Lab.")
        return out

    monkeypatch.setattr(matrix, "_generate", fake)
    scores, samples, details = run_matrix(None, None, cells, IDENT, GEN)
    assert scores["identity_en_sys_helpful"] < 1 and scores["identity_en_sys_train"] == 1
    assert scores["identity_robustness"] == min(v for k, v in scores.items() if k.startswith(("identity_en_", "identity_zh_")))
    assert scores["identity_robustness"] < scores["identity_mean"] < 1
    assert details["worst_cell"].startswith("sys:helpful") and len(samples) == sum(len(c.items) for c in cells)
    assert details["cells"]["sys:helpful"]["en"]["asked"] == sum(p.lang == "en" for p in sets.identity)


def test_leakage_counts_per_language_and_set(monkeypatch):
    sets = load_sets()
    monkeypatch.setattr(matrix, "_generate", lambda m, t, convs, g, b, s: [
        "我是Keel。" if any("\u4e00" <= ch <= "\u9fff" for ch in c[-1]["content"]) else "Paris." for c in convs])
    scores, samples, details = run_leakage(None, None, sets, IDENT, GEN)
    n_zh = sum(p.lang == "zh" for p in sets.leakage)
    assert details["counts"]["ordinary/zh"] == [2 * n_zh, 2 * n_zh]   # each prompt under two system prompts
    assert details["counts"]["ordinary/zh/train"] == details["counts"]["ordinary/zh/other"] == [n_zh, n_zh]
    assert details["counts"]["ordinary/en"][0] == 0 and scores["leakage_en"] == 0 and scores["leakage_zh"] == 1
    assert 0 < scores["leakage_contrast"] < 1 and {s["system"] for s in samples} == {"train", "helpful", "helpful_zh"}


def test_matrix_on_a_tiny_model(tiny_model_dir):
    from keel.model.load import ModelArgs, load_model

    model, tok, _ = load_model(ModelArgs(model=str(tiny_model_dir)))
    cells = build_cells(load_sets(), IDENT, per_lang=2)
    seen = []
    scores, samples, _ = run_matrix(model, tok, cells, IDENT, GEN, batch_size=32, step=seen.append)
    assert sum(seen) == len(samples) == sum(len(c.items) for c in cells)
    assert 0 <= scores["identity_robustness"] <= scores["identity_mean"] <= 1
