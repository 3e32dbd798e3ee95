"""Probe sets: held out from the identity builder, well-formed, and bad files fail in one line."""

import difflib
import re

import pytest

from keel.core.errors import KeelError
from keel.data.formats import CONVERTERS, detect_format
from keel.data.identity import identity_rows
from keel.evals.sets import FIELDS, SETS_DIR, load_sets, read_set, read_system_prompts

NAME, AUTHOR = ["小黄", "Keel Robot"], ["魔搭", "Keel Lab"]


def normalise(text: str) -> str:
    return re.sub(r"[\W_]+", "", text.lower())


def near(a: str, b: str) -> bool:
    """Equal after lowercasing and stripping punctuation and spaces, or a character or two apart."""
    a, b = normalise(a), normalise(b)
    return a == b or difflib.SequenceMatcher(None, a, b).ratio() >= 0.85


def builder_turns(role: str) -> set[str]:
    """Every `role` turn the identity builder writes, over several seeds (it samples its question pool)."""
    out = set()
    for seed in range(5):
        for n, row in enumerate(identity_rows(NAME, AUTHOR, data_seed=seed), 1):
            msgs = CONVERTERS[detect_format(row, "identity_rows")](row, f"identity_rows row {n}")["messages"]
            out |= {m["content"] for m in msgs if m["role"] == role}
    return out


def eval_questions() -> list[str]:
    sets = load_sets()
    out = [p.query for p in sets.identity + sets.pressure + sets.contrast + sets.leakage + sets.drift]
    out += [p.query.replace("{{NAME}}", NAME[0] if p.lang == "zh" else NAME[1]) for p in sets.reversal]
    out += [p.query for ps in sets.exchanges.values() for p in ps]
    return out


def test_eval_questions_never_overlap_the_identity_builder():
    turns = builder_turns("user")
    assert len(turns) > 50
    clashes = [(q, t) for q in eval_questions() for t in turns if near(q, t)]
    assert not clashes, f"eval questions equal or nearly equal to training rows: {clashes[:5]}"


def test_eval_prompts_are_not_ballast_prompts():
    """Ballast rows (the base model's own answers) are trained on too: an eval prompt among them is not held out."""
    from keel.synth.ballast import builtin_prompts

    sets = load_sets()
    held = [p.query for p in sets.identity + sets.pressure + sets.leakage + sets.contrast]
    clashes = [(q, b) for q in held for b in builtin_prompts() if near(q, b)]
    assert not clashes, f"eval prompts equal or nearly equal to ballast prompts: {clashes[:5]}"


def test_persona_system_prompts_are_held_out_too():
    # 'You are a helpful assistant.' is the seeds' prompt, trained on by design; the personas are not.
    systems = builder_turns("system")
    personas = {k: v for k, v in load_sets().systems.items() if not k.startswith("helpful")}
    assert len(personas) >= 3 and any(re.search(r"[\u4e00-\u9fff]", v) for v in personas.values())
    assert not [(k, s) for k, v in personas.items() for s in systems if near(v, s)]


def test_the_overlap_check_sees_near_duplicates():
    assert near("Who are you?", "who are you") and near("你是谁？", "你是谁") and near("Who r you?", "Who are you?")
    assert not near("Who makes ChatGPT?", "Are you ChatGPT?")


def test_built_in_sets_are_complete():
    sets = load_sets()
    for lang in ("en", "zh"):
        assert sum(p.lang == lang for p in sets.identity) >= 8
        assert len(sets.exchanges[lang]) >= 4
        assert {p.domain for p in sets.leakage if p.lang == lang} >= {"facts", "arithmetic", "writing", "code",
                                                                      "advice", "translation"}
    assert len(sets.leakage) >= 100 and {p.expect for p in sets.reversal} == {"author", "self"}
    assert sets.systems["helpful"] == "You are a helpful assistant."
    assert {p.name for p in SETS_DIR.glob("*.jsonl")} == {f"{name}.jsonl" for name in FIELDS}


@pytest.mark.parametrize("text,pattern", [
    ("", "holds no rows"),
    ('{"lang": "en", "query": "Who?"}\n{"lang": "en"', "line 2, column"),
    ('{"lang": "fr", "query": "Qui?"}', "line 1: field 'lang' must be en or zh"),
    ('{"lang": "en", "query": ""}', "line 1: field 'query' must be a non-empty string"),
    ('["Who?"]', "line 1: each line must be a JSON object"),
])
def test_bad_probe_file(tmp_path, text, pattern):
    path = tmp_path / "identity.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(KeelError, match=pattern) as e:
        read_set(path, "identity")
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_reversal_rows_need_the_name(tmp_path):
    path = tmp_path / "reversal.jsonl"
    path.write_text('{"lang": "en", "query": "Who made it?", "expect": "author"}', encoding="utf-8")
    with pytest.raises(KeelError, match="line 1: a reversal row needs"):
        read_set(path, "reversal")


def test_system_prompts_file(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("You are a pirate.\n\n你是一名律师。\n", encoding="utf-8")
    assert read_system_prompts(str(txt)) == {"file1": "You are a pirate.", "file2": "你是一名律师。"}
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"id": "pirate", "system": "You are a pirate."}\n{"system": ""}\n', encoding="utf-8")
    with pytest.raises(KeelError, match=r"--system_prompts .*prompts.jsonl: line 2: .*'system'"):
        read_system_prompts(str(jsonl))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(KeelError, match="no system prompts"):
        read_system_prompts(str(empty))
    taken = tmp_path / "taken.jsonl"
    taken.write_text('{"id": "helpful", "system": "Hi."}\n', encoding="utf-8")
    with pytest.raises(KeelError, match="id 'helpful' is already taken"):
        load_sets(system_prompts=str(taken))


def test_user_files_join_the_sets_by_language(tmp_path):
    extra = tmp_path / "extra.jsonl"
    extra.write_text('{"query": "State your designation."}\n{"query": "你的代号是什么？"}\n', encoding="utf-8")
    sets = load_sets(identity_file=str(extra), leakage_file=str(extra))
    assert ("en", "State your designation.") in [(p.lang, p.query) for p in sets.identity]
    assert ("zh", "你的代号是什么？") in [(p.lang, p.query) for p in sets.leakage]
