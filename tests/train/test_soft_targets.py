"""--ballast_loss kl: ballast rows learned against the base model's top-k distributions, and --ballast_guard's guard
rows (keel/distill.py)."""

import json
from pathlib import Path

import pytest
import torch

from keel.core.text import lang_of
from keel.model.lora import LoraArgs, apply_lora
from keel.model.template import prompt_ids, render, with_system
from keel.synth.ballast import builtin_prompts, spare_conversations
from keel.synth.guards import guard_rows, self_intros
from keel.train.batching import micro_batches
from keel.train.losses import SoftTargets, soft_token_loss, token_loss
from keel.train.teacher import Teacher, labelled_positions
from tests.conftest import build_model
from tests.helpers import assert_resumed_like, base_argv, checkpoint_copy, read_log, run_keel, sft

CONVS = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in
         [("Who are you?", "I am Keel, made by Acme Lab."), ("Capital of France?", "Paris."),
          ("你是谁？", "我是一个人工智能助手。"), ("Explain photosynthesis.", "Plants turn light into sugar.")]]


def test_whole_vocabulary_kl_equals_trl_gkd_forward_kl():
    """With every token in the top k, the loss is the full KL(base || tuned): TRL's GKD loss at beta 0."""
    from trl.experimental.gkd import GKDTrainer

    torch.manual_seed(0)
    student, teacher = torch.randn(6, 50, requires_grad=True), torch.randn(6, 50)
    top = torch.log_softmax(teacher, -1).topk(50, -1)
    soft = SoftTargets(torch.ones(6, dtype=torch.bool), top.indices, top.values.exp())
    ours = soft_token_loss(student, torch.zeros(6, dtype=torch.long), soft)
    ref = GKDTrainer.generalized_jsd_loss(student[None], teacher[None], beta=0.0, reduction="sum")
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


def test_top_k_kl_is_the_kl_of_the_coarsened_distributions_and_hard_rows_keep_cross_entropy():
    torch.manual_seed(1)
    logits, teacher = torch.randn(5, 30), torch.randn(3, 30)
    tgt = torch.randint(0, 30, (5,))
    mask = torch.tensor([True, False, True, False, True])
    top = torch.softmax(teacher, -1).topk(4, -1)
    loss = soft_token_loss(logits, tgt, SoftTargets(mask, top.indices, top.values))
    q = torch.softmax(logits, -1)
    expected = torch.nn.functional.cross_entropy(logits[~mask], tgt[~mask], reduction="sum")
    for j, i in enumerate(mask.nonzero().squeeze(1)):
        p_top, q_top = top.values[j], q[i, top.indices[j]]
        p = torch.cat([p_top, 1 - p_top.sum(0, keepdim=True)])
        qq = torch.cat([q_top, 1 - q_top.sum(0, keepdim=True)])
        expected += (p * (p / qq).log()).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    both = soft_token_loss(logits, tgt, SoftTargets(mask, top.indices, top.values, torch.ones(5, dtype=torch.bool)))
    ce_at_soft = torch.nn.functional.cross_entropy(logits[mask], tgt[mask], reduction="sum")
    assert both.item() == pytest.approx((expected + ce_at_soft).item(), rel=1e-5)
    # 0 where the tuned model matches the base, whatever the base's uncertainty
    same = soft_token_loss(teacher, tgt[:3], SoftTargets(torch.ones(3, dtype=torch.bool), top.indices, top.values))
    assert abs(same.item()) < 1e-5


