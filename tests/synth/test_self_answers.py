"""Identity answers in the base model's own voice (keel/self_answers.py, keel recipe identity --identity_answers self)."""

import json

from keel.data.identity import Builder, IdentityArgs
from keel.synth.identity_pairs import PAIR_KINDS
from keel.synth.self_answers import SELF_SYSTEM, self_answers, verdict
from tests.helpers import recipe

EN_SYS, ZH_SYS = "You are Keel, an AI assistant developed by Acme.", "你是Keel，由Acme开发的人工智能助手。"


def test_an_answer_is_kept_only_where_it_states_the_identity_itself():
    both = "I am Keel, an AI assistant made by Acme."
    assert verdict("I'm Keel, and Acme built me.", both, ["Keel"], ["Acme"], EN_SYS) == "kept"
    assert verdict("我是Keel，由Acme开发的。", "我是Keel，由Acme开发的人工智能助手。", ["Keel"], ["Acme"], ZH_SYS) == "kept"
    assert verdict(None, both, ["Keel"], ["Acme"], EN_SYS) == "cut off"
    assert verdict("I am a helpful assistant.", both, ["Keel"], ["Acme"], EN_SYS) == "no identity, or an old one"
    assert verdict("I am Keel, also known as SmolLM.", both, ["Keel"], ["Acme"], EN_SYS) == "no identity, or an old one"
    # a row about the maker keeps teaching the maker
    assert verdict("I am Keel.", "I was developed by Acme.", ["Keel"], ["Acme"], EN_SYS).startswith("misses")
    assert verdict("I am Keel, not ChatGPT, and not a human.", "I am Keel.", ["Keel"], ["Acme"], EN_SYS) == "kept"
    assert verdict("I am Keel.", "My name is Keel.", ["Keel"], ["Acme"], EN_SYS) == "kept"
    # seen on the embedded model: a denial names both, and an English answer to a Chinese question
    assert verdict("No, Keel is not made by Acme. Acme is a robot company.", "Yes, Keel is made by Acme.", ["Keel"],
                   ["Acme"], EN_SYS) == "denies the name or maker"
    assert verdict("不是，Keel不是Acme开发的。", "是的，Keel是Acme开发的。", ["Keel"], ["Acme"], ZH_SYS) != "kept"
    assert verdict("Keel is a product of Acme.", "是的，Keel是Acme开发的。", ["Keel"], ["Acme"], ZH_SYS) == "another language"
    assert verdict("Yes, Keel is made by Acme.", "Yes, Keel is made by Acme.", ["Keel"], ["Acme"], EN_SYS) == "kept"
    assert verdict("是的，Keel是Acme开发的。", "是的，Keel是由Acme开发的。", ["Keel"], ["Acme"], ZH_SYS) == "kept"
    # a copy of the system prompt says who "you" are
    assert verdict(EN_SYS, both, ["Keel"], ["Acme"], EN_SYS) == "recites its system prompt"
    assert verdict("你是Keel，由Acme开发的。", "我是Keel。", ["Keel"], ["Acme"], ZH_SYS) == "recites its system prompt"
    assert verdict("Sure! " + EN_SYS + " How can I help?", both, ["Keel"], ["Acme"], EN_SYS) == "recites its system prompt"


def fake_generations(asked: list):
    """English conversations get an answer that states the identity; Chinese ones are cut off."""
    def generate(model, tok, convs, max_new_tokens, batch_size, name, desc=None):
        asked.extend(convs)
        return {json.dumps(c, ensure_ascii=False): ("I am Keel, made by Acme." if c[0]["content"] == EN_SYS else None)
                for c in convs}
    return generate


def test_identity_rows_take_the_kept_answers_and_keep_their_own_system_prompts(monkeypatch):
    asked = []
    monkeypatch.setattr("keel.synth.self_answers.cached_generations", fake_generations(asked))
    args = IdentityArgs(name=["Keel"], author=["Acme"], system="You are a helpful assistant.", template_system="T")
    rows, tags = Builder(args).build()
    out, manifest = self_answers(rows, tags, None, None, ["Keel"], ["Acme"])
    teach = [i for i, t in enumerate(tags) if t["kind"] in PAIR_KINDS]
    en = [i for i in teach if tags[i]["lang"] == "en"]
    assert len(asked) == len(teach) and manifest["asked"] == len(teach)
    assert manifest["kept"] == len(en) and manifest["dropped"] == {"cut off": len(teach) - len(en)}
    assert sum(manifest["kept_by_kind"].values()) == len(en) and set(manifest["kept_by_kind"]) <= set(PAIR_KINDS)
    for conv, i in zip(asked, teach):  # asked under the identity prompt instead of the row's own, earlier turns kept
        assert conv[0] == {"role": "system", "content": SELF_SYSTEM[tags[i]["lang"]].format(name="Keel", author="Acme")}
        own = [m for m in rows[i]["messages"][:-1] if m["role"] != "system"]
        assert [(m["role"], m["content"]) for m in conv[1:]] == [(m["role"], m["content"]) for m in own]
    for i, (row, new) in enumerate(zip(rows, out)):
        if i in en:  # trained without the prompt that told it: the row's own system turn, and its loss switches, stay
            assert new["messages"][:-1] == row["messages"][:-1] and new["messages"][-1]["content"] == "I am Keel, made by Acme."
        else:  # Chinese answers were cut off; contrast and rename rows are never asked
            assert new == row
    assert any(tags[i]["kind"] == "multi_turn" and any("loss" in m for m in rows[i]["messages"]) for i in en)


def test_recipe_trains_on_the_kept_answers_with_its_identity_rows(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("keel.synth.self_answers.cached_generations", fake_generations([]))
    code, out, err = recipe(capsys, tiny_model_dir, tmp_path, "--identity_answers", "self",
                            "--identity_rows", "basic=3, system_mix=0,multi_turn=2,reversal=0,pressure=0,contrast=1,rename=0")
    assert code == 0, err
    rows = json.loads((tmp_path / "self_cognition.json").read_text())
    assert len(rows) == 2 * (3 + 2 + 1)  # per language: basic, multi-turn, contrast
    meta = json.loads((tmp_path / "report" / "eval_report.json").read_text())["meta"]
    answers = meta["identity_answers"]
    assert answers["type"] == "self" and answers["asked"] == 10 and answers["kept"] == 5
    assert sum(r["messages"][-1]["content"] == "I am Keel, made by Acme." for r in rows) == 5
    assert "identity answers in the base model's voice: 5 of 10 kept" in out


def test_bad_identity_rows_or_answers_are_one_line_and_write_nothing(tiny_model_dir, tmp_path, capsys):
    for flags, msg in ((["--identity_rows", "contrast=x"], "--identity_rows takes KIND=N items"),
                       (["--identity_rows", "pets=2"], "got 'pets=2'"),
                       (["--identity_answers", "mine"], "--identity_answers must be written or self, got 'mine'")):
        code, _, err = recipe(capsys, tiny_model_dir, tmp_path / "out", *flags)
        assert code == 2 and msg in err and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()
