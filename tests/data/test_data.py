"""Data: readers, converters, #N mixing, placeholders, the identity builder and `keel data`."""

import json
from pathlib import Path

import pytest

from keel.core.errors import KeelError
from keel.data.formats import load_records
from keel.data.identity import identity_rows
from keel.data.mix import DataArgs, build_datasets, fill_placeholders, load_mixture, take
from keel.model.template import IGNORE_INDEX
from tests.helpers import expected, run_keel

ROOT = Path(__file__).resolve().parents[2]


def write(path, rows, jsonl=False):
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) if jsonl else json.dumps(rows, ensure_ascii=False)
    path.write_text(text, encoding="utf-8")
    return path


ALPACA = [{"instruction": "Who are you?", "input": "", "output": "I am Keel."},
          {"instruction": "Translate", "input": "你好", "output": "Hello", "history": [["hi", "hello!"]]}]
SHAREGPT = [{"conversations": [{"from": "human", "value": "Who are you?"}, {"from": "gpt", "value": "I am Keel."},
                               {"from": "human", "value": "And?"}, {"from": "gpt", "value": "Made by Acme."}]}]
MESSAGES = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                          {"role": "assistant", "content": "Paris."}]}]


@pytest.mark.parametrize("rows,jsonl", [(ALPACA, False), (SHAREGPT, True), (MESSAGES, True)])
def test_golden_ids_and_labels(tmp_path, tiny_tokenizer, rows, jsonl):
    path = write(tmp_path / ("d.jsonl" if jsonl else "d.json"), rows, jsonl)
    records = load_records(path)
    train, _, manifest = build_datasets(DataArgs(dataset=[str(path)], split_dataset_ratio=0), tiny_tokenizer)
    got = sorted(train)
    want = sorted(expected(tiny_tokenizer, r["messages"]) for r in records)
    assert got == want
    assert all(any(x != IGNORE_INDEX for x in labels) for _, labels in got)
    assert manifest["train_rows"] == len(rows)


def test_converters_shape(tmp_path):
    rec = load_records(write(tmp_path / "a.json", ALPACA))[1]["messages"]
    assert [m["role"] for m in rec] == ["user", "assistant", "user", "assistant"]
    assert rec[2]["content"] == "Translate\n你好"
    rec = load_records(write(tmp_path / "s.jsonl", SHAREGPT, jsonl=True))[0]["messages"]
    assert [m["content"] for m in rec] == ["Who are you?", "I am Keel.", "And?", "Made by Acme."]


def test_take_semantics():
    import random
    rows = list(range(10))
    sub, rep = take(rows, 4, random.Random(0))
    assert len(sub) == 4 and len(set(sub)) == 4 and rep == 0
    same, _ = take(rows, 10, random.Random(0))
    assert sorted(same) == rows
    big, rep = take(rows, 25, random.Random(0))
    assert len(big) == 25 and rep == 2 and all(big.count(r) >= 2 for r in rows) and len(set(big[20:])) == 5


def test_mixture_seeded_and_percent(shared_data):
    specs = [f"{shared_data}/alpaca_en_demo.json#30", f"{shared_data}/alpaca_zh_demo.json#20",
             f"{shared_data}/identity.json#10%"]
    args = DataArgs(dataset=specs, model_name=["Keel"], model_author=["Acme"])
    rows_a, man = load_mixture(specs, args)
    rows_b, _ = load_mixture(specs, args)
    rows_c, _ = load_mixture(specs, DataArgs(dataset=specs, data_seed=7, model_name=["Keel"], model_author=["Acme"]))
    assert [m["taken"] for m in man] == [30, 20, 5]
    assert [r["origin"] for r in rows_a] == [r["origin"] for r in rows_b]
    assert [r["origin"] for r in rows_a] != [r["origin"] for r in rows_c]


def test_hub_id_from_mirror(shared_data, tiny_tokenizer):
    args = DataArgs(dataset=["AI-ModelScope/alpaca-gpt4-data-en#5"], data_dir=str(shared_data), split_dataset_ratio=0)
    train, _, manifest = build_datasets(args, tiny_tokenizer)
    assert len(train) == 5 and manifest["sources"][0]["path"].endswith("alpaca_en_demo.json")


def test_placeholders_identity_json(shared_data):
    rows, _ = load_mixture([str(shared_data / "identity.json")],
                           DataArgs(model_name=["小黄", "Xiao Huang"], model_author=["魔搭", "ModelScope"]))
    texts = [m["content"] for r in rows for m in r["messages"]]
    assert not any("{{" in t for t in texts)
    assert not any(" 小黄" in t or "小黄 " in t or " 魔搭" in t or "魔搭 " in t for t in texts)
    assert any("I am Xiao Huang, an AI assistant developed by ModelScope" in t for t in texts)
    assert any("我是小黄" in t for t in texts)


def test_placeholder_spacing_en_kept():
    msgs = [{"role": "assistant", "content": "I am {{NAME}}, by {{AUTHOR}}."}]
    assert fill_placeholders(msgs, ["Keel"], ["Acme"])[0]["content"] == "I am Keel, by Acme."


def test_surviving_placeholder_stops_training(shared_data, tiny_tokenizer):
    with pytest.raises(KeelError, match=r"identity.json: row \d+: placeholder"):
        build_datasets(DataArgs(dataset=[str(shared_data / "identity.json")]), tiny_tokenizer)