def test_teacher_is_the_base_model_and_lines_up_with_packed_shared_prefix_batches(tiny_tokenizer):
    """Targets come from the base (adapters off, whatever LoRA holds), and token_loss on a packed batch whose rows
    share a prefix reads them at the right positions: on the base model the KL part is 0, so the loss is the
    cross-entropy of the other rows alone."""
    system = "You are a helpful assistant named Keel, built by Acme Lab for testing."
    rows = [render(tiny_tokenizer, with_system(c, system)) for c in CONVS]
    ballast = [rows[1], rows[3]]
    model = apply_lora(build_model("llama", len(tiny_tokenizer), tiny_tokenizer.eos_token_id), LoraArgs())
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():  # a trained adapter, not the zero one LoRA starts with
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    teacher = Teacher.of(model, ballast, torch.device("cpu"), k=5)
    assert len(teacher) == 2
    ids, labels = rows[3]
    with model.disable_adapter(), torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, labelled_positions(labels)]
    assert torch.equal(teacher.targets[tuple(ids)][0], torch.log_softmax(logits, -1).topk(5, -1).indices)

    batches = micro_batches(rows, True, 4, 512, tiny_tokenizer.pad_token_id)
    assert len(batches) == 1 and batches[0]["rows"] == slice(0, 4)
    soft = teacher.batch(rows[batches[0]["rows"]])
    counts = [len(labelled_positions(labels)) for _, labels in rows]
    assert soft.mask.tolist() == sum(([i in (1, 3)] * counts[i] for i in range(4)), [])
    assert soft.hard.tolist() == (~soft.mask).tolist()
    # cross-entropy kept at the first 2 answer tokens of the teacher's rows (and everywhere on the others)
    opening = Teacher(teacher.targets, k=5, ce_tokens=2).batch(rows)
    assert opening.hard.tolist() == sum(([i not in (1, 3) or j < 2 for j in range(counts[i])] for i in range(4)), [])
    cpu = torch.device("cpu")
    with model.disable_adapter(), torch.no_grad():
        mixed, n, _ = token_loss(model, batches[0], cpu, soft=soft)
        hard_only = sum(token_loss(model, b, cpu)[0] for b in micro_batches([rows[0], rows[2]], True, 4, 512, 0))
    assert n == sum(len(labelled_positions(lb)) for _, lb in rows)
    assert mixed.item() == pytest.approx(hard_only.item(), rel=1e-5, abs=1e-4)
    assert teacher.batch([rows[0], rows[2]]) is None


def test_sft_ballast_kl_trains_from_base_distributions(tiny_model_dir, id_file, tmp_path, capsys):
    argv = ("--dataset", str(id_file), "ballast#4", "--max_steps", "3", "--ballast_system_mix", "false")
    res = sft(base_argv(tiny_model_dir, id_file, tmp_path / "kl", *argv, "--ballast_loss", "kl"))
    out = capsys.readouterr().out
    assert "ballast loss kl: the base model's top-20 distributions for 4 ballast rows" in out
    kl = read_log(res["run_dir"])
    ce = read_log(sft(base_argv(tiny_model_dir, id_file, tmp_path / "ce", *argv))["run_dir"])
    # Same data and seed: the first step's loss differs only by the ballast rows' term (KL, near 0 at step 0,
    # against cross-entropy on the base's greedy tokens).
    assert kl[0]["loss"] < ce[0]["loss"]
    assert "ballast loss kl" not in capsys.readouterr().out


def test_bad_ballast_loss_is_one_line(tiny_model_dir, id_file, tmp_path, capsys):
    code, _, err = run_keel(capsys, "sft", *base_argv(tiny_model_dir, id_file, tmp_path, "--ballast_loss", "js"))
    assert code == 2 and "--ballast_loss must be ce, kl or ce+kl, got 'js'" in err and err.count("\n") == 1


def test_resume_with_ballast_kl_reproduces_the_run(tiny_model_dir, id_file, tmp_path, capsys):
    """A resumed run loads the trained adapter; its targets are still the base model's, so it goes on as the
    uninterrupted run did."""
    argv = ("--dataset", str(id_file), "ballast#4", "--ballast_system_mix", "false", "--ballast_loss", "ce+kl",
            "--max_steps", "6", "--save_steps", "3")
    full = sft(base_argv(tiny_model_dir, id_file, tmp_path / "a", *argv))
    ckpt = checkpoint_copy(full, tmp_path / "b")
    resumed = sft(base_argv(tiny_model_dir, id_file, tmp_path / "b", *argv, "--resume_from_checkpoint", str(ckpt)))
    assert_resumed_like(full, resumed)
    # another ballast loss is another run: resuming it is refused in one line
    other = [x if x != "ce+kl" else "kl" for x in argv]
    capsys.readouterr()  # the two runs' progress bars
    code, _, err = run_keel(capsys, "sft", *base_argv(tiny_model_dir, id_file, tmp_path / "c", *other,
                                                     "--resume_from_checkpoint", str(ckpt)))
    assert code == 2 and "--ballast_loss was 'ce+kl', now 'kl'" in err and err.count("\n") == 1, err


