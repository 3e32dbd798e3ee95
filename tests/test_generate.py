"""Greedy generation: Keel's loop (shared prompt prefix computed once, finished rows leave the batch) gives
transformers' `generate` greedy answers token for token; sampling and processor configs go through generate."""

import pytest
import torch

from keel.chat import prompt_ids
from keel.generate import GenerateArgs, eos_ids, generate_batch, greedy_batch, plain_greedy
from keel.model import ModelArgs, load_model

QUESTIONS = ["Who are you?", "What is the capital of France?", "Explain photosynthesis in one sentence.",
             "你是谁？", "The quick brown fox", "Hi", "Plants turn light into sugar. Who made you? Tell me more."]


def conversations():
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    convs.append([{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Who are you?"}])
    return convs


def hf_greedy(model, tok, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy answer to one prompt alone (no padding), the end token included."""
    with torch.inference_mode():
        ids = torch.tensor([prompt], device=model.device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             temperature=None, top_p=None, top_k=None)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tiny_model_dir, tiny_qwen_dir):
    model, tok, _ = load_model(ModelArgs(model=str(tiny_model_dir if request.param == "llama" else tiny_qwen_dir),
                                         torch_dtype="float32"))   # float32 on CUDA too: the comparisons are to 1e-4
    return model, tok


@pytest.mark.parametrize("batch_size", [3, 8])
def test_greedy_equals_transformers_generate(tiny, batch_size):
    model, tok = tiny
    prompts = [prompt_ids(tok, c) for c in conversations()]
    want = [hf_greedy(model, tok, p, 12) for p in prompts]
    ends = eos_ids(model, tok)
    got = []
    for start in range(0, len(prompts), batch_size):
        got += greedy_batch(model, prompts[start:start + batch_size], 12, ends, tok.pad_token_id)
    assert got == want
    texts = generate_batch(model, tok, conversations(), GenerateArgs(max_new_tokens=12), batch_size=batch_size)
    assert texts == [tok.decode(w, skip_special_tokens=True).strip() for w in want]


def test_rows_stop_at_their_own_end_token(tiny, monkeypatch):
    """With an end token that the answers reach at different steps, rows leave the batch one by one."""
    model, tok = tiny
    prompts = [prompt_ids(tok, c) for c in conversations()]
    free = [hf_greedy(model, tok, p, 16) for p in prompts]
    firsts = {}                                         # token -> the step where each answer first has it
    for ans in free:
        for step, t in enumerate(ans):
            firsts.setdefault(t, []).append(step) if t not in ans[:step] else None
    end = max(firsts, key=lambda t: (len(set(firsts[t])) > 1, len(firsts[t])))   # ends different rows at different steps
    monkeypatch.setattr(model.generation_config, "eos_token_id", end)
    want = [hf_greedy(model, tok, p, 16) for p in prompts]
    got = greedy_batch(model, prompts, 16, eos_ids(model, tok), tok.pad_token_id)
    assert got == want
    lengths = {len(w) for w in want}
    assert len(lengths) > 1 and any(w[-1] == end and len(w) < 16 for w in want)


def test_processor_configs_go_through_generate(tiny, monkeypatch):
    model, tok = tiny
    assert plain_greedy(model)
    monkeypatch.setattr(model.generation_config, "repetition_penalty", 1.5)
    assert not plain_greedy(model)
    prompts = [prompt_ids(tok, c) for c in conversations()]
    want = [tok.decode(hf_greedy(model, tok, p, 10), skip_special_tokens=True).strip() for p in prompts]
    assert generate_batch(model, tok, conversations(), GenerateArgs(max_new_tokens=10), batch_size=1) == want


def test_lora_model_equals_its_generate(tiny_model_dir):
    """The tuned model of an eval: a PEFT LoRA (non-zero B) on top, through the same loop."""
    from peft import LoraConfig, get_peft_model

    model, tok, _ = load_model(ModelArgs(model=str(tiny_model_dir)))
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                             init_lora_weights=False)).eval()
    prompts = [prompt_ids(tok, c) for c in conversations()]
    want = [hf_greedy(model, tok, p, 10) for p in prompts]
    assert greedy_batch(model, prompts, 10, eos_ids(model, tok), tok.pad_token_id) == want
    with model.disable_adapter():
        assert [hf_greedy(model, tok, p, 10) for p in prompts] != want      # the adapter did count


# --num_threads (keel/model.py): the thread count is chosen where device and dtype are.

@pytest.mark.parametrize("value", [0, -1, (__import__("os").cpu_count() or 1) + 1])
def test_num_threads_out_of_range_is_one_line(capsys, tiny_model_dir, value):
    from keel.errors import KeelError
    from tests.helpers import run_keel

    with pytest.raises(KeelError, match=r"--num_threads must be between 1 and \d+ \(this machine's CPUs\)"):
        ModelArgs(num_threads=value)
    code, _, err = run_keel(capsys, "infer", "--model", tiny_model_dir, "--num_threads", value, "--query", "Hi")
    assert code == 2 and err.strip().splitlines()[-1].startswith("keel: error: --num_threads must be")


def test_num_threads_is_applied(tiny_model_dir):
    before = torch.get_num_threads()
    try:
        load_model(ModelArgs(model=str(tiny_model_dir), num_threads=1))
        assert torch.get_num_threads() == 1
        if (__import__("os").cpu_count() or 1) >= 2:
            load_model(ModelArgs(model=str(tiny_model_dir), num_threads=2))
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