def test_truncation_drops_rows_without_labels(tmp_path, tiny_tokenizer):
    long_q = [{"instruction": "word " * 300, "input": "", "output": "ok"}, ALPACA[0]]
    path = write(tmp_path / "l.json", long_q)
    train, _, manifest = build_datasets(DataArgs(dataset=[str(path)], max_length=200, split_dataset_ratio=0), tiny_tokenizer)
    assert len(train) == 1 and manifest["sources"][0]["dropped_too_long"] == 1


def test_system_replaces_default(tmp_path, tiny_tokenizer):
    path = write(tmp_path / "a.json", ALPACA[:1])
    train, _, _ = build_datasets(DataArgs(dataset=[str(path)], system="Sys!", split_dataset_ratio=0), tiny_tokenizer)
    text = tiny_tokenizer.decode(train[0][0])
    assert "Sys!" in text and "Tiny" not in text


def test_identity_builder():
    """OpenAI `messages` rows, zh and en (the kinds are pinned in tests/test_identity_rows.py)."""
    rows = identity_rows(["小黄", "Xiao Huang"], ["魔搭", "ModelScope"])
    assert len(rows) >= 150 and all(set(r) == {"messages"} for r in rows)
    assert len({json.dumps(r, ensure_ascii=False) for r in rows}) == len(rows)
    outs = " ".join(m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant")
    questions = [m["content"] for r in rows for m in r["messages"] if m["role"] == "user"]
    assert "Xiao Huang" in outs and "小黄" in outs and "{" not in outs
    assert any(sum(m["role"] == "assistant" for m in r["messages"]) > 1 for r in rows)
    assert any("ChatGPT" in q for q in questions) and any("通义千问" in q for q in questions)


def test_cli_identity_and_check(tmp_path, capsys):
    out = tmp_path / "sc.json"
    code, stdout, _ = run_keel(capsys, "data", "identity", "--name", "Keel", "--author", "Acme", "-o", out)
    assert code == 0 and len(json.loads(out.read_text())) >= 50


def test_check_reports_problems(tmp_path, capsys, tiny_model_dir):
    rows = [ALPACA[0], ALPACA[0], {"instruction": "x", "input": "", "output": ""},
            {"instruction": "y", "input": "", "output": "I am {{NAME}}"}]
    path = write(tmp_path / "bad.json", rows)
    code, out, _ = run_keel(capsys, "data", "check", path, "--model", tiny_model_dir)
    assert code == 1
    assert "row 2: exact duplicate of row 1" in out and "row 3: field 'output' is empty" in out
    assert "row 4: placeholder {{NAME}}" in out


BAD = {
    "invalid.json": ('[{"instruction": "a", "output": "b"},\n {"instruction" "x"}]', r"line 2, column 17"),
    "empty.json": ("", "empty"),
    "noanswer.jsonl": ('{"instruction": "a", "input": ""}', r"row 1: field 'output' is missing"),
    "wrongtype.jsonl": ('{"instruction": "a", "output": 5}', r"row 1: field 'output' must be a string"),
    "unknown.jsonl": ('{"foo": "a"}', "unknown format"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_one_line(tmp_path, capsys, tiny_model_dir, name):
    text, pattern = BAD[name]
    (tmp_path / name).write_text(text, encoding="utf-8")
    code, _, err = run_keel(capsys, "sft", "--model", tiny_model_dir, "--dataset", tmp_path / name,
                            "--output_dir", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert name in err
    import re
    assert re.search(pattern, err), err


def test_non_utf8(tmp_path, capsys, tiny_model_dir):
    (tmp_path / "latin.json").write_bytes('[{"instruction": "caf\xe9", "output": "x"}]'.encode("latin-1"))
    code, _, err = run_keel(capsys, "sft", "--model", tiny_model_dir, "--dataset", tmp_path / "latin.json",
                            "--output_dir", tmp_path / "out")
    assert code == 2 and "not UTF-8" in err


@pytest.mark.parametrize("suffix,pattern", [("#abc", "positive whole number"), ("#0", "positive whole number"),
                                            ("#-5", "positive whole number"), ("", "does not exist")])
def test_bad_specs(tmp_path, capsys, tiny_model_dir, suffix, pattern):
    spec = (str(tmp_path / "missing.json") if not suffix else str(tmp_path / "x.json")) + suffix
    code, _, err = run_keel(capsys, "sft", "--model", tiny_model_dir, "--dataset", spec, "--output_dir", tmp_path / "o")
    assert code == 2 and pattern in err and err.count("\n") == 1


def test_hub_id_offline_without_mirror(tmp_path, capsys, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("KEEL_DATA_DIR", raising=False)
    monkeypatch.setattr("keel.core.hub.hub_reachable", lambda timeout=5.0: False)
    code, _, err = run_keel(capsys, "sft", "--model", tiny_model_dir, "--dataset", "AI-ModelScope/alpaca-gpt4-data-zh#5",
                            "--output_dir", tmp_path / "o")
    assert code == 2 and "alpaca-gpt4-data-zh.json" in err and "mirror" in err


def test_data_layer_never_sees_a_model():
    """keel/data reads files with a tokenizer: it imports no model, generation or evaluation code."""
    import ast

    forbidden = ("keel.model.generate", "keel.model.lora", "keel.model.llama_backend", "keel.evals", "keel.synth",
                 "keel.train")
    for path in sorted((ROOT / "keel" / "data").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.startswith(forbidden)], f"{path.name}:{node.lineno} imports {names}"
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert "model" not in [a.arg for a in node.args.args + node.args.kwonlyargs], \
                    f"{path.name}:{node.lineno} {node.name}() takes a model"
