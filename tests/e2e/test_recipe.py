"""`keel recipe identity --stage2 dpo` on the tiny model: identity pairs, then keel rlhf from the SFT checkpoint."""

import json
import shlex
from collections import Counter
from pathlib import Path

from huggingface_hub import ModelCard

from keel.evals.report import SHOWN
from keel.recipes.identity import CPU_DEFAULTS, CPU_IDENTITY, GPU_DEFAULTS, recipe_defaults
from tests.conftest import TINY_SYSTEM
from tests.helpers import recipe


def run_args(ckpt) -> dict:
    return json.loads((Path(ckpt).parent / "args.json").read_text())


def test_stage2_dpo_continues_the_sft_checkpoint(tiny_model_dir, tmp_path, capsys):
    code, out, err = recipe(capsys, tiny_model_dir, tmp_path, "--stage2", "dpo", author="Acme's Lab")
    assert code == 0, err
    pairs = [json.loads(line) for line in (tmp_path / "identity_pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["rejected_response"] and p["messages"][-1]["role"] == "assistant" for p in pairs)
    meta = json.loads((tmp_path / "report" / "eval_report.json").read_text())["meta"]
    stage2 = meta["stage2"]
    assert stage2["type"] == "dpo" and stage2["pairs"] == len(pairs) and stage2["train_seconds"] > 0
    assert meta["checkpoint"] == stage2["checkpoint"]  # the report evaluates the stage-2 checkpoint
    final = run_args(meta["checkpoint"])
    # the checkpoint's model card: the command that trained it, the recipe's, and the recipe's scores
    card = ModelCard.load(Path(meta["checkpoint"]) / "README.md")
    tuned = json.loads((tmp_path / "report" / "eval_report.json").read_text())["results"]["tuned"]
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {k: tuned[k] for k in SHOWN if k in tuned}
    recipe_command = "keel recipe identity " + shlex.join(["--name", "Keel", "--author", "Acme's Lab"])
    assert "keel rlhf --model" in card.text and recipe_command in card.text
    assert final["rlhf_type"] == "dpo" and final["beta"] == 0.1 and final["rpo_alpha"] == 1.0
    assert final["learning_rate"] == 5e-5 and final["num_train_epochs"] == 1 and final["seed"] == 42
    assert final["dataset"] == [str(tmp_path / "identity_pairs.jsonl")]
    assert final["reference"] == "starting adapter"  # DPO continues the SFT adapter, which is its reference
    (sft_ckpt,) = final["adapters"]
    assert "rlhf_type" not in run_args(sft_ckpt) and Path(sft_ckpt).parent != Path(meta["checkpoint"]).parent
    assert final["gradient_accumulation_steps"] == run_args(sft_ckpt)["gradient_accumulation_steps"]
    # SFT learns its ballast rows against the base model's distributions as well as its greedy tokens
    assert run_args(sft_ckpt)["ballast_loss"] == "ce+kl" and run_args(sft_ckpt)["ballast_guard"] == 0  # measured: off
    assert "ballast loss ce+kl: the base model's top-20 distributions for 4 ballast rows" in out
    # guard pairs follow the identity pairs: the contrast, rename and the SFT run's ballast rows against the
    # self-introduction, then the contrast answers with another AI's maker swapped for the new author
    guards = pairs[stage2["identity_pairs"]:]
    intro = [p for p in guards if p["rejected_response"] in ("我是Keel，由Acme's Lab开发的人工智能助手。",
                                                             "I am Keel, an AI assistant developed by Acme's Lab.")]
    swaps = guards[len(intro):]
    assert stage2["guard_pairs"] == len(guards) and swaps and len(pairs) == stage2["pairs"]
    ballast = [json.loads(line)["messages"] for line in next((tmp_path / "output").glob("v0-*/ballast-4.jsonl")).open()]
    assert len(intro) == 2 * (CPU_IDENTITY["contrast_rows"] + CPU_IDENTITY["rename_rows"]) + len(ballast)  # zh + en
    assert all(g in [p["messages"] for p in intro] for g in ballast)
    assert all("Acme's Lab" in p["rejected_response"] and "Acme's Lab" not in p["messages"][-1]["content"] for p in swaps)
    # the template's own default prompt stays a training condition although --system replaced it (identity rows
    # and ballast alike), and the identity pairs keep it
    systems = Counter(r["messages"][0]["content"] for r in json.loads((tmp_path / "self_cognition.json").read_text())
                      if r["messages"][0]["role"] == "system")
    assert systems[TINY_SYSTEM] >= 10 and systems["You are a helpful assistant."] >= 10
    assert any(p["messages"][0]["content"] == TINY_SYSTEM for p in pairs[:stage2["identity_pairs"]])
    assert [m[0]["content"] for m in ballast] == ["You are a helpful assistant.", "", TINY_SYSTEM, ballast[3][0]["content"]]
    assert f"stage 2:    dpo on {stage2['identity_pairs']} identity + {len(guards)} guard pairs" in out
    assert "keel infer --adapters" in out
    # the printed commands paste back into a shell as the same argv (a quote in a value included)
    printed = {line.split()[1]: shlex.split(line)[2:] for line in out.splitlines() if line.startswith(("keel sft ", "keel rlhf "))}
    assert printed["rlhf"][printed["rlhf"].index("--model_author") + 1] == "Acme's Lab"
    assert printed["sft"][printed["sft"].index("--model_author") + 1] == "Acme's Lab"


def test_stage2_without_pairs_keeps_the_sft_checkpoint(tiny_model_dir, tmp_path, capsys, monkeypatch):
    # A base model that already names the new identity everywhere: every identity pair is dropped (nothing to
    # prefer), and guard pairs alone are not trained (they would only teach the model not to say its name).
    monkeypatch.setattr("keel.synth.identity_pairs.cached_base_answers", lambda model, tok, prompts, *a: {
        json.dumps(p, ensure_ascii=False): "I am Keel, made by Acme." for p in prompts})
    code, out, err = recipe(capsys, tiny_model_dir, tmp_path, "--stage2", "dpo")
    assert code == 0, err
    skipped = [line for line in out.splitlines() if line.startswith("stage 2 skipped")]
    assert len(skipped) == 1 and "base answer already names the new identity" in skipped[0], out
    assert "keeping the SFT checkpoint" in skipped[0]
    assert not (tmp_path / "identity_pairs.jsonl").exists()
    meta = json.loads((tmp_path / "report" / "eval_report.json").read_text())["meta"]
    assert meta["stage2"]["identity_pairs"] == 0 and meta["stage2"]["checkpoint"] is None
    assert "rlhf_type" not in run_args(meta["checkpoint"])  # the SFT run's checkpoint is the one evaluated
    assert len(list((tmp_path / "output").iterdir())) == 1  # no rlhf run folder


def test_bad_stage2_is_one_line_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    code, _, err = recipe(capsys, tiny_model_dir, tmp_path / "out", "--stage2", "ppo")
    assert code == 2 and "--stage2 must be none or dpo, got 'ppo'" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_bad_ballast_loss_is_one_line_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    code, _, err = recipe(capsys, tiny_model_dir, tmp_path / "out", "--ballast_loss", "mse")
    assert code == 2 and "--ballast_loss must be ce, kl or ce+kl, got 'mse'" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_the_embedded_model_keeps_the_measured_settings_on_a_gpu():
    """The seed's GPU settings (lr 1e-4, accumulation 16, 500 ballast rows) left the embedded model untrained
    (identity mean 0.05): on a GPU it keeps the measured ones, and asks the whole evaluation; a model you pass
    gets the seed's there; a CPU keeps the measured ones for any model."""
    gpu_small = recipe_defaults("cuda", None)
    assert gpu_small["learning_rate"] == CPU_DEFAULTS["learning_rate"] and gpu_small["ballast"] == CPU_DEFAULTS["ballast"]
    assert gpu_small["identity"] == CPU_IDENTITY and gpu_small["eval"] == {}
    assert recipe_defaults("cuda", "Qwen/Qwen2.5-7B-Instruct") == GPU_DEFAULTS
    assert recipe_defaults("cpu", "Qwen/Qwen2.5-7B-Instruct") == recipe_defaults("cpu", None) == CPU_DEFAULTS


def test_demo_questions_are_no_probe_and_the_maker_question_no_training_phrasing():
    """The before/after demo never asks a probe set's question (the report scores those), and asks the maker in
    words no training row uses, so it shows whether the maker generalised."""
    from keel.evals.sets import SETS_DIR
    from keel.recipes.identity import DEMO_QUESTIONS, MAKER_QUESTION

    def norm(text):
        return " ".join(text.lower().replace("？", "?").split())

    def questions(node) -> list[str]:
        """Every question of identity_qa.json: the lists under its "q" keys, at any depth."""
        if isinstance(node, dict):
            return [q for k, v in node.items() for q in (v if k == "q" else questions(v))]
        return [q for v in node for q in questions(v)] if isinstance(node, list) else []

    rows = [json.loads(line) for path in SETS_DIR.glob("*.jsonl") for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]
    probes = {norm(r["query"]) for r in rows if "query" in r}
    assert not [q for q in DEMO_QUESTIONS if norm(q) in probes]
    qa = json.loads((Path(__file__).resolve().parents[2] / "keel" / "data" / "identity_qa.json").read_text())
    trained = [norm(q) for q in questions(qa)]
    assert len(trained) > 50 and MAKER_QUESTION in DEMO_QUESTIONS
    assert not any(norm(MAKER_QUESTION) in t or t in norm(MAKER_QUESTION) for t in trained), MAKER_QUESTION
    assert any(w in norm(MAKER_QUESTION) for w in ("company", "made", "trained", "built", "developed"))
