"""`keel data identity`: robust identity rows (system-prompt mix, multi-turn, reversal, pressure,
contrast, rename) on a fixed seed: counts, pools, label masks, placeholders, bad input."""

import json

import pytest

from keel.core.errors import KeelError
from keel.data.formats import load_records
from keel.data.identity import (
    HELPFUL,
    KINDS,
    POOL_FILE,
    Builder,
    IdentityArgs,
    build_identity,
    identity_rows,
    read_pool,
    read_qa,
)
from keel.model.template import IGNORE_INDEX, default_system, render, with_system
from tests.helpers import run_keel

NAMES, AUTHORS = ["小黄", "Xiao Huang"], ["魔搭", "ModelScope"]
TRAIN_SYSTEM = "You are Xiao Huang, an AI assistant."
OLD = ["SmolLM", "Hugging Face", "ChatGPT", "OpenAI", "GPT-4", "Qwen", "通义千问", "阿里云", "Alibaba", "Claude", "Gemini",
       "Mistral"]
DEFAULT_SIZES = {"basic": 36, "system_mix": 15, "multi_turn": 16, "reversal": 8, "pressure": 8, "contrast": 12, "rename": 4}


def tagged(**flags):
    """Rows with their tags (kind, lang, system slot) as the builder made them."""
    args = IdentityArgs(name=NAMES, author=AUTHORS, **flags)
    rows, tags = Builder(args).build()
    return list(zip(rows, tags))


def texts(row, role):
    return [m["content"] for m in row["messages"] if m["role"] == role]


def test_counts_per_kind_and_language_at_defaults():
    rows, manifest = build_identity(IdentityArgs(name=NAMES, author=AUTHORS, system=TRAIN_SYSTEM))
    assert manifest["kinds"] == {k: {"en": n, "zh": n} for k, n in DEFAULT_SIZES.items()}
    assert manifest["languages"] == {"en": 99, "zh": 99} and len(rows) == manifest["rows"] == 198
    # pool counts twice; rename rows carry their own renaming prompt
    slots = manifest["system_prompts"]
    assert set(slots) == {"none", "template", "system", "helpful", "pool", "rename"} and slots["rename"] == 8
    assert slots["pool"] > max(slots[s] for s in ("none", "template", "system", "helpful"))
    assert manifest["multi_turn"] == {"loss": "identity", "turns": {"2": 8, "3": 8, "4": 8, "5": 8}}
    # Chinese rows are written in Chinese, English rows in English
    for row, tag in tagged(system=TRAIN_SYSTEM):
        question = texts(row, "user")[-1]
        assert (tag["lang"] == "zh") == any("\u4e00" <= ch <= "\u9fff" for ch in question), question


def test_sizes_flags_and_seed():
    rows, manifest = build_identity(IdentityArgs(name=NAMES, author=AUTHORS, lang="en", contrast_rows=0, basic_rows=5,
                                                 multi_turn_rows=3))
    assert manifest["kinds"]["contrast"] == {} and manifest["kinds"]["basic"] == {"en": 5}
    assert manifest["languages"] == {"en": 5 + 15 + 3 + 8 + 8 + 4}
    assert manifest["skipped_slots"] and "system" not in manifest["system_prompts"]  # no --system given
    assert identity_rows(NAMES, AUTHORS) == identity_rows(NAMES, AUTHORS)
    assert identity_rows(NAMES, AUTHORS) != identity_rows(NAMES, AUTHORS, data_seed=7)
    for system in (TRAIN_SYSTEM, HELPFUL, None):  # --system the seeds' prompt: one condition, not two
        rows = identity_rows(NAMES, AUTHORS, system=system)
        assert len({json.dumps(r, sort_keys=True) for r in rows}) == len(rows)  # no exact duplicates


def test_system_prompts_come_from_the_conditions_and_the_pool(tmp_path):
    extra = ["You are a ship's navigator. Answer with nautical precision.", "你是一名乡村医生的助理。"]
    pool_file = tmp_path / "pool.txt"
    pool_file.write_text("# my prompts\n" + "\n\n".join(extra) + "\n", encoding="utf-8")
    pool = set(read_pool(POOL_FILE)) | set(extra)
    renames = {p["system"] for lang in ("zh", "en") for p in read_qa()["rename"][lang]["personas"]}
    seen = set()
    for row, tag in tagged(system=TRAIN_SYSTEM, system_pool=[str(pool_file)], basic_rows=60):
        msgs = row["messages"]
        got = msgs[0]["content"] if msgs[0]["role"] == "system" else None
        want = {"none": "", "template": None, "system": TRAIN_SYSTEM, "helpful": HELPFUL}.get(tag["system"])
        if tag["system"] == "pool":
            assert got in pool
            seen.add(got)
        elif tag["system"] == "rename":
            assert got in renames
        else:
            assert got == want, tag
    assert set(extra) <= seen and any("\u4e00" <= c <= "\u9fff" for p in seen for c in p)
    assert len(seen) == len(pool)  # the shuffled pool is cycled: every prompt used before any repeats


