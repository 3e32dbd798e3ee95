"""`keel infer`: one-shot query, batch files (resumable), presets, bad input."""

import json

import pytest

from tests.helpers import run_keel


def test_query_prints_only_the_answer(capsys, tiny_model_dir):
    code, out, err = run_keel(capsys, "infer", "--model", tiny_model_dir, "--query", "Hi",
                              "--max_new_tokens", "5", "--stream", "false")
    assert code == 0
    assert len(out.strip().splitlines()) <= 1 and "keel" not in out.lower()


def test_streamed_query_equals_unstreamed_greedy(capsys, tiny_model_dir):
    args = ["infer", "--model", tiny_model_dir, "--query", "Who are you?", "--max_new_tokens", "8"]
    _, streamed, _ = run_keel(capsys, *args, "--stream", "true")
    _, plain, _ = run_keel(capsys, *args, "--stream", "false")
    assert streamed.strip() == plain.strip()


def test_batch_mode_writes_rows_and_resumes(capsys, tiny_model_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [{"query": "Hi"}, {"messages": [{"role": "user", "content": "Capital of France?"}]}, {"query": "你好"}]
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    out = tmp_path / "out.jsonl"
    code, _, _ = run_keel(capsys, "infer", "--model", tiny_model_dir, "--input_file", src,
                          "--output_file", out, "--max_new_tokens", "4", "--batch_size", "2")
    assert code == 0
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["index"] for r in written) == [0, 1, 2]
    assert all(isinstance(r["response"], str) for r in written)
    # A rerun keeps what is there and answers nothing twice.
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:2]) + "\n")
    run_keel(capsys, "infer", "--model", tiny_model_dir, "--input_file", src, "--output_file", out,
             "--max_new_tokens", "4")
    again = [json.loads(x)["index"] for x in out.read_text().splitlines()]
    assert sorted(again) == [0, 1, 2]


@pytest.mark.parametrize("content,message", [
    ('{"query": "ok"}\n{"query": "broken"\n', "line 2, column"),
    ('{"query": "ok"}\n{"text": "no query"}\n', "line 2: needs a field 'query'"),
    ("", "no rows to answer"),
])
def test_bad_input_file_names_the_line(capsys, tiny_model_dir, tmp_path, content, message):
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    code, _, err = run_keel(capsys, "infer", "--model", tiny_model_dir, "--input_file", src)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_non_utf8_and_missing_input_file(capsys, tiny_model_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"query": "\xff\xfe"}\n')
    code, _, err = run_keel(capsys, "infer", "--model", tiny_model_dir, "--input_file", src)
    assert code == 2 and "not UTF-8" in err
    code, _, err = run_keel(capsys, "infer", "--input_file", tmp_path / "nope.jsonl")
    assert code == 2 and "does not exist" in err


def test_missing_model_path_is_exit_2(capsys):
    code, _, err = run_keel(capsys, "infer", "--model", "/no/such/model", "--query", "hi")
    assert code == 2 and err.startswith("keel: error: --model")


def test_preset_sets_temperature_unless_given():
    from keel.core.flags import parse_flags
    from keel.model.generate import GenerateArgs
    from keel.serve.infer import PRESETS, InferArgs

    parsed = parse_flags(["--preset", "creative"], [InferArgs, GenerateArgs], prog="keel infer")
    assert "temperature" not in parsed.given and PRESETS["creative"] == 0.8
    parsed = parse_flags(["--preset", "creative", "--temperature", "0.1"], [InferArgs, GenerateArgs], prog="keel infer")
    assert "temperature" in parsed.given


@pytest.mark.slow
def test_embedded_model_knows_the_capital_of_france(capsys):
    code, out, _ = run_keel(capsys, "infer", "--query", "What is the capital of France?",
                            "--max_new_tokens", "24", "--stream", "false")
    assert code == 0 and "Paris" in out


def test_batch_resume_drops_a_torn_last_line(capsys, tiny_model_dir, tmp_path):
    """A kill mid-write leaves half a row without its newline: the rerun cuts it and answers that row again."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"query": q}) + "\n" for q in ("Hi", "Who are you?", "你好")), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    run_keel(capsys, "infer", "--model", tiny_model_dir, "--input_file", src, "--output_file", out, "--max_new_tokens", "4")
    whole = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(whole[0] + whole[1][: len(whole[1]) // 2])  # row 0 whole, then half of the next
    code, _, err = run_keel(capsys, "infer", "--model", tiny_model_dir, "--input_file", src, "--output_file", out,
                            "--max_new_tokens", "4")
    assert code == 0 and "torn" in err
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["index"] for r in rows) == [0, 1, 2]


def test_a_prompt_beyond_the_context_is_refused_with_its_line_or_cut(capsys, tiny_model_dir, tmp_path):
    """The tiny model reads 512 tokens: with --max_new_tokens 8 a prompt may be 504. Refused (the default) before
    anything is answered, naming the line; or cut at its start with --truncation_strategy left."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [{"query": "Hi"}, {"query": "fox " * 2000}, {"query": "x" * 8000}]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = ["infer", "--model", tiny_model_dir, "--input_file", src, "--output_file", out, "--max_new_tokens", "8"]
    code, _, err = run_keel(capsys, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "line 2: the prompt is" in err and "context of 512" in err and "--truncation_strategy left" in err
    assert not out.exists() or out.read_text() == ""
    code, _, err = run_keel(capsys, *args, "--truncation_strategy", "left")
    assert code == 0, err
    assert "line 2: the prompt is" in err and "line 3: the prompt is" in err and "cut to its last 504" in err
    assert sorted(json.loads(x)["index"] for x in out.read_text().splitlines()) == [0, 1, 2]
    code, _, err = run_keel(capsys, "infer", "--model", tiny_model_dir, "--query", "fox " * 2000, "--max_new_tokens", "8")
    assert code == 2 and "--query: the prompt is" in err


def test_a_huge_prompt_is_measured_without_tokenizing_it_whole(tiny_model_dir, monkeypatch):
    import keel.serve.infer as infer
    from keel.core.errors import KeelError
    from keel.model.generate import GenerateArgs
    from keel.model.load import ModelArgs, load_model

    model, tok, _ = load_model(ModelArgs(model=str(tiny_model_dir)))
    fit = infer.Fit(model, tok, GenerateArgs(max_new_tokens=8), "delete")
    real = infer.prompt_ids
    monkeypatch.setattr(infer, "prompt_ids", lambda t, m: real(t, m) if len(str(m)) < 100_000 else pytest.fail("tokenized"))
    huge = [{"role": "user", "content": "x" * 10_000_000}]
    with pytest.raises(KeelError, match="at least"):
        fit.check(huge, "row 1")
    cut = infer.Fit(model, tok, GenerateArgs(max_new_tokens=8), "left").check(huge, "row 1")
    assert 504 <= len(real(tok, cut))  # cut to a few times the limit; the ids are cut to it when answering
