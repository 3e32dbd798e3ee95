"""Render conversations with the tokenizer's own chat template into (ids, labels).

    ids, labels = render(tokenizer, {"messages": [...]}["messages"])

There is no template registry: whatever template the model ships is the template. Labels are
the ids on assistant turns (every assistant turn of a multi-turn row, including the closing
end-of-turn token, which is what stops generation) and IGNORE_INDEX everywhere else. Labels are
built from turn boundaries, never from the pad token: on SmolLM2 pad == eos, so a pad-based
mask would also hide the assistant's `<|im_end|>`.
"""

from __future__ import annotations

from keel.errors import KeelError

IGNORE_INDEX = -100


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    """Give a conversation the system prompt `system` if it has none of its own."""
    if system is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system}] + list(messages)


def template_text(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_text(tokenizer, text: str) -> list[int]:
    # The template already holds every special token; adding BOS again would double it.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` followed by the assistant's generation prompt."""
    return encode_text(tokenizer, template_text(tokenizer, messages, add_generation_prompt=True))


def render(tokenizer, messages: list[dict], max_length: int | None = None):
    """Return (ids, labels) for a conversation, or None if truncation left no label.

    Assistant spans are found by rendering each prefix of the conversation: the tokens that a
    turn adds after its generation prompt are that turn's answer.
    """
    ids = encode_text(tokenizer, template_text(tokenizer, messages))
    labels = [IGNORE_INDEX] * len(ids)
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start = len(prompt_ids(tokenizer, messages[:i]))
        end_ids = encode_text(tokenizer, template_text(tokenizer, messages[: i + 1]))
        if ids[: len(end_ids)] != end_ids:
            raise KeelError("the chat template renders a conversation prefix differently from the whole "
                            "conversation; Keel cannot find the assistant turns for this template")
        labels[start:len(end_ids)] = ids[start:len(end_ids)]
    if max_length is not None and len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE_INDEX for x in labels):
        return None
    return ids, labels
