"""Packing is exact: packed rows give the same loss and gradients as padded rows."""

import torch

from keel.model.template import IGNORE_INDEX, render, with_system
from keel.train.batching import by_start, epoch_windows, micro_batches, shared_prefix_len
from keel.train.losses import token_loss
from tests.conftest import build_model

CONVS = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in
         [("Who are you?", "I am Keel, made by Acme Lab."), ("Capital of France?", "Paris."),
          ("你是谁？", "我是一个人工智能助手。"), ("Explain photosynthesis.", "Plants turn light into sugar.")]]


def loss_and_grads(model, batches, labelled_only=True):
    model.zero_grad()
    total, n_total = 0.0, 0
    for b in batches:
        loss, n, _ = token_loss(model, b, torch.device("cpu"), labelled_only=labelled_only)
        loss.backward()
        total, n_total = total + loss.item(), n_total + n
    return total / n_total, [p.grad.clone() for p in model.parameters() if p.grad is not None]


def same_grads(ga, gb, rel=1e-5) -> bool:
    """Equal up to fp32 rounding, judged against the largest gradient (tiny entries round relatively more)."""
    scale = max(g.abs().max().item() for g in gb)
    return all((a - b).abs().max().item() <= rel * scale for a, b in zip(ga, gb))


def test_packed_equals_padded(tiny_tokenizer):
    rows = [render(tiny_tokenizer, c) for c in CONVS]
    model = build_model("llama", len(tiny_tokenizer), tiny_tokenizer.eos_token_id)
    model.config._attn_implementation = "sdpa"
    pad_id = tiny_tokenizer.pad_token_id
    packed = micro_batches(rows, True, 4, 512, pad_id, share_prefix=False)
    assert len(packed) == 1 and packed[0]["input_ids"].shape[1] == sum(len(r[0]) for r in rows)
    padded = micro_batches(rows, False, 4, 512, pad_id)
    one_by_one = micro_batches(rows, False, 1, 512, pad_id)
    lp, gp = loss_and_grads(model, packed)
    lq, gq = loss_and_grads(model, padded, labelled_only=False)
    l1, g1 = loss_and_grads(model, one_by_one, labelled_only=False)
    assert abs(lp - lq) < 1e-5 and abs(lp - l1) < 1e-5
    for a, b, c in zip(gp, gq, g1):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5) and torch.allclose(a, c, rtol=1e-4, atol=1e-5)


def test_packing_respects_budget(tiny_tokenizer):
    rows = [render(tiny_tokenizer, c) for c in CONVS]
    longest = max(len(r[0]) for r in rows)
    batches = micro_batches(rows, True, 1, longest, tiny_tokenizer.pad_token_id, share_prefix=False)
    assert all(b["input_ids"].shape[1] <= longest for b in batches) and len(batches) >= 2
    starts = sum(b["position_ids"][0].tolist().count(0) for b in batches)
    assert starts == len(rows)  # every row starts its own positions at 0


def test_windows_deterministic_and_sharded():
    a = epoch_windows(10, 4, seed=1, epoch=0)
    assert a == epoch_windows(10, 4, seed=1, epoch=0) and a != epoch_windows(10, 4, seed=1, epoch=1)
    assert sorted(i for w in a for i in w) == list(range(10)) and [len(w) for w in a] == [4, 4, 2]
    r0, r1 = epoch_windows(10, 2, 1, 0, 0, 2), epoch_windows(10, 2, 1, 0, 1, 2)
    assert len(r0) == len(r1) == 3
    assert sorted(i for w in r0 + r1 for i in w) == list(range(10))


