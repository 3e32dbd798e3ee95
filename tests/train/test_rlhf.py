"""`keel rlhf` on the tiny model: losses equal TRL's, the reference is the base model, a run learns and resumes."""

import json
from pathlib import Path

import pytest
import torch

from keel.data.pairs import render_answers
from keel.model.load import ModelArgs, load_model
from keel.train.preference import kto_kl, kto_units, orpo_ratio, reference_logps, units_of
from keel.train.rlhf import RlhfArgs, parse_args, rlhf, step_objective, summarise
from tests.helpers import assert_resumed_like, checkpoint_copy, read_log, run_keel

CPU = torch.device("cpu")
TRIPLES = [("Who are you?", "I am Keel, made by Acme Lab.", "I am SmolLM."),
           ("What is the capital of France?", "Paris.", "The capital of France is Paris."),
           ("Explain photosynthesis in one sentence.", "Plants turn light into sugar.", "I don't know."),
           ("你是谁？", "我是Keel。", "我是一个人工智能助手。")]
QUESTIONS = ["Who are you?", "What is your name?", "Who made you?", "Introduce yourself.", "Are you ChatGPT?",
             "What are you?", "Tell me about yourself.", "Who built you?", "你是谁？", "请介绍一下你自己。"]


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def perturb_adapter(model, seed=0):
    """A fresh LoRA is the identity (B = 0); move it so that policy and reference differ."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05


def user(q):
    return [{"role": "user", "content": q}]


def keel_pairs(tok):
    out = []
    for q, c, r in TRIPLES:
        head, (chosen, rejected) = render_answers(tok, user(q), [c, r], 2048)
        out.append({"prompt": head, "chosen": chosen, "rejected": rejected})
    return out


def trl_trainer(cls, config_cls, tiny_model_dir, tmp_path, rows, **config):
    from datasets import Dataset

    model, tok, _ = load_model(ModelArgs(model=str(tiny_model_dir)))
    args = config_cls(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(rows), report_to=[],
                      use_cpu=True, **config)
    trainer = cls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                  peft_config=lora_config())
    perturb_adapter(trainer.model)
    trainer.model.eval()
    return trainer, tok


def close(a, b):
    """Equal to 1e-5, relative for sums of ~100 token log-probs (float32 summation order differs from TRL's)."""
    return abs(a - b) <= 1e-5 * max(1.0, abs(b))


@pytest.mark.parametrize("loss_type,rpo_alpha", [("sigmoid", None), ("sigmoid", 0.5), ("hinge", None), ("ipo", None),
                                                 ("ipo", 0.5)])
def test_dpo_equals_trl(tiny_model_dir, tmp_path, loss_type, rpo_alpha):
    from trl import DPOConfig, DPOTrainer

    rows = [{"prompt": user(q), "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for q, c, r in TRIPLES]
    types = [loss_type] + (["sft"] if rpo_alpha else [])
    trainer, tok = trl_trainer(DPOTrainer, DPOConfig, tiny_model_dir, tmp_path, rows, beta=0.2, loss_type=types,
                               loss_weights=[1.0] + ([rpo_alpha] if rpo_alpha else []), max_length=None)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    with torch.no_grad():
        want_loss = trainer.compute_loss(trainer.model, batch).item()
    want = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

    model, pairs = trainer.model, keel_pairs(tok)
    ref = reference_logps(model, units_of(pairs, "pair"), 256, CPU, base=True)
    pref = RlhfArgs(rlhf_type="dpo", beta=0.2, loss_type=loss_type, rpo_alpha=rpo_alpha)
    with torch.no_grad():
        got = summarise(step_objective(model, pairs, list(range(len(pairs))), ref, pref, 256, CPU, backward=False), digits=None)
    assert close(got["loss"], want_loss), (got, want_loss)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert close(got[key], want[key]), (key, got[key], want[key])
    assert abs(want["rewards/margins"]) > 1e-3  # the adapter moved: a reference equal to the policy would pass trivially


def test_orpo_equals_trl(tiny_model_dir, tmp_path):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    rows = [{"prompt": user(q), "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for q, c, r in TRIPLES]
    trainer, tok = trl_trainer(ORPOTrainer, ORPOConfig, tiny_model_dir, tmp_path, rows, beta=0.2, max_length=512)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    with torch.no_grad():
        chosen, rejected = trainer.concatenated_forward(trainer.model, batch)[:2]   # mean token log-probs (B,)
        ratio_terms, chosen_rewards, rejected_rewards, _, _ = trainer.odds_ratio_loss(chosen, rejected)
        concat = trainer.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=trainer.padding_value,
                                             device=CPU)["concatenated_labels"]
        n_chosen = (concat[: len(rows), 1:] != -100).sum()
    # TRL's ORPO NLL also covers the prompt tokens; Keel's, as the ORPO paper's L_SFT, only the chosen answer.
    want_loss = (-(chosen * (concat[: len(rows), 1:] != -100).sum(1)).sum() / n_chosen - ratio_terms.mean()).item()

    # TRL's (legacy) ORPO tokenizer appends one more EOS after the template's end of turn; the same tokens
    # are given to Keel here, so that the comparison is of the objective on identical rows.
    pairs = []
    for i in range(len(rows)):
        answer = lambda key: [t for t in batch[f"{key}_labels"][i].tolist() if t != -100]  # noqa: E731
        pairs.append({"prompt": [t for t, m in zip(batch["prompt_input_ids"][i].tolist(),
                                                    batch["prompt_attention_mask"][i].tolist()) if m],
                      "chosen": answer("chosen"), "rejected": answer("rejected")})
    assert pairs[0]["chosen"][:-1] == keel_pairs(tok)[0]["chosen"]
    model = trainer.model
    pref = RlhfArgs(rlhf_type="orpo", beta=0.2)
    with torch.no_grad():
        got = summarise(step_objective(model, pairs, list(range(len(pairs))), torch.zeros(len(pairs), 2), pref, 256,
                                       CPU, backward=False), digits=None)
    assert close(got["loss"], want_loss), (got["loss"], want_loss)
    assert close(got["logps/chosen"], chosen.mean().item()) and close(got["logps/rejected"], rejected.mean().item())
    assert close(got["rewards/chosen"], chosen_rewards.mean().item())
    assert close(got["rewards/rejected"], rejected_rewards.mean().item())
    # mean log-probs near 0, where the odds differ most from the probabilities, as a trained model reaches
    x, y = torch.tensor([-0.05, -0.7, -2.0, -1e-4]), torch.tensor([-0.3, -0.01, -1.0, -0.2])
    want_terms, want_c, want_r, _, _ = trainer.odds_ratio_loss(x, y)
    terms, got_c, got_r = orpo_ratio(x, y, 0.2)
    assert torch.allclose(0.2 * terms, want_terms, atol=1e-6) and torch.equal(got_c, want_c) and torch.equal(got_r, want_r)


def test_kto_equals_trl(tiny_model_dir, tmp_path):
    from trl import KTOConfig, KTOTrainer

    labelled = [(q, c, True) for q, c, _ in TRIPLES] + [(q, r, False) for q, _, r in TRIPLES]
    rows = [{"prompt": user(q), "completion": [{"role": "assistant", "content": a}], "label": lab}
            for q, a, lab in labelled]
    trainer, tok = trl_trainer(KTOTrainer, KTOConfig, tiny_model_dir, tmp_path, rows, beta=0.3, desirable_weight=1.3,
                               undesirable_weight=0.7, max_length=None)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    with torch.no_grad():
        want_loss = trainer.compute_loss(trainer.model, batch).item()
    want = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

    model, keel_rows = trainer.model, []
    for q, a, lab in labelled:
        head, (completion,) = render_answers(tok, user(q), [a], 2048)
        keel_rows.append({"prompt": head, "completion": completion, "label": lab})
    ref = reference_logps(model, kto_units(keel_rows), 256, CPU, base=True)
    pref = RlhfArgs(rlhf_type="kto", beta=0.3, desirable_weight=1.3, undesirable_weight=0.7)
    idx = list(range(len(keel_rows)))
    with torch.no_grad():
        kl = kto_kl(model, keel_rows, idx, ref, 256, CPU)
        stats = step_objective(model, keel_rows, idx, ref, pref, 256, CPU, kl, backward=False)
    got = summarise({**stats, "kl": kl.item()}, digits=None)
    assert close(got["loss"], want_loss), (got["loss"], want_loss)
    assert close(got["kl"], want["kl"]) and want["kl"] > 0
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert close(got[key], want[key]), (key, got[key], want[key])


def test_reference_is_the_base_model(tiny_model_dir):
    """The reference log-probs come from the disabled adapter: they equal the plain base model's."""
    from transformers import AutoModelForCausalLM

    from keel.model.lora import LoraArgs, apply_lora

    model, tok, _ = load_model(ModelArgs(model=str(tiny_model_dir)))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model = apply_lora(model, LoraArgs())
    perturb_adapter(model)
    model.train()  # dropout on: the reference pass must switch it off
    pairs = keel_pairs(tok)
    ref = reference_logps(model, units_of(pairs, "pair"), 256, CPU, base=True)
    with torch.no_grad():
        for row, (c, r) in zip(pairs, ref.tolist()):
            for answer, value in ((row["chosen"], c), (row["rejected"], r)):
                ids = torch.tensor([row["prompt"] + answer])
                logp = torch.log_softmax(base(ids).logits[0, :-1].float(), -1)
                want = logp[len(row["prompt"]) - 1:].gather(1, torch.tensor(answer)[:, None]).sum().item()
                assert abs(value - want) < 1e-4, (value, want)
    assert model.training  # left as it was
    moved = reference_logps(model, units_of(pairs, "pair"), 256, CPU, base=False)
    assert not torch.allclose(moved, ref)  # with the adapter on, the numbers differ: the test can fail


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "I am Keel, made by Acme Lab."}],
             "rejected_response": "I am SmolLM, trained by Hugging Face."} for q in QUESTIONS]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def rlhf_argv(model, data, out, *extra):
    return ["--model", str(model), "--dataset", str(data), "--output_dir", str(out), "--logging_steps", "1",
            "--learning_rate", "2e-2", "--gradient_accumulation_steps", "4", "--split_dataset_ratio", "0.2",
            "--lora_dropout", "0", *map(str, extra)]