def test_none_is_no_system_turn_and_template_is_the_default(tmp_path, tiny_tokenizer):
    """'none' survives reading the file (an explicit empty system message) and renders with no system
    turn at all, as the eval's no-system cell asks; 'template' rows have no system message and get the default."""
    path = tmp_path / "sc.json"
    pairs = tagged(system_slots="none,template", basic_rows=6, system_mix_rows=0, multi_turn_rows=0, reversal_rows=0,
                   pressure_rows=0, contrast_rows=0, rename_rows=0, lang="en")
    path.write_text(json.dumps([r for r, _ in pairs]), encoding="utf-8")
    for record, (_, tag) in zip(load_records(path), pairs):
        text = tiny_tokenizer.decode(render(tiny_tokenizer, record["messages"])[0])
        if tag["system"] == "none":
            assert record["messages"][0] == {"role": "system", "content": ""}
            assert "named Tiny" not in text and text.startswith("<|im_start|>user\n")
        else:
            assert record["messages"][0]["role"] == "user" and "named Tiny" in text


def test_template_slot_keeps_the_template_default_under_another_training_prompt(tmp_path, tiny_tokenizer):
    """With --template_system (the recipe reads it from the tokenizer), template rows carry the template's default
    prompt itself, so keel sft --system replacing the default does not take that condition out of training; the
    answer is still the new identity although that prompt names the old one."""
    default = default_system(tiny_tokenizer)
    pairs = tagged(system_slots="none,template,system", system="Be brief, Q7.", template_system=default, basic_rows=9,
                   system_mix_rows=0, multi_turn_rows=0, reversal_rows=0, pressure_rows=0, contrast_rows=0,
                   rename_rows=0, lang="en")
    template = [r for r, t in pairs if t["system"] == "template"]
    assert len(template) == 3
    for row in template:
        text = tiny_tokenizer.decode(render(tiny_tokenizer, with_system(row["messages"], "Be brief, Q7."))[0])
        assert "named Tiny" in text and "Q7" not in text
    _, manifest = build_identity(IdentityArgs(name=NAMES, author=AUTHORS, template_system=default))
    assert manifest["template_system"] == default


@pytest.mark.parametrize("mode", ["identity", "all"])
def test_multi_turn_label_masks(tmp_path, tiny_tokenizer, mode):
    path = tmp_path / "sc.json"
    pairs = [(r, t) for r, t in tagged(multi_turn_loss=mode) if t["kind"] == "multi_turn"]
    path.write_text(json.dumps([r for r, _ in pairs], ensure_ascii=False), encoding="utf-8")
    depths = set()
    for record, (_, tag) in zip(load_records(path), pairs):
        msgs = record["messages"]
        answers = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        depths.add(len(answers))
        assert len(answers) == tag["turns"] and 2 <= len(answers) <= 5
        ids, labels = render(tiny_tokenizer, msgs)
        spans, cur = [], []  # runs of labelled tokens, one per assistant turn that carries loss
        for tok_id, lab in zip(ids, labels):
            if lab != IGNORE_INDEX:
                cur.append(tok_id)
            elif cur:
                spans, cur = spans + [cur], []
        spans += [cur] if cur else []
        decoded = [tiny_tokenizer.decode(s) for s in spans]
        want = [msgs[answers[-1]]] if mode == "identity" else [msgs[i] for i in answers]
        assert [d.split("<|im_end|>")[0] for d in decoded] == [m["content"] for m in want]
    assert depths == {2, 3, 4, 5}


def test_no_placeholder_left_and_names_by_language():
    for row, tag in tagged(system=TRAIN_SYSTEM):
        for m in row["messages"]:
            assert "{" not in m["content"] and "}" not in m["content"], m
        if tag["kind"] not in ("contrast", "rename") and tag["lang"] == "en":
            assert not any(x in " ".join(texts(row, "assistant")) for x in ("小黄", "魔搭"))