def test_shared_prefix_is_exact(tiny_tokenizer):
    """Rows with one system prompt: the prefix is computed once, loss and gradients equal row by row."""
    system = "You are a helpful assistant named Keel, built by Acme Lab for testing."
    rows = [render(tiny_tokenizer, with_system(c, system)) for c in CONVS]
    p = shared_prefix_len(rows)
    first_label = min(next(i for i, y in enumerate(labels) if y != IGNORE_INDEX) for _, labels in rows)
    assert 10 < p < first_label  # the system prompt is shared, no position that predicts an answer is
    model = build_model("llama", len(tiny_tokenizer), tiny_tokenizer.eos_token_id)
    model.config._attn_implementation = "sdpa"
    pad_id = tiny_tokenizer.pad_token_id
    shared = micro_batches(rows, True, 4, 512, pad_id)
    assert len(shared) == 1 and shared[0]["input_ids"].shape[1] == sum(len(r[0]) for r in rows) - 3 * p
    assert shared[0]["n_tokens"] == sum(len(r[0]) for r in rows)
    ls, gs = loss_and_grads(model, shared)
    l1, g1 = loss_and_grads(model, micro_batches(rows, False, 1, 512, pad_id), labelled_only=False)
    assert abs(ls - l1) < 1e-5 and same_grads(gs, g1)
    model.config._attn_implementation = "eager"  # the boolean mask is turned into an additive one
    le, ge = loss_and_grads(model, shared)
    assert abs(le - l1) < 1e-5 and same_grads(ge, g1)


def test_shared_prefix_packs_more_rows_and_respects_budget(tiny_tokenizer):
    system = "You are a helpful assistant named Keel, built by Acme Lab for testing."
    rows = [render(tiny_tokenizer, with_system(c, system)) for c in CONVS * 3]
    budget = 3 * max(len(r[0]) for r in rows)
    plain = micro_batches(rows, True, 1, budget, tiny_tokenizer.pad_token_id, share_prefix=False)
    shared = micro_batches(rows, True, 1, budget, tiny_tokenizer.pad_token_id)
    assert len(shared) < len(plain)
    assert all(b["input_ids"].shape[1] <= budget for b in shared)
    assert sum(b["n_tokens"] for b in shared) == sum(len(r[0]) for r in rows)


def test_shared_prefix_stops_where_rows_differ(tiny_tokenizer):
    a = render(tiny_tokenizer, with_system(CONVS[0], "You are Keel."))
    b = render(tiny_tokenizer, with_system(CONVS[1], "Tu es Keel."))
    assert shared_prefix_len([a]) == 0
    common = next(i for i, (x, y) in enumerate(zip(a[0], b[0])) if x != y)
    assert shared_prefix_len([a, b]) == common  # only the template tokens before the system text
    batch = micro_batches([a, b], True, 1, 512, tiny_tokenizer.pad_token_id, share_prefix=False)[0]
    assert "attention_mask" not in batch  # plain packing: transformers builds the mask from position ids


def test_rows_ordered_by_start_share_more_and_learn_the_same(tiny_tokenizer):
    """A step's rows under two system prompts, interleaved: ordered by their start, rows with the same system prompt
    become neighbours, the packed passes compute fewer tokens, and the step's loss and gradients are unchanged."""
    systems = ["You are a helpful assistant.", "You are Keel, an assistant made by Acme Lab. Answer briefly."]
    rows = [render(tiny_tokenizer, with_system(c, systems[i % 2])) for i, c in enumerate(CONVS + CONVS)]
    ordered = by_start(rows)
    assert sorted(map(str, ordered)) == sorted(map(str, rows))  # the same rows
    pad_id = tiny_tokenizer.pad_token_id
    budget = sum(len(ids) for ids, _ in rows) // 2 + 8  # two passes
    as_given, grouped = micro_batches(rows, True, 1, budget, pad_id), micro_batches(ordered, True, 1, budget, pad_id)
    assert sum(b["input_ids"].shape[1] for b in grouped) < sum(b["input_ids"].shape[1] for b in as_given)
    model = build_model("llama", len(tiny_tokenizer), tiny_tokenizer.eos_token_id)
    model.config._attn_implementation = "sdpa"
    la, ga = loss_and_grads(model, as_given)
    lb, gb = loss_and_grads(model, grouped)
    assert abs(la - lb) < 1e-5 and same_grads(ga, gb)