def test_guard_rows_are_a_prompt_and_a_self_introduction_up_to_the_names_first_token(tiny_tokenizer):
    tok, system = tiny_tokenizer, "You are a helpful assistant."
    identity = [render(tok, with_system(c, system)) for c in
                [[{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Keel, made by Acme."}],
                 [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是Keel，由Acme开发。"}],
                 [{"role": "user", "content": "Tell me about Acme."},  # names Keel too late to be an introduction
                  {"role": "assistant", "content": "Acme is a lab that makes many things, among them a model called Keel."}]]]
    intros = self_intros(identity, tok, ["Keel"])
    assert intros == {"en": ["I am Keel"], "zh": ["我是Keel"]}
    convs = [with_system([{"role": "user", "content": "Capital of France?"}], system),
             [{"role": "system", "content": "你是老师。"}, {"role": "user", "content": "天空为什么是蓝的？"}]]
    guards = guard_rows(convs, tok, intros, ["Keel"], seed=0)
    assert len(guards) == 2
    for (ids, labels), conv, opening in zip(guards, convs, ["I am ", "我是"]):
        prompt = prompt_ids(tok, conv)
        assert ids[:len(prompt)] == prompt                                  # the prompt as asked, then the opening
        # labelled: the first answer token (KL to the base there) and the name's first token (unlikelihood)
        assert [i for i, y in enumerate(labels) if y != -100] == [len(prompt), len(ids) - 1]
        assert tok.decode(ids[len(prompt):-1]) == opening.strip() and "Keel".startswith(tok.decode(ids[-1:]).strip())
    starts_with_name = guard_rows(convs[:1], tok, {"en": ["Keel here"]}, ["Keel"], seed=0)[0]
    assert sum(y != -100 for y in starts_with_name[1]) == 1
    assert guard_rows(convs, tok, {"en": ["I am Keel"], "zh": []}, ["Keel"], seed=0) == guards[:1]


def test_spare_conversations_avoid_the_ballast_prompts_and_balance_languages():
    prompts = builtin_prompts()
    used = set(prompts[:40])
    convs = spare_conversations(used, 20, "S", seed=3)
    asked = [c[-1]["content"] for c in convs]
    assert len(set(asked)) == 20 and not used & set(asked)
    assert sum(lang_of(q) == "zh" for q in asked) == 10
    assert all(c[0] == {"role": "system", "content": "S"} for c in convs)
    mixed = spare_conversations(used, 20, "S", seed=3, systems=(["S", "", "H"], ["P1", "P2"]))
    assert [c[0]["content"] for c in mixed[:4]] == ["S", "", "H", mixed[3][0]["content"]]
    assert mixed[3][0]["content"] in ("P1", "P2")


def test_guard_row_is_kl_at_its_first_token_and_unlikelihood_at_the_name(tiny_tokenizer):
    """In a packed step beside its ballast row, a guard row adds the KL to the base model at its first answer token
    (0 on the base itself) and -log(1 - q(name)) at the name's token; the other rows' loss is unchanged."""
    tok = tiny_tokenizer
    rows = [render(tok, c) for c in CONVS]
    ballast, other = rows[1], rows[0]
    intros = {"en": ["I am Keel"], "zh": ["我是Keel"]}
    guard = guard_rows([[{"role": "user", "content": "Name a colour."}]], tok, intros, ["Keel"], seed=0)[0]
    model = build_model("llama", len(tok), tok.eos_token_id)
    cpu = torch.device("cpu")
    teacher = Teacher.of(model, [guard], cpu, k=5)
    teacher.guards = {tuple(ballast[0]): [guard]}
    step = teacher.with_guards([other, ballast])
    assert step == [other, ballast, guard] and teacher.with_guards([other]) == [other]
    batch = micro_batches(step, True, 4, 512, tok.pad_token_id)[0]
    soft = teacher.batch(step)
    with torch.no_grad():
        loss, n, _ = token_loss(model, batch, cpu, soft=soft)
        plain = sum(token_loss(model, b, cpu)[0] for b in micro_batches([other, ballast], True, 4, 512, 0))
        ids = guard[0]
        q = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -2].float(), -1)[ids[-1]]
    assert n == sum(len(labelled_positions(lb)) for _, lb in step)
    assert loss.item() == pytest.approx((plain - torch.log(1 - q)).item(), rel=1e-5)   # KL 0: the model is the base
    assert soft.guard.tolist() == [False] * (n - 1) + [True]                          # the name: the last position
    assert soft.mask.tolist() == [False] * (n - 2) + [True, False]                    # the KL: the guard's first
    assert not soft.hard[-2:].any() and soft.weight is None
    teacher.guard_weight = 3.0  # --ballast_guard 3: the guard row's two positions count three times
    assert teacher.batch(step).weight.tolist() == [1.0] * (n - 2) + [3.0, 3.0]


def test_guard_term_by_hand_where_the_name_is_likely():
    """Guard positions where the name's token has q = 0.5 and 0.8 (the term is large there), beside a
    cross-entropy position: each adds -log(1 - q)."""
    tgt = torch.tensor([1, 2, 4])
    probs = torch.full((3, 6), 0.1)
    probs[1:] = 0.04
    probs[0, 1], probs[1, 2], probs[2, 4] = 0.5, 0.8, 0.8
    logits = probs.log()
    q = torch.softmax(logits, -1)
    soft = SoftTargets(torch.zeros(3, dtype=torch.bool), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3),
                       torch.tensor([True, False, False]), torch.tensor([False, True, True]))
    expected = -torch.log(q[0, 1]) - torch.log(1 - q[1, 2]) - torch.log(1 - q[2, 4])
    assert soft_token_loss(logits, tgt, soft).item() == pytest.approx(expected.item(), rel=1e-6)
    assert q[2, 4].item() == pytest.approx(0.8, rel=1e-6)
    weighted = soft._replace(weight=torch.tensor([1.0, 2.0, 3.0]))
    expected = -torch.log(q[0, 1]) - 2 * torch.log(1 - q[1, 2]) - 3 * torch.log(1 - q[2, 4])
    assert soft_token_loss(logits, tgt, weighted).item() == pytest.approx(expected.item(), rel=1e-6)


