"""keel eval: MC against a plain reference (both row forms), the report and its matrix, progress, bad input,
drift, the training probe. Scoring rules: test_evals_scoring.py; sets: test_evals_sets.py; cells: test_evals_matrix.py."""

import json

import pytest
import torch

from keel.core.errors import KeelError
from keel.evals.mc import read_mc_file, score_mc
from keel.model.load import ModelArgs, load_model
from tests.helpers import base_argv, read_log, run_keel, sft

MC = [{"query": "Question: Which is a fruit?", "choices": ["apple", "a stone", "iron"], "gold": 0},
      {"query": "Question: Capital of France?\n", "choices": ["Paris", "Berlin"], "gold": 0},
      {"query": "Question: Colour of the sky?", "choices": ["blue", "green", "the colour red"], "gold": 0}]


# WinoGrande-style partial scoring: the same continuation after each context option.
PARTIAL = [{"context_options": ["The trophy did not fit in the suitcase because the trophy",
                                "The trophy did not fit in the suitcase because the suitcase"],
            "continuation": "was too big.", "gold": 0},
           {"context_options": ["Paris is the capital of France", "Paris is the capital of Spain"],
            "continuation": "and has the Eiffel Tower.", "gold": 0}]


def plain_logprob(model, tok, context: str, continuation: str) -> float:
    """The plain way: one forward pass for one option, the continuation's log-probabilities summed."""
    ctx_ids = tok(context, add_special_tokens=False)["input_ids"]
    full = tok(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = model(torch.tensor([full])).logits[0].log_softmax(-1)
    return sum(lp[i - 1, full[i]].item() for i in range(len(ctx_ids), len(full)))


def test_mc_partial_scoring_matches_reference(tiny_model_dir, tmp_path):
    model, tok, _ = load_model(ModelArgs(model=str(tiny_model_dir)))
    path = tmp_path / "wino.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in PARTIAL))
    items = read_mc_file(str(path))
    got = score_mc(model, tok, items, batch_size=4)
    acc = 0
    for item in PARTIAL:
        scores = [plain_logprob(model, tok, c, " " + item["continuation"]) for c in item["context_options"]]
        acc += max(range(len(scores)), key=lambda j: scores[j]) == item["gold"]
    assert got["acc"] == round(acc / len(PARTIAL), 4) == got["acc_norm"]


def test_mc_matches_reference(tiny_model_dir):
    model, tok, _ = load_model(ModelArgs(model=str(tiny_model_dir)))
    got = score_mc(model, tok, MC, batch_size=3)
    acc = acc_norm = 0
    for item in MC:  # the plain way: one forward per choice, sum the continuation's log-probs
        ctx = item["query"].rstrip() + "\nAnswer:"
        scores = []
        for c in item["choices"]:
            ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
            full = tok(ctx + " " + c, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                lp = model(torch.tensor([full])).logits[0].log_softmax(-1)
            scores.append(sum(lp[i - 1, full[i]].item() for i in range(len(ctx_ids), len(full))))
        acc += max(range(len(scores)), key=lambda j: scores[j]) == item["gold"]
        acc_norm += max(range(len(scores)), key=lambda j: scores[j] / len(item["choices"][j])) == item["gold"]
    assert got["acc"] == round(acc / len(MC), 4) and got["acc_norm"] == round(acc_norm / len(MC), 4)


@pytest.mark.parametrize("line,pattern", [('{"query": "q", "choices": ["a"], "gold": 3}', "line 1: field 'gold'"),
                                          ('{"query": "q", "choices": [], "gold": 0}', "line 1: field 'choices'"),
                                          ('{"query": "q", "choices": ["a"], "gold": 0}\n{bad', "line 2, column 2"),
                                          ('{"context_options": ["a", "b"], "gold": 0}', "line 1: field 'continuation'"),
                                          ('{"context_options": ["a"], "continuation": "c", "gold": 1}',
                                           "line 1: field 'gold' must be an index into context_options"),
                                          ('{"choices": ["a"], "gold": 0}', "line 1: field 'query'"),
                                          ("", "no items")])
def test_bad_mc_files(tmp_path, line, pattern):
    path = tmp_path / "mc.jsonl"
    path.write_text(line)
    with pytest.raises(KeelError, match=pattern):
        read_mc_file(str(path))


@pytest.fixture(scope="module")
def tiny_adapter(tiny_adapters):
    return str(tiny_adapters["llama"])


@pytest.fixture
def small_sets(tmp_path, monkeypatch):
    """The built-in sets cut to 2 rows per language (exchanges and system prompts whole): every path, fewer answers."""
    import keel.evals.sets as sets

    folder = tmp_path / "sets"
    folder.mkdir()
    for path in sets.SETS_DIR.glob("*.jsonl"):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if path.stem not in ("exchanges", "system_prompts"):
            rows = [r for lang in ("en", "zh") for r in [r for r in rows if r["lang"] == lang][:2]]
        (folder / path.name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    monkeypatch.setattr(sets, "SETS_DIR", folder)


def test_eval_report_and_base_comparison(tiny_adapter, small_sets, tmp_path, capsys):
    mc = tmp_path / "mc.jsonl"
    mc.write_text("\n".join(json.dumps(x) for x in MC + PARTIAL))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("You are a pirate captain.\n")
    out = tmp_path / "report"
    code, stdout, err = run_keel(capsys, "eval", "--adapters", tiny_adapter, "--mc_files", mc, "--output_dir", out,
                                 "--max_new_tokens", "6", "--system_prompts", prompts)
    assert code == 0, err
    report = json.loads((out / "eval_report.json").read_text())
    assert set(report["results"]) == {"base", "tuned"}
    tuned = report["results"]["tuned"]
    for key in ("identity_robustness", "identity_mean", "identity_en", "identity_zh", "identity_en_sys_none",
                "identity_zh_sys_file1", "identity_en_turn_after_4", "identity_zh_reversal", "identity_en_pressure",
                "leakage", "leakage_en", "leakage_zh", "leakage_contrast", "mc_acc", "mc_acc_norm", "drift_kl"):
        assert key in tuned, key
    assert tuned["identity_robustness"] <= tuned["identity_mean"]
    assert tuned["drift_kl"] >= 0 and "base_nll" not in tuned
    assert report["results"]["base"]["drift_kl"] == 0 and report["results"]["base"]["drift_nll"] > 0  # the reference
    counts = report["details"]["tuned"]["counts"]
    assert counts["ordinary/en"][1] == 2 * 2 and counts["ordinary/zh"][1] == 2 * 2   # each prompt under two prompts
    assert {s["row"] for s in report["samples"]} == {"base", "tuned"}
    md = (out / "eval_report.md").read_text()
    assert "| identity_robustness |" in md and "| sys:none |" in md and "| ordinary/zh |" in md and "worst cell" in md
    assert (out / "eval_report.png").stat().st_size > 0
    # the rendered "no system turn" prompt is shown; every task and set has a progress bar and a time
    assert "no system turn, as rendered" in stdout and "<|im_start|>user" in stdout
    for label in ("base · identity matrix", "tuned · leakage", "tuned · mc mc (5 items)", "tuned · drift"):
        assert label in err and label in report["meta"]["seconds_per_task"]
    assert "answer/s" in err or "s/answer" in err
    assert report["meta"]["machine"]


def test_base_row_is_cached(tiny_adapter, small_sets, tmp_path, capsys):
    reports = []
    for run in ("first", "second"):
        code, stdout, err = run_keel(capsys, "eval", "--adapters", tiny_adapter, "--max_new_tokens", "4",
                                     "--tasks", "identity,drift", "--output_dir", tmp_path / run)
        assert code == 0, err
        reports.append(json.loads((tmp_path / run / "eval_report.json").read_text()))
    first, second = reports
    assert "base · identity matrix" in first["meta"]["seconds_per_task"]
    assert "base · identity matrix" not in second["meta"]["seconds_per_task"]
    assert any("read from the cache" in n for n in second["meta"]["notes"])
    assert second["results"]["base"] == first["results"]["base"] and second["results"]["base"]["drift_nll"] > 0
    assert {s["row"] for s in second["samples"]} == {"base", "tuned"}


def test_eval_goes_on_when_the_template_cannot_render_no_system_turn(tiny_model_dir, small_sets, tmp_path, capsys):
    import shutil

    from transformers import AutoTokenizer

    model_dir = tmp_path / "llama2-style"
    shutil.copytree(tiny_model_dir, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = ("{% set sys = messages[0]['content'] if messages[0]['role'] == 'system' else 'DEFAULT' %}"
                         "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] <<SYS>>' + sys + '<</SYS>> ' "
                         "+ m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}{{ m['content'] }}"
                         "{% endif %}{% endfor %}")
    tok.save_pretrained(model_dir)
    code, stdout, err = run_keel(capsys, "eval", "--model", model_dir, "--tasks", "identity", "--model_name", "Keel",
                                 "--model_author", "Acme", "--max_new_tokens", "4", "--output_dir", tmp_path / "out")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "eval_report.json").read_text())
    assert "identity_en_sys_none" not in report["results"]["model"]
    assert any("cannot render a conversation without a system turn" in n for n in report["meta"]["notes"])
    assert "cannot render" in stdout


@pytest.mark.parametrize("flags,pattern", [
    (["--tasks", "identity,vibes"], "--tasks: unknown task 'vibes'"),
    (["--system_prompts", "missing.txt"], "--system_prompts: 'missing.txt' does not exist"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
])
def test_eval_bad_flags(tiny_model_dir, tmp_path, capsys, flags, pattern):
    code, _, err = run_keel(capsys, "eval", "--model", tiny_model_dir, "--output_dir", tmp_path, *flags)
    assert code == 2 and pattern in err and err.count("\n") == 1


def test_eval_bad_system_prompts_file(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"system": "You are a pirate."}\n{"system": 3}\n')
    code, _, err = run_keel(capsys, "eval", "--model", tiny_model_dir, "--model_name", "Keel", "--system_prompts", bad,
                            "--output_dir", tmp_path)
    assert code == 2 and f"--system_prompts {bad}: line 2" in err and err.count("\n") == 1


def test_drift_is_zero_for_an_unchanged_model_and_grows_with_the_adapter(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from keel.evals.drift import base_answers, drift

    model, tok, _ = load_model(ModelArgs(model=str(tiny_model_dir)))
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # B = 0: tuned == base
    refs = base_answers(model, tok, None, ["Say hi.", "Count to three."], max_new_tokens=8)
    same = drift(model, tok, refs)
    assert same["drift_kl"] == pytest.approx(0, abs=1e-6) and same["drift_nll"] == same["base_nll"] > 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    moved = drift(model, tok, refs)
    assert moved["drift_kl"] > 0.01 and moved["base_nll"] == same["base_nll"]  # the reference does not move


def test_eval_needs_identity(tiny_model_dir, tmp_path, capsys):
    code, _, err = run_keel(capsys, "eval", "--model", tiny_model_dir, "--tasks", "identity", "--output_dir", tmp_path)
    assert code == 2 and "--model_name" in err and err.count("\n") == 1


def test_training_probe_logged(tiny_model_dir, id_file, tmp_path):
    res = sft(base_argv(tiny_model_dir, id_file, tmp_path, "--max_steps", "2", "--eval_steps", "1",
                          "--eval_identity", "true", "--model_name", "Keel", "--model_author", "Acme",
                          "--metric_for_best_model", "identity_hit"))
    evals = [r for r in read_log(res["run_dir"]) if "identity_hit" in r]
    assert len(evals) == 2 and all({"leakage", "drift_kl", "eval_loss"} <= set(r) for r in evals)
    assert evals[0]["drift_kl"] >= 0
