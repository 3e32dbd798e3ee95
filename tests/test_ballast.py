"""Self-distilled ballast: the built-in prompts, generation, the cache, and the ballast#N spec."""

import json

import pytest

from keel.data.ballast import ballast_records, builtin_prompts, finish
from keel.data.formats import load_records
from keel.data.mix import DataArgs, build_datasets
from keel.evals.drift import DRIFT_PROMPTS
from keel.evals.identity import HELD_OUT, LEAKAGE, OLD_IDENTITY, mentions
from keel.generate import generate_batch
from keel.model import ModelArgs, cache_root, load_model
from tests.helpers import run_keel

IDENTITY_WORDS = ["who are you", "your name", "你是谁", "你叫什么", "who made you", "who created you", "开发了你"]


def test_builtin_prompts_clean():
    prompts = builtin_prompts()
    assert len(prompts) >= 300 and len(set(prompts)) == len(prompts)
    assert not [p for p in prompts if any(w in p.lower() for w in IDENTITY_WORDS) or mentions(p, OLD_IDENTITY)]
    held_out = {p for ps in [*LEAKAGE.values(), *HELD_OUT.values()] for p in ps} | set(DRIFT_PROMPTS)
    assert not held_out & set(prompts)  # evaluation prompts never leak into training
    assert sum(any("\u4e00" <= c <= "\u9fff" for c in p) for p in prompts) >= 80


def test_finish_trims_cut_answers():
    assert finish("Paris is the capital. It has many", truncated=True) == "Paris is the capital."
    assert finish("no sentence end here at all", truncated=True) is None
    assert finish("Complete answer", truncated=False) == "Complete answer"


def test_generation_cache_and_spec(tiny_model_dir, tmp_path, monkeypatch):
    model, tok, _ = load_model(ModelArgs(model=str(tiny_model_dir)))
    rows = ballast_records(model, tok, 6, "Be brief.", max_new_tokens=8)
    assert 0 < len(rows) <= 6 and all(r["messages"][0] == {"role": "system", "content": "Be brief."} for r in rows)
    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_records(path)) == len(rows)  # the data loader accepts them
    train, _, manifest = build_datasets(DataArgs(dataset=["ballast#6"], system="Be brief.", split_dataset_ratio=0), tok, model)
    assert 0 < len(train) <= 6 and manifest["sources"][0]["spec"] == "ballast#6"
    calls = []
    monkeypatch.setattr("keel.generate.generate_batch", lambda *a, **k: calls.append(1) or [])
    again = ballast_records(model, tok, 6, "Be brief.", max_new_tokens=8)
    assert again == rows and not calls  # second run: all from the cache


def test_interrupted_generation_is_kept(tiny_model_dir, monkeypatch):
    model, tok, _ = load_model(ModelArgs(model=str(tiny_model_dir)))
    prompts = [f"Name a colour, take {i}." for i in range(6)]
    calls = []
    real = generate_batch

    def stop_after_one_batch(model, tok, convs, gen, batch_size):
        if calls:
            raise KeyboardInterrupt  # the user stops the run during the second batch
        calls.append([c[-1]["content"] for c in convs])
        return real(model, tok, convs, gen, batch_size=batch_size)

    monkeypatch.setattr("keel.generate.generate_batch", stop_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        ballast_records(model, tok, 6, "Be quick.", prompts=prompts, max_new_tokens=6, batch_size=2)
    first = calls[0]
    cache = next(f for f in (cache_root() / "ballast").glob("*.jsonl") if first[0] in f.read_text())
    with open(cache, "a") as f:
        f.write('{"prompt": "Name a colour, take')  # a line cut by the kill
    asked = []
    monkeypatch.setattr("keel.generate.generate_batch",
                        lambda model, tok, convs, gen, batch_size: asked.extend(c[-1]["content"] for c in convs)
                        or ["Blue."] * len(convs))
    rows = ballast_records(model, tok, 6, "Be quick.", prompts=prompts, max_new_tokens=6, batch_size=2)
    assert sorted(asked) == sorted(set(prompts) - set(first))  # the finished batch is reused, not regenerated
    assert {r["messages"][1]["content"] for r in rows} >= set(prompts) - set(first)


def test_cli_prompts_file_and_too_many(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"query": "Name a colour."}\n{"query": "Name a fruit."}\n')
    out = tmp_path / "ballast.jsonl"
    code, stdout, err = run_keel(capsys, "data", "ballast", "--model", tiny_model_dir, "--prompts", prompts, "-n", "5",
                                 "-o", out, "--max_new_tokens", "6")
    assert code == 0, err
    assert "5 rows asked, 2 prompts available" in stdout
    empty = tmp_path / "e.jsonl"
    empty.write_text('{"query": ""}\n')
    code, _, err = run_keel(capsys, "data", "ballast", "--model", tiny_model_dir, "--prompts", empty, "-o", out)
    assert code == 2 and "no usable prompts" in err


def test_recipe_end_to_end(tiny_model_dir, tmp_path, capsys):
    code, out, err = run_keel(capsys, "recipe", "identity", "--name", "Keel", "--author", "Acme", "--model", tiny_model_dir,
                              "--output_dir", tmp_path, "--ballast", "4", "--num_train_epochs", "1")
    assert code == 0, err
    report = json.loads((tmp_path / "report" / "eval_report.json").read_text())
    assert {"base", "tuned"} == set(report["results"]) and "identity_en" in report["results"]["tuned"]
    assert report["results"]["base"]["drift_nll"] > 0 and "base_nll" not in report["results"]["tuned"]
    assert "keel infer --adapters" in out and "before:" in out and "after:" in out
