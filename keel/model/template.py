"""Render conversations with the tokenizer's own chat template into (ids, labels).

    ids, labels = render(tokenizer, {"messages": [...]}["messages"])

There is no template registry: whatever template the model ships is the template. Labels are
the ids on assistant turns (every assistant turn of a multi-turn row, including the closing
end-of-turn token, which is what stops generation) and IGNORE_INDEX everywhere else. Labels are
built from turn boundaries, never from the pad token: on SmolLM2 pad == eos, so a pad-based
mask would also hide the assistant's `<|im_end|>`.

An assistant message with `"loss": false` (ms-swift's per-message field) is context only: it is
rendered but gets no labels, e.g. the ordinary answers before the identity answer of a multi-turn
identity row. Without the field (or with true/null) every assistant turn is labelled.

A system message with empty content means "no system turn at all", as in ms-swift (its templates
take the system-less prefix whenever the system is empty), in training and in generation alike.
Templates such as SmolLM2's and Qwen2.5's insert their default system prompt whenever the first
message is not a system one, so this cannot be asked of them directly: the conversation is rendered
with a sentinel system prompt and that turn is cut off. A template that cannot render a conversation
without a system turn (Llama-2 style: the system text lives inside the first user turn) keeps the
empty system prompt as it renders it.
"""

from __future__ import annotations

from jinja2.exceptions import TemplateError

from keel.core.errors import KeelError

IGNORE_INDEX = -100
SENTINEL = "KEEL-SYSTEM-SENTINEL-7F3A"


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    """Give a conversation the system prompt `system` if it has none of its own."""
    if system is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system}] + list(messages)


def wants_no_system_turn(messages: list[dict]) -> bool:
    return bool(messages) and messages[0]["role"] == "system" and messages[0]["content"] == ""


def system_turn_cut(tokenizer, rest: list[dict], add_generation_prompt: bool) -> tuple[str, str, str] | None:
    """(full, head, keep): `rest` rendered after a sentinel system turn, that turn's text alone, and what of
    it to keep (a Llama-3 style BOS before it), so that keep + full[len(head):] has no system turn.
    ("", "", text) when the template has no system role; None when it cannot render without one."""
    sentinel = [{"role": "system", "content": SENTINEL}]
    try:
        head = tokenizer.apply_chat_template(sentinel, tokenize=False)
        full = tokenizer.apply_chat_template(sentinel + rest, tokenize=False, add_generation_prompt=add_generation_prompt)
    except (TemplateError, ValueError):  # e.g. "System role not supported": no conversation has a system turn
        return "", "", tokenizer.apply_chat_template(rest, tokenize=False, add_generation_prompt=add_generation_prompt)
    if SENTINEL not in head or not full.startswith(head):
        return None
    # ChatML's "BOS" is the turn opener itself, which the next turn already starts with: keep nothing then.
    bos = tokenizer.bos_token or ""
    keep = bos if bos and head.startswith(bos) and not full[len(head):].startswith(bos) else ""
    return full, head, keep


def template_text(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    if wants_no_system_turn(messages) and (cut := system_turn_cut(tokenizer, messages[1:], add_generation_prompt)):
        full, head, keep = cut
        return keep + full[len(head):]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def default_system(tokenizer) -> str | None:
    """The system prompt the chat template inserts when a conversation has none (SmolLM2: "You are a helpful AI
    assistant named SmolLM, trained by Hugging Face"), or None when it inserts none: the conversation rendered
    with a sentinel system prompt, and the text that stands in the sentinel's place without one."""
    user = [{"role": "user", "content": "X"}]
    try:
        plain = tokenizer.apply_chat_template(user, tokenize=False)
        marked = tokenizer.apply_chat_template([{"role": "system", "content": SENTINEL}, *user], tokenize=False)
    except (TemplateError, ValueError):  # no system role
        return None
    if marked.count(SENTINEL) != 1:
        return None
    before, after = marked.split(SENTINEL)
    if not (plain.startswith(before) and plain.endswith(after)) or len(plain) <= len(before) + len(after):
        return None
    return plain[len(before):len(plain) - len(after)].strip() or None


def encode_text(tokenizer, text: str) -> list[int]:
    # The template already holds every special token; adding BOS again would double it.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def conversation_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation rendered by its chat template; message text is always text.

    A message holding a control token's text (a user typing `<|im_end|><|im_start|>assistant`) would
    otherwise be read as real control tokens and could forge turns. transformers'
    `sanitize_control_tokens` encodes such text as plain text and only the template's own control
    tokens as tokens. Conversations without such text take the plain path (identical ids, faster).
    """
    added = tokenizer.added_tokens_encoder
    if not any(t in m["content"] for m in messages if isinstance(m.get("content"), str) for t in added):
        return encode_text(tokenizer, template_text(tokenizer, messages, add_generation_prompt))
    asked, head_ids, keep = messages, [], ""
    if wants_no_system_turn(messages) and (cut := system_turn_cut(tokenizer, messages[1:], add_generation_prompt)):
        _, head, keep = cut
        # rendered after the sentinel turn, whose tokens are then cut off (no system role: just left out)
        asked = [{"role": "system", "content": SENTINEL}, *messages[1:]] if head else messages[1:]
        head_ids = encode_text(tokenizer, head) if head else []
    try:
        ids = tokenizer.apply_chat_template(asked, tokenize=True, add_generation_prompt=add_generation_prompt,
                                            sanitize_control_tokens=True, return_dict=False)
        if head_ids:
            if ids[:len(head_ids)] == head_ids:
                return encode_text(tokenizer, keep) + ids[len(head_ids):]
            ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                                sanitize_control_tokens=True, return_dict=False)
        return ids
    except ValueError as e:  # e.g. a control token the tokenizer also produces from plain text
        raise KeelError(f"a message holds control-token text that cannot be kept as plain text: {e}") from None


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` followed by the assistant's generation prompt."""
    return conversation_ids(tokenizer, messages, add_generation_prompt=True)


def render(tokenizer, messages: list[dict], max_length: int | None = None):
    """Return (ids, labels) for a conversation, or None if truncation left no label.

    Assistant spans are found by rendering each prefix of the conversation: the tokens that a
    turn adds after its generation prompt are that turn's answer.
    """
    ids = conversation_ids(tokenizer, messages)
    labels = [IGNORE_INDEX] * len(ids)
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant" or msg.get("loss") is False:
            continue
        start = len(prompt_ids(tokenizer, messages[:i]))
        end_ids = conversation_ids(tokenizer, messages[: i + 1])
        if ids[: len(end_ids)] != end_ids:
            raise KeelError("the chat template renders a conversation prefix differently from the whole "
                            "conversation; Keel cannot find the assistant turns for this template")
        labels[start:len(end_ids)] = ids[start:len(end_ids)]
    if max_length is not None and len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE_INDEX for x in labels):
        return None
    return ids, labels