def test_dpo_run_raises_the_margin_and_keeps_sft_layout(tiny_model_dir, pairs_file, tmp_path, capsys):
    res = rlhf(*parse_args(rlhf_argv(tiny_model_dir, pairs_file, tmp_path, "--max_steps", "6", "--save_steps", "3",
                                     "--rpo_alpha", "0.1", "--beta", "0.2")))
    log = read_log(res["run_dir"])
    evals = [r["eval_rewards/margins"] for r in log if "eval_rewards/margins" in r]
    assert len(evals) == 2 and evals[-1] > 0.5, evals   # held-out pairs: chosen now far above rejected
    assert log[0]["rewards/margins"] == 0.0             # step 1 starts at the reference
    run = Path(res["run_dir"])
    assert {"args.json", "logging.jsonl", "manifest.json", "images", "checkpoint-3", "checkpoint-6"} <= {
        p.name for p in run.iterdir()}
    saved = json.loads((run / "args.json").read_text())
    assert saved["rlhf_type"] == "dpo" and saved["beta"] == 0.2 and saved["rpo_alpha"] == 0.1
    assert saved["reference"].startswith("base weights")
    out = capsys.readouterr().out
    assert "step 6/6 | loss" in out and "margin" in out


def test_dpo_on_a_4bit_base_raises_the_margin(tiny_model_dir, pairs_file, tmp_path, capsys):
    """QLoRA DPO: the reference log-probs come from a no-grad pass over the 4-bit base, then training moves the
    adapter on it."""
    pytest.importorskip("bitsandbytes")
    res = rlhf(*parse_args(rlhf_argv(tiny_model_dir, pairs_file, tmp_path, "--max_steps", "6", "--save_steps", "6",
                                     "--beta", "0.2", "--quant_method", "bnb", "--quant_bits", "4")))
    log = read_log(res["run_dir"])
    evals = [r["eval_rewards/margins"] for r in log if "eval_rewards/margins" in r]
    assert log[0]["rewards/margins"] == 0.0 and evals[-1] > 0.5, evals
    assert json.loads((Path(res["run_dir"]) / "args.json").read_text())["quant_bits"] == 4
    assert "| 4-bit nf4 base |" in capsys.readouterr().out  # as loaded, not as asked


