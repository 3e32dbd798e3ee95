"""Rendering must equal the tokenizer's own chat template, with only assistant tokens labelled."""

import pytest

from keel.chat import IGNORE_INDEX, render, with_system


def expected(tok, messages):
    """Reference: the template's ids, and labels built turn by turn from the template itself."""
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(tok.apply_chat_template(messages[:i], add_generation_prompt=True, return_dict=True)["input_ids"])
            end = len(tok.apply_chat_template(messages[: i + 1], return_dict=True)["input_ids"])
            labels[start:end] = ids[start:end]
    return ids, labels


SINGLE = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Keel."}]
MULTI = [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是 Keel。"},
         {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]


@pytest.mark.parametrize("messages", [SINGLE, MULTI])
def test_render_matches_chat_template(tiny_tokenizer, messages):
    ids, labels = render(tiny_tokenizer, messages)
    assert (ids, labels) == expected(tiny_tokenizer, messages)


def test_labels_cover_answer_and_end_of_turn_only(tiny_tokenizer):
    ids, labels = render(tiny_tokenizer, SINGLE)
    labelled = [t for t in labels if t != IGNORE_INDEX]
    text = tiny_tokenizer.decode(labelled)
    # The closing <|im_end|> is learned although pad == eos: it is what stops generation.
    assert text.startswith("I am Keel.<|im_end|>")
    assert "Who are you" not in text and "Tiny" not in text


def test_template_default_system_prompt_is_masked(tiny_tokenizer):
    ids, labels = render(tiny_tokenizer, SINGLE)
    assert "named Tiny" in tiny_tokenizer.decode(ids)
    assert "named Tiny" not in tiny_tokenizer.decode([t for t in labels if t != IGNORE_INDEX])


def test_with_system_only_fills_missing_system():
    assert with_system(SINGLE, "S")[0] == {"role": "system", "content": "S"}
    assert with_system(MULTI, "S") == MULTI
    assert with_system(SINGLE, None) == SINGLE


def test_truncation_that_removes_every_label_drops_the_row(tiny_tokenizer):
    ids, _ = render(tiny_tokenizer, SINGLE)
    n_prompt = len(tiny_tokenizer.apply_chat_template(SINGLE[:1], add_generation_prompt=True, return_dict=True)["input_ids"])
    assert render(tiny_tokenizer, SINGLE, max_length=n_prompt) is None
    kept = render(tiny_tokenizer, SINGLE, max_length=n_prompt + 2)
    assert len(kept[0]) == n_prompt + 2 and kept[1][-1] != IGNORE_INDEX