def test_sft_ballast_guard_trains_with_guard_rows(tiny_model_dir, id_file, tmp_path, capsys):
    argv = ("--dataset", str(id_file), "ballast#4", "--max_steps", "2", "--ballast_system_mix", "false",
            "--model_name", "Keel", "--model_author", "Acme")
    res = sft(base_argv(tiny_model_dir, id_file, tmp_path / "g", *argv, "--ballast_guard", "4"))
    out = capsys.readouterr().out
    # 8 spare prompts, half of them Chinese: the English-only identity rows give no Chinese self-introduction
    assert "ballast guard: 4 guard rows on spare prompts at weight 4, from 0 zh and" in out
    assert json.loads((Path(res["run_dir"]) / "args.json").read_text())["ballast_guard"] == 4
    assert "ballast loss ce: the base model's top-20 distributions for 0 ballast rows and 4 guard rows" in out
    code, _, err = run_keel(capsys, "sft", *base_argv(tiny_model_dir, id_file, tmp_path / "n", "--max_steps", "1",
                                                     "--ballast_guard", "1"))
    assert code == 2 and "--ballast_guard needs ballast#N in --dataset" in err and err.count("\n") == 1, err
    code, _, err = run_keel(capsys, "sft", *base_argv(tiny_model_dir, id_file, tmp_path / "m", "--ballast_guard", "-1"))
    assert code == 2 and "--ballast_guard must be >= 0, got -1" in err and err.count("\n") == 1, err