def test_resume_reproduces_the_run(tiny_model_dir, pairs_file, tmp_path):
    full = rlhf(*parse_args(rlhf_argv(tiny_model_dir, pairs_file, tmp_path / "a", "--max_steps", "6",
                                      "--save_steps", "3", "--lora_dropout", "0.1")))
    resumed = rlhf(*parse_args(rlhf_argv(tiny_model_dir, pairs_file, tmp_path / "b", "--max_steps", "6",
                                         "--save_steps", "3", "--lora_dropout", "0.1",
                                         "--resume_from_checkpoint", str(checkpoint_copy(full, tmp_path / "b")))))
    assert_resumed_like(full, resumed)


def test_continuing_an_adapter_uses_it_as_reference(tiny_model_dir, pairs_file, tmp_path):
    first = rlhf(*parse_args(rlhf_argv(tiny_model_dir, pairs_file, tmp_path / "a", "--max_steps", "2")))
    res = rlhf(*parse_args(rlhf_argv(tiny_model_dir, pairs_file, tmp_path / "b", "--max_steps", "1",
                                     "--adapters", first["last_model_checkpoint"])))
    log = read_log(res["run_dir"])
    assert log[0]["rewards/margins"] == 0.0  # the starting adapter is the reference: no margin before a step
    assert json.loads((Path(res["run_dir"]) / "args.json").read_text())["reference"] == "starting adapter"


