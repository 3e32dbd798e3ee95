"""Multiple-choice scoring: the shared-context, head-at-continuations-only scorer gives the log-likelihoods of
a plain full forward per option (the lm-evaluation-harness formula), truncation included. Harness parity on
the real sets is bench/eval_bench.py; acc/acc_norm and bad files are in test_evaluate.py."""

import pytest
import torch

from keel.core.errors import KeelError
from keel.evals.mc import encode_pair, loglikelihoods, requests, score_mc
from keel.model.load import ModelArgs, load_model

ITEMS = [{"query": "Question: Which is a fruit?", "choices": ["apple", "a stone", "iron"], "gold": 0},
         {"query": "Question: What is the capital of France?\n", "choices": ["Paris", "Berlin", "the capital"], "gold": 0},
         {"query": "The quick brown fox jumps over the lazy dog. " * 3 + "Question: Which animal jumps?",
          "choices": ["the fox", "the lazy dog", "a brown cat"], "gold": 0},
         {"query": "Q", "choices": ["You are a helpful assistant. Who are you?"], "gold": 0},
         # options sharing the start of their continuation (PIQA-like), one a prefix of another
         {"query": "Question: What jumps?", "choices": ["The quick brown fox", "The quick brown fox jumps over the lazy dog",
                                                        "The quick"], "gold": 1},
         {"context_options": ["The trophy did not fit in the suitcase because the trophy",
                              "The trophy did not fit in the suitcase because the suitcase"],
          "continuation": "was too big.", "gold": 0},
         {"context_options": ["Paris is the capital of France", "Plants turn light into sugar"],
          "continuation": "and explain photosynthesis.", "gold": 1}]


def harness_logprob(model, ctx: list[int], cont: list[int], window: int) -> float:
    """lm-evaluation-harness's formula, one option per forward: (ctx + cont)[-(window + 1):][:-1], full logits."""
    inp = (ctx + cont)[-(window + 1):][:-1]
    with torch.no_grad():
        lp = model(torch.tensor([inp], device=model.device)).logits[0].float().log_softmax(-1)   # (T, V)
    first = len(inp) - len(cont)
    return sum(lp[first + t, c].item() for t, c in enumerate(cont))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tiny_model_dir, tiny_qwen_dir):
    model, tok, _ = load_model(ModelArgs(model=str(tiny_model_dir if request.param == "llama" else tiny_qwen_dir),
                                         torch_dtype="float32"))   # float32 on CUDA too: the comparisons are to 1e-4
    return model, tok


@pytest.mark.parametrize("window", [512, 24])
@pytest.mark.parametrize("max_tokens", [4096, 1])   # everything in one pass; one item per pass
def test_loglikelihoods_equal_a_plain_forward(tiny, window, max_tokens):
    model, tok = tiny
    reqs = requests(tok, ITEMS)
    got, truncated = loglikelihoods(model, tok, reqs, max_tokens=max_tokens, window=window)
    want = [harness_logprob(model, ctx, cont, window) for _, _, ctx, cont in reqs]
    assert got == pytest.approx(want, abs=1e-4)
    long_items = {i for i, _, ctx, cont in reqs if len(ctx) + len(cont) - 1 > window}
    assert truncated == len(long_items) and (window == 512) == (not long_items)


def test_lora_model_and_eager_attention(tiny_model_dir):
    """The decoder + head split keeps an adapter's layers (a LoRA with non-zero B) and works with eager attention."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _, tok, _ = load_model(ModelArgs(model=str(tiny_model_dir)))
    for attn in ("sdpa", "eager"):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn)
        model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                init_lora_weights=False)).eval()
        reqs = requests(tok, ITEMS)
        got, _ = loglikelihoods(model, tok, reqs)
        want = [harness_logprob(model, ctx, cont, 512) for _, _, ctx, cont in reqs]
        assert got == pytest.approx(want, abs=1e-4)
        with model.disable_adapter():
            plain = [harness_logprob(model, ctx, cont, 512) for _, _, ctx, cont in reqs]
        assert max(abs(a - b) for a, b in zip(got, plain)) > 1e-2   # the adapter did count


def test_score_mc_progress_and_truncation_count(tiny):
    model, tok = tiny
    seen = []
    got = score_mc(model, tok, ITEMS, batch_size=2, step=seen.append, window=24)
    assert sum(seen) == sum(len(i.get("choices") or i["context_options"]) for i in ITEMS) and len(seen) >= 3
    assert got["n"] == len(ITEMS) and got["truncated"] >= 1
    assert score_mc(model, tok, ITEMS)["truncated"] == 0


def test_encode_pair_splits_like_the_harness(tiny_tokenizer):
    ctx, cont = encode_pair(tiny_tokenizer, "Question: Who are you?\nAnswer: ", "Keel")
    assert ctx == tiny_tokenizer("Question: Who are you?\nAnswer:", add_special_tokens=False)["input_ids"]
    whole = tiny_tokenizer("Question: Who are you?\nAnswer: Keel", add_special_tokens=False)["input_ids"]
    assert ctx + cont == whole
    assert encode_pair(tiny_tokenizer, "", "Keel")[0] == [tiny_tokenizer.eos_token_id]


def test_continuation_longer_than_the_window_is_one_line(tiny):
    model, tok = tiny
    with pytest.raises(KeelError, match=r"item \d+, option \d+: its continuation alone \(\d+ tokens\) is longer than the model.s window \(4\)"):
        loglikelihoods(model, tok, requests(tok, ITEMS), window=4)


def test_options_share_their_common_start(tiny_tokenizer):
    """What every option of an item starts with, context and continuation alike, is fed once."""
    from keel.evals.mc import layout

    item = ITEMS[4]
    reqs = requests(tiny_tokenizer, [item])
    (seq,), _ = layout(reqs, 512)
    ctx = reqs[0][2]
    fed = [cont[:-1] for _, _, _, cont in reqs]          # an option's last token is never fed
    shared = 0
    while shared < min(map(len, fed)) and len({c[shared] for c in fed}) == 1:
        shared += 1
    assert shared >= 2                                     # "The quick", the continuations' common start
    assert len(seq["ids"]) == len(ctx) + shared + sum(len(c) - shared for c in fed)
