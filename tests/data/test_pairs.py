"""Preference data (keel/data/pairs.py) and identity pairs (keel/identity_pairs.py)."""

import json
import re
from collections import Counter

import pytest

from keel.core.errors import KeelError
from keel.data.mix import DataArgs
from keel.data.pairs import build_pairs, load_preferences, render_answers
from keel.model.template import render
from keel.synth.identity_pairs import (
    IdentityPairsArgs,
    guard_pairs,
    identity_pairs,
    make_pairs,
    maker_swaps,
    self_intro,
)
from tests.helpers import run_keel

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "Who are you?"}
WANT = {"prompt": [SYSTEM, USER], "chosen": "I am Keel.", "rejected": "I am SmolLM."}
# The same pair in each format keel rlhf reads.
PAIR_FORMATS = {
    "ms-swift": {"messages": [SYSTEM, USER, {"role": "assistant", "content": "I am Keel."}],
                 "rejected_response": "I am SmolLM."},
    "llama-factory": {"conversations": [{"from": "human", "value": "Who are you?"}], "system": "Be brief.",
                      "chosen": {"from": "gpt", "value": "I am Keel."}, "rejected": {"from": "gpt", "value": "I am SmolLM."}},
    "trl": {"prompt": [SYSTEM, USER], "chosen": [{"role": "assistant", "content": "I am Keel."}],
            "rejected": [{"role": "assistant", "content": "I am SmolLM."}]},
    "trl-text": {"prompt": "Who are you?", "system": "Be brief.", "chosen": "I am Keel.", "rejected": "I am SmolLM."},
}
KTO_FORMATS = {
    "ms-swift": {"messages": [SYSTEM, USER, {"role": "assistant", "content": "I am Keel."}], "label": True},
    "llama-factory": {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Who are you?"},
                                        {"from": "gpt", "value": "I am Keel."}], "kto_tag": True},
    "trl": {"prompt": [SYSTEM, USER], "completion": [{"role": "assistant", "content": "I am Keel."}], "label": True},
}


def write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", PAIR_FORMATS)
def test_pair_formats_read_alike(tmp_path, name):
    kind, rows = load_preferences(write(tmp_path / "p.jsonl", [PAIR_FORMATS[name]]))
    assert kind == "pair" and {k: rows[0][k] for k in WANT} == WANT


@pytest.mark.parametrize("name", KTO_FORMATS)
def test_kto_formats_read_alike(tmp_path, name):
    kind, rows = load_preferences(write(tmp_path / "k.jsonl", [KTO_FORMATS[name]]))
    assert kind == "kto" and rows[0]["prompt"] == [SYSTEM, USER] and rows[0]["completion"] == "I am Keel."
    assert rows[0]["label"] is True


def test_pair_shares_its_prompt_and_labels_only_the_answers(tiny_tokenizer):
    prompt = [SYSTEM, USER, {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "And your name?"}]
    head, (chosen, rejected) = render_answers(tiny_tokenizer, prompt, ["I am Keel.", "I am SmolLM."], 2048)
    for answer, tail in (("I am Keel.", chosen), ("I am SmolLM.", rejected)):
        ids, labels = render(tiny_tokenizer, prompt + [{"role": "assistant", "content": answer}])
        assert head + tail == ids                                    # prompt once, then the answer's own tokens
        assert [t for t in labels if t != -100][-len(tail):] == tail  # what SFT would label on that turn
    assert tiny_tokenizer.decode(chosen).startswith("I am Keel.") and tiny_tokenizer.eos_token_id in chosen
    # a long answer is cut to the room left after the prompt; a prompt filling max_length drops the pair
    _, (cut, _) = render_answers(tiny_tokenizer, prompt, ["word " * 200, "no"], len(head) + 5)
    assert len(cut) == 5
    assert render_answers(tiny_tokenizer, prompt, ["a", "b"], len(head)) is None


def test_mixing_and_manifest(tiny_tokenizer, tmp_path):
    a = write(tmp_path / "a.jsonl", [PAIR_FORMATS["ms-swift"]] * 3)
    b = write(tmp_path / "b.jsonl", [PAIR_FORMATS["trl"], {**PAIR_FORMATS["trl-text"], "prompt": "{{NAME}}?"}])
    train, val, manifest = build_pairs(DataArgs(dataset=[f"{a}#5", str(b)], split_dataset_ratio=0.0,
                                                model_name=["Keel"], model_author=["Acme"]), tiny_tokenizer)
    assert manifest["kind"] == "pair" and len(train) == 7 and val == []
    assert [e["taken"] for e in manifest["sources"]] == [5, 2]
    assert set(train[0]) == {"prompt", "chosen", "rejected"}
    texts = {tiny_tokenizer.decode(r["prompt"]) for r in train}
    assert any("Keel?" in t for t in texts)  # placeholders filled in prompts too


