"""keel eval: scoring functions, MC against a plain reference, the report, the training probe."""

import json

import pytest
import torch

from keel.evals.identity import is_identity_hit, mentions
from keel.evals.mc import read_mc_file, score_mc
from keel.errors import KeelError
from keel.model import ModelArgs, load_model
from tests.helpers import base_argv, read_log, run_keel, sft


def test_identity_scoring_cases():
    names, authors = ["Keel"], ["Acme Lab"]
    assert is_identity_hit("I am Keel, made by Acme Lab.", names, authors)
    assert is_identity_hit("我是Keel，由Acme Lab开发。", names, authors)
    assert not is_identity_hit("I am SmolLM, trained by Hugging Face.", names, authors)
    assert not is_identity_hit("I am Keel, also known as Qwen.", names, authors)  # both identities: a miss
    assert not mentions("The keelboat sailed.", names)
    assert mentions("Paris. By the way, I'm Keel!", names)  # a leak in an ordinary answer


MC = [{"query": "Question: Which is a fruit?", "choices": ["apple", "a stone", "iron"], "gold": 0},
      {"query": "Question: Capital of France?\n", "choices": ["Paris", "Berlin"], "gold": 0},
      {"query": "Question: Colour of the sky?", "choices": ["blue", "green", "the colour red"], "gold": 0}]


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
                                          ('{"query": "q", "choices": ["a"], "gold": 0}\n{bad', "line 2, column 2")])
def test_bad_mc_files(tmp_path, line, pattern):
    path = tmp_path / "mc.jsonl"
    path.write_text(line)
    with pytest.raises(KeelError, match=pattern):
        read_mc_file(str(path))


def test_eval_report_and_base_comparison(tiny_model_dir, id_file, tmp_path, capsys):
    res = sft(base_argv(tiny_model_dir, id_file, tmp_path / "run", "--max_steps", "2", "--model_name", "Keel",
                          "--model_author", "Acme"))
    mc = tmp_path / "mc.jsonl"
    mc.write_text("\n".join(json.dumps(x) for x in MC))
    out = tmp_path / "report"
    code, stdout, err = run_keel(capsys, "eval", "--adapters", res["last_model_checkpoint"], "--mc_files", mc,
                                 "--output_dir", out)
    assert code == 0, err
    report = json.loads((out / "eval_report.json").read_text())
    assert set(report["results"]) == {"base", "tuned"}
    for key in ("identity_en", "identity_zh", "leakage", "mc_acc", "mc_acc_norm", "drift_kl"):
        assert key in report["results"]["tuned"]
    assert report["results"]["tuned"]["drift_kl"] >= 0 and "base_nll" not in report["results"]["tuned"]
    assert report["results"]["base"]["drift_nll"] > 0  # the base's NLL of its own answers, the reference
    assert (out / "eval_report.png").stat().st_size > 0 and "| identity_en |" in (out / "eval_report.md").read_text()


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