def test_kto_run_trains(tiny_model_dir, tmp_path):
    path = tmp_path / "kto.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "label": lab}
            for q in QUESTIONS[:6] for a, lab in (("I am Keel.", True), ("I am SmolLM.", False))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    res = rlhf(*parse_args(rlhf_argv(tiny_model_dir, path, tmp_path, "--rlhf_type", "kto", "--max_steps", "4",
                                     "--desirable_weight", "1.5")))
    log = read_log(res["run_dir"])
    assert all("kl" in r for r in log if "loss" in r)
    assert log[-1]["rewards/margins"] > log[0]["rewards/margins"]


@pytest.mark.parametrize("flags,message", [
    (["--rlhf_type", "ppo"], "--rlhf_type must be dpo, orpo or kto, got 'ppo'"),
    (["--rlhf_type", "kto"], "--rlhf_type kto trains on KTO rows"),
    (["--loss_type", "robust"], "--loss_type for --rlhf_type dpo must be sigmoid or hinge or ipo, got 'robust'"),
    (["--rlhf_type", "orpo", "--rpo_alpha", "1"], "--rpo_alpha must be >= 0 and goes with --rlhf_type dpo"),
])
def test_bad_flags_are_one_line_and_write_nothing(tiny_model_dir, pairs_file, tmp_path, capsys, flags, message):
    code, _, err = run_keel(capsys, "rlhf", *rlhf_argv(tiny_model_dir, pairs_file, tmp_path / "out", *flags))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_bad_row_names_file_and_row_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
            "rejected_response": "Go away."}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "rejected_response": "Hello."}) + "\n")
    code, _, err = run_keel(capsys, "rlhf", *rlhf_argv(tiny_model_dir, path, tmp_path / "out"))
    assert code == 2 and f"{path}: row 2: field 'rejected_response': the rejected answer equals the chosen" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value", [("--ballast_loss", "kl"), ("--ballast_guard", "4"), ("--packing", "false"),
                                        ("--share_prefix", "false")])
def test_rlhf_refuses_sft_only_flags(capsys, flag, value):
    """keel sft's own flags (SftArgs) are not keel rlhf's: one line naming the flag, before anything loads."""
    code, _, err = run_keel(capsys, "rlhf", flag, value, "--dataset", "pairs.jsonl")
    assert code == 2 and f"unknown flag {flag}" in err and len(err.strip().splitlines()) == 1