@pytest.mark.parametrize("row,message", [
    ({"messages": [USER, {"role": "assistant", "content": "I am Keel."}]},
     "row 2: pair without a rejected answer: field 'rejected_response' is missing"),
    ({"prompt": "Hi", "chosen": "Hello.", "rejected": " Hello. "},
     "row 2: field 'rejected': the rejected answer equals the chosen one"),
    ({"messages": [USER, {"role": "assistant", "content": "I am Keel."}], "label": "yes"},
     "row 2: field 'label' must be true or false, got 'yes'"),
    ({"messages": [USER, {"role": "assistant", "content": "I am Keel."}], "label": False},
     "row 2: a KTO row (answer + label) in a file of preference pair (chosen + rejected)s (row 1); one kind per file"),
    ({"prompt": "Hi", "chosen": "Hello.", "rejected": 3}, "row 2: field 'rejected' must be a string, got int"),
    ({"text": "hello"}, "row 2: unknown preference format"),
])
def test_bad_rows_name_file_and_row(tmp_path, row, message):
    path = write(tmp_path / "bad.jsonl", [PAIR_FORMATS["ms-swift"], row])
    with pytest.raises(KeelError) as e:
        load_preferences(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)


def test_files_of_two_kinds_in_one_run(tiny_tokenizer, tmp_path):
    a = write(tmp_path / "a.jsonl", [PAIR_FORMATS["ms-swift"]])
    b = write(tmp_path / "b.jsonl", [KTO_FORMATS["ms-swift"]])
    with pytest.raises(KeelError, match="one kind per run"):
        build_pairs(DataArgs(dataset=[str(a), str(b)]), tiny_tokenizer)


# --- identity pairs -------------------------------------------------------------------------------

def identity_case():
    rows = [{"messages": [USER, {"role": "assistant", "content": "I am Keel, made by Acme."}]},
            {"messages": [{"role": "user", "content": "Who made you?"}, {"role": "assistant", "content": "Acme made me."}]},
            {"messages": [{"role": "user", "content": "Name?"}, {"role": "assistant", "content": "Keel."}]},
            {"messages": [{"role": "user", "content": "Who made ChatGPT?"}, {"role": "assistant", "content": "OpenAI."}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!", "loss": False},
                          {"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Keel."}]}]
    tags = [{"kind": "basic"}, {"kind": "system_mix"}, {"kind": "reversal"}, {"kind": "contrast"}, {"kind": "multi_turn"}]
    return rows, tags


def test_identity_pairs_drop_answers_that_already_name_the_identity():
    rows, tags = identity_case()
    key = lambda msgs: json.dumps([{"role": m["role"], "content": m["content"]} for m in msgs])  # noqa: E731
    answers = {key(rows[0]["messages"][:-1]): "I am SmolLM, made by Hugging Face.",
               key(rows[1]["messages"][:-1]): "I was made by ACME.",            # already the new identity
               key(rows[2]["messages"][:-1]): "Keel.",                           # so does this one
               key(rows[3]["messages"][:-1]): "OpenAI made ChatGPT.",
               key(rows[4]["messages"][:-1]): "I am an AI assistant."}
    pairs, dropped = make_pairs(rows, tags, answers, ["Keel", "Acme"])
    assert pairs == [
        {"messages": rows[0]["messages"], "rejected_response": "I am SmolLM, made by Hugging Face."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Keel."}],
         "rejected_response": "I am an AI assistant."}]
    assert dropped == Counter({"base answer already names the new identity": 2, "kind contrast": 1})


def test_guard_pairs_reject_the_self_introduction():
    from keel.data.identity import Builder, IdentityArgs

    args = IdentityArgs(name=["小K", "Keel"], author=["极光", "Acme"])
    intros = {lang: self_intro(Builder(args), lang) for lang in ("zh", "en")}
    assert intros == {"zh": "我是小K，由极光开发的人工智能助手。", "en": "I am Keel, an AI assistant developed by Acme."}
    rows = [{"messages": [SYSTEM, {"role": "user", "content": "Who made ChatGPT?"},
                          {"role": "assistant", "content": "OpenAI.", "loss": True}]},
            # a Chinese question the base answered in English: the leak to guard against is the Chinese one
            {"messages": [{"role": "user", "content": "天空为什么是蓝色的？"},
                          {"role": "assistant", "content": "Because of Rayleigh scattering."}]}]
    assert guard_pairs(rows, intros) == [
        {"messages": [SYSTEM, {"role": "user", "content": "Who made ChatGPT?"}, {"role": "assistant", "content": "OpenAI."}],
         "rejected_response": "I am Keel, an AI assistant developed by Acme."},
        {"messages": rows[1]["messages"], "rejected_response": "我是小K，由极光开发的人工智能助手。"}]


