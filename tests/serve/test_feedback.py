"""`keel feedback export --kind sft|pairs|kto` on a hand-made feedback database."""

import json

import pytest

from keel.data.pairs import load_preferences
from keel.serve.feedback import FeedbackStore
from tests.helpers import run_keel

Q1 = [{"role": "user", "content": "Who are you?"}]
Q2 = [{"role": "user", "content": "Who made you?"}]
Q3 = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture
def db(tmp_path):
    """Ratings as the web chat records them: answers, then 👍/👎 with or without a correction."""
    path = tmp_path / "feedback.sqlite"
    store = FeedbackStore(path)
    store.record_completion("c1", "m", "You are helpful.", Q1, "I am SmolLM.")
    store.record_completion("c2", "m", None, Q2, "Hugging Face made me.")
    store.record_completion("c3", "m", None, Q3, "4")
    store.record_completion("c4", "m", None, Q2, "Hugging Face made me.")
    store.record_completion("c5", "m", None, Q3, "5")
    store.add_feedback("c1", "down", "I am Keel, made by Acme Lab.")   # a pair
    store.add_feedback("c2", "down", "Acme Lab made me.")              # a pair
    store.add_feedback("c4", "down", "Acme Lab made me.")              # the same pair again: a duplicate
    store.add_feedback("c3", "up", None)                               # KTO only
    store.add_feedback("c5", "down", None)                             # no correction: KTO only
    store.add_feedback("c3", "down", "4")                              # correction equal to the answer
    store.db.close()
    return path


def export(capsys, db, out, *flags):
    code, stdout, err = run_keel(capsys, "feedback", "export", "--db", db, "-o", out, *flags)
    assert code == 0, err
    return [json.loads(line) for line in out.read_text().splitlines()], stdout


def test_pairs(db, tmp_path, capsys):
    rows, stdout = export(capsys, db, tmp_path / "pairs.jsonl", "--kind", "pairs")
    assert rows == [
        {"messages": [{"role": "system", "content": "You are helpful."}, *Q1,
                      {"role": "assistant", "content": "I am Keel, made by Acme Lab."}],
         "rejected_response": "I am SmolLM."},
        {"messages": [*Q2, {"role": "assistant", "content": "Acme Lab made me."}],
         "rejected_response": "Hugging Face made me."}]
    assert "wrote 2 preference pairs" in stdout and "1 duplicate(s)" in stdout
    assert "1 correction(s) equal to the answer" in stdout and "1 👎 without a correction" in stdout
    kind, read = load_preferences(tmp_path / "pairs.jsonl")  # what keel rlhf reads
    assert kind == "pair" and read[1]["chosen"] == "Acme Lab made me."


def test_kto(db, tmp_path, capsys):
    rows, stdout = export(capsys, db, tmp_path / "kto.jsonl", "--kind", "kto")
    got = [(r["messages"][-2]["content"], r["messages"][-1]["content"], r["label"]) for r in rows]
    assert got == [("Who are you?", "I am SmolLM.", False), ("Who are you?", "I am Keel, made by Acme Lab.", True),
                   ("Who made you?", "Hugging Face made me.", False), ("Who made you?", "Acme Lab made me.", True),
                   ("What is 2+2?", "4", True), ("What is 2+2?", "5", False), ("What is 2+2?", "4", False)]
    assert "wrote 7 KTO rows" in stdout and "2 duplicate(s)" in stdout
    kind, _ = load_preferences(tmp_path / "kto.jsonl")
    assert kind == "kto"


def test_sft_stays_the_default(db, tmp_path, capsys):
    rows, stdout = export(capsys, db, tmp_path / "sft.jsonl")
    assert [r["messages"][-1]["content"] for r in rows] == [
        "I am Keel, made by Acme Lab.", "Acme Lab made me.", "Acme Lab made me.", "4"]
    assert all(set(r) == {"messages"} for r in rows)


def test_unknown_kind(db, tmp_path, capsys):
    code, _, err = run_keel(capsys, "feedback", "export", "--db", db, "-o", tmp_path / "x.jsonl", "--kind", "dpo")
    assert code == 2 and "--kind must be sft, pairs or kto, got 'dpo'" in err
    assert not (tmp_path / "x.jsonl").exists()