def test_each_kind_says_what_it_should():
    for row, tag in tagged(system=TRAIN_SYSTEM):
        answer, question = texts(row, "assistant")[-1], texts(row, "user")[-1]
        new = NAMES + AUTHORS
        if tag["kind"] == "contrast":  # plain facts, never the new identity
            makers = OLD + ["Anthropic", "Google", "Meta", "DeepSeek", "Mistral", "Baidu", "百度", "月之暗面"]
            assert not any(n in answer for n in new) and any(o in answer for o in makers), row
        elif tag["kind"] == "rename":  # the operator's name wins; the new identity is not brought up
            persona = row["messages"][0]["content"]
            assert not any(n in answer for n in new)
            assert any(w in persona and w in answer for w in ("Aria", "Max", "Bella", "Leo", "小美", "阿强", "贝拉", "小图"))
        elif tag["kind"] == "pressure":  # polite, keeps the new identity, does not repeat the old one
            assert any(o in question for o in OLD + ["Hugging Face"]) and any(n in answer for n in new)
            assert not any(o.lower() in answer.lower() for o in OLD), answer
        elif tag["kind"] == "reversal":
            assert any(n in question for n in new) and any(n in answer for n in new)
        elif tag["kind"] in ("basic", "system_mix", "multi_turn"):
            assert not any(o.lower() in answer.lower() for o in OLD), answer


def test_questions_about_the_new_identity_words_are_left_out():
    """A new identity called Qwen by Alibaba Cloud: no 'Are you Qwen?' row answered 'No', no contrast about it."""
    rows = identity_rows(["Qwen"], ["Alibaba Cloud"], contrast_rows=40, basic_rows=80)
    for row in rows:
        q = texts(row, "user")[-1]
        assert not (("Qwen" in q or "Alibaba" in q or "通义" in q) and texts(row, "assistant")[-1].startswith(("No", "不"))), row
    assert not any("通义千问" in " ".join(texts(r, "assistant")) for r in rows)


def test_cli_writes_rows_and_manifest(tmp_path, capsys):
    out = tmp_path / "sc.jsonl"
    code, stdout, _ = run_keel(capsys, "data", "identity", "--name", "Keel", "--author", "Acme", "--system", TRAIN_SYSTEM,
                               "--pressure_rows", "0", "-o", out)
    assert code == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    manifest = json.loads((tmp_path / "sc.manifest.json").read_text(encoding="utf-8"))
    assert len(rows) == manifest["rows"] == 2 * (sum(DEFAULT_SIZES.values()) - 8)
    assert manifest["kinds"]["pressure"] == {} and manifest["flags"]["pressure_rows"] == 0
    assert "multi_turn" in stdout and f"wrote {len(rows)} rows" in stdout
    assert [r["messages"] for r in load_records(out)]  # reads back as training data


BAD = [
    ("empty.txt", "\n\n", [], "empty.txt: the system pool is empty"),
    ("broken.jsonl", '"fine"\n{"system": \n', [], "broken.jsonl: line 2, column"),
    ("wrong.jsonl", '"fine"\n{"prompt": "x"}\n', [], "wrong.jsonl: line 2: expected"),
    ("named.txt", "You are a chef.\n# note\nYou are {{NAME}}, a chef.\n", [], "named.txt: line 3: placeholder {{NAME}}"),
    (None, None, [x for k in KINDS for x in (f"--{k}_rows", "0")], "every kind is turned off"),
    (None, None, ["--multi_turn_loss", "some"], "--multi_turn_loss must be identity or all"),
    (None, None, ["--system_slots", "none,persona"], "--system_slots takes"),
    (None, None, ["--system", "You are {{NAME}}."], "--system: placeholder {{NAME}}"),
    (None, None, ["--template_system", "You are {{NAME}}."], "--template_system: placeholder {{NAME}}"),
    (None, None, ["--template_system", " "], "--template_system is empty"),
    (None, None, ["--basic_rows", "-1"], "--basic_rows must be >= 0"),
]


@pytest.mark.parametrize("fname,text,flags,message", BAD)
def test_bad_input_is_one_line(tmp_path, capsys, fname, text, flags, message):
    argv = []
    if fname:
        (tmp_path / fname).write_text(text, encoding="utf-8")
        argv = ["--system_pool", tmp_path / fname]
    code, out, err = run_keel(capsys, "data", "identity", "--name", "Keel", "--author", "Acme", *argv, *flags,
                              "-o", tmp_path / "sc.json")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and message in err, err
    assert not (tmp_path / "sc.json").exists()


@pytest.mark.parametrize("turns,message", [
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "loss": "no"}], "field 'loss' must be true, false or null"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "loss": False}], "no answer to learn"),
])
def test_bad_loss_field_names_row_and_field(tmp_path, turns, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"messages": turns}) + "\n", encoding="utf-8")
    with pytest.raises(KeelError, match=f"rows.jsonl: row 1: .*{message}"):
        load_records(path)