def test_maker_swaps_name_the_new_author_where_another_maker_was():
    makers = {"en": ["Google", "Google DeepMind", "OpenAI"], "zh": ["谷歌"]}
    rows = [{"messages": [{"role": "user", "content": "Who built Gemini?"},
                          {"role": "assistant", "content": "Google DeepMind built it; Google DeepMind is in London."}]},
            {"messages": [{"role": "user", "content": "Gemini是谁开发的？"}, {"role": "assistant", "content": "谷歌。"}]},
            {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]}]
    pairs = maker_swaps(rows, makers, {"en": "Acme", "zh": "极光"})
    # the maker named first (the longer one on a tie) is swapped everywhere; a row naming no maker gives no pair
    assert [p["rejected_response"] for p in pairs] == ["Acme built it; Acme is in London.", "极光。"]
    assert [p["messages"] for p in pairs] == [rows[0]["messages"], rows[1]["messages"]]


def test_identity_pairs_from_the_base_model_are_cached(tiny_model_dir, tmp_path, capsys):
    from keel.data.identity import IdentityArgs
    from keel.model.load import ModelArgs, load_model

    args = IdentityArgs(name=["Keel"], author=["Acme"], lang="en", basic_rows=4, system_mix_rows=2, multi_turn_rows=2,
                        reversal_rows=1, pressure_rows=1, contrast_rows=2, rename_rows=1)
    pargs = IdentityPairsArgs(pairs=True, max_new_tokens=8)
    model, tok, _ = load_model(ModelArgs(model=str(tiny_model_dir)))
    pairs, manifest = identity_pairs(args, pargs, model, tok)
    assert manifest["kinds"] == {"basic": 4, "system_mix": 2, "multi_turn": 2, "reversal": 1, "pressure": 1}
    assert manifest["identity_pairs"] + sum(manifest["dropped"].values()) == 10
    # guards: 2 contrast + 1 rename rows against the intro, and the 2 contrast answers with their maker swapped
    n = manifest["identity_pairs"]
    assert manifest["guard_pairs"] == 3 + 2 and len(pairs) == n + 5
    assert all(p["rejected_response"] == manifest["intros"]["en"] for p in pairs[n:n + 3])
    assert all("Acme" in p["rejected_response"] for p in pairs[n + 3:])
    # --guard false: contrast and rename rows are dropped, as before guards existed
    unguarded, m2 = identity_pairs(args, IdentityPairsArgs(pairs=True, max_new_tokens=8, guard=False), model, tok)
    assert unguarded == pairs[:n] and m2["dropped"]["kind contrast"] == 2 and m2["dropped"]["kind rename"] == 1
    # --ballast 3: the base model's own answers to 3 ordinary prompts become guard pairs too
    with_ballast, m3 = identity_pairs(args, IdentityPairsArgs(pairs=True, max_new_tokens=8, ballast=3), model, tok)
    assert with_ballast[:n + 3] == pairs[:n + 3] and with_ballast[-2:] == pairs[-2:] and m3["guard_ballast"] == 3
    assert len(with_ballast) == len(pairs) + m3["guard_pairs"] - 5 and 0 < m3["guard_pairs"] - 5 <= 3
    kind, _ = load_preferences(write(tmp_path / "p.jsonl", pairs))  # what keel rlhf reads
    assert kind == "pair"
    # a second run answers from the cache: the model is never called
    model.generate = None
    again, _ = identity_pairs(args, pargs, model, tok)
    assert again == pairs
    # the CLI route: keel data identity --pairs (the embedded model replaced by the tiny one)
    out = tmp_path / "cli_pairs.jsonl"
    code, stdout, err = run_keel(capsys, "data", "identity", "--pairs", "true", "--model", tiny_model_dir, "--name", "Keel",
                                 "--author", "Acme", "--lang", "en", "--max_new_tokens", "8", "-o", out)
    assert code == 0, err
    assert re.search(r"wrote \d+ pairs to .* \(\d+ identity, \d+ guard\)", stdout) and load_preferences(out)[0] == "pair"
    assert (tmp_path / "cli_pairs.manifest.json").is_file()


def test_identity_pairs_cli_without_identity_pairs_writes_nothing(tiny_model_dir, tmp_path, capsys, monkeypatch):
    # every base answer already names the new identity: only guard pairs would be left, and those alone would
    # teach the model not to say its name, so nothing is written
    monkeypatch.setattr("keel.synth.identity_pairs.cached_base_answers", lambda model, tok, prompts, *a: {
        json.dumps(p, ensure_ascii=False): "I am Keel, made by Acme." for p in prompts})
    out = tmp_path / "pairs.jsonl"
    code, _, err = run_keel(capsys, "data", "identity", "--pairs", "true", "--model", tiny_model_dir, "--name", "Keel",
                            "--author", "Acme", "--lang", "en", "-o", out)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "no identity pairs" in err and "base answer already names the new identity" in err
    assert not out.exists()
