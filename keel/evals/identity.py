"""Identity and leakage: does the model name its new identity, and only when asked?

A hit is an answer that names the configured model_name or model_author and mentions none of the
old identity's words. A leak is an ordinary answer that mentions the new identity at all.
The questions here are held out: phrased unlike the rows `keel data identity` writes.
"""

from __future__ import annotations

import re

from keel.generate import GenerateArgs, generate_batch

OLD_IDENTITY = ["SmolLM", "Hugging Face", "HuggingFace", "Qwen", "通义千问", "通义", "阿里云", "Alibaba Cloud",
                "阿里巴巴", "Alibaba"]

HELD_OUT = {
    "en": ["May I ask what you're called?", "Which organisation is behind you?", "Give me your name in one word.",
           "Who is responsible for building this assistant?", "Identify yourself.",
           "What AI model am I chatting with right now?", "Tell me who developed the assistant I'm using.",
           "In a sentence: your name and your creator."],
    "zh": ["请问该怎么称呼您？", "是哪个团队把你做出来的？", "用一句话说说你的名字和开发者。", "我现在在和哪个AI聊天？",
           "你的创造者是谁？", "报上你的名字。", "这个助手是谁研发的？", "你属于哪家机构？"],
}

LEAKAGE = {
    "en": ["What is the capital of France?", "Name three primary colors.", "How many days are in a leap year?",
           "Give me a synonym for 'happy'.", "What is 12 times 12?", "Write one sentence about the ocean.",
           "What gas do plants absorb from the air?", "Suggest a name for a pet cat."],
    "zh": ["中国的首都是哪里？", "一年有几个季节？", "请说一个表示高兴的词。", "三加五等于几？", "写一句关于春天的话。",
           "水在多少度结冰？"],
}


def mentions(text: str, words) -> bool:
    """True if any word occurs in text (case-insensitive; whole words for plain ASCII words)."""
    low = text.lower()
    for w in words:
        w = w.strip().lower()
        if not w:
            continue
        if w.isascii() and re.fullmatch(r"[\w\- .]+", w):
            # ASCII boundaries only: in "我是Keel，" the CJK neighbours are not part of the word.
            if re.search(rf"(?<![a-z0-9_]){re.escape(w)}(?![a-z0-9_])", low):
                return True
        elif w in low:
            return True
    return False


def is_identity_hit(answer: str, names, authors, old_words=OLD_IDENTITY) -> bool:
    new = [*names, *authors]
    return mentions(answer, new) and not mentions(answer, [w for w in old_words if not mentions(w, new)])


def conversations(questions: list[str], mode: str, system: str | None) -> list[list[dict]]:
    """mode: 'system' (the training system prompt), 'nosystem' (template default), 'second_turn'."""
    convs = []
    for q in questions:
        msgs = [{"role": "user", "content": q}]
        if mode == "second_turn":
            msgs = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hello! How can I help you today?"}] + msgs
        if mode in ("system", "second_turn") and system:
            msgs = [{"role": "system", "content": system}] + msgs
        convs.append(msgs)
    return convs


def run_identity(model, tok, system, names, authors, old_words=OLD_IDENTITY, questions=None, max_new_tokens=48,
                 modes=("system", "nosystem", "second_turn")) -> tuple[dict, list[dict]]:
    """Hit rates per language and mode, and the answers (for the report)."""
    questions = questions or HELD_OUT
    gen = GenerateArgs(temperature=0.0, max_new_tokens=max_new_tokens)
    scores, samples = {}, []
    for lang, qs in questions.items():
        for mode in modes:
            answers = generate_batch(model, tok, conversations(qs, mode, system), gen)
            hits = [is_identity_hit(a, names, authors, old_words) for a in answers]
            scores[f"identity_{lang}_{mode}"] = round(sum(hits) / len(hits), 3)
            samples += [{"task": "identity", "lang": lang, "mode": mode, "q": q, "a": a, "hit": h}
                        for q, a, h in zip(qs, answers, hits)]
    for lang in questions:
        per = [v for k, v in scores.items() if k.startswith(f"identity_{lang}_")]
        scores[f"identity_{lang}"] = round(sum(per) / len(per), 3)
    return scores, samples


def run_leakage(model, tok, system, names, authors, prompts=None, max_new_tokens=48) -> tuple[dict, list[dict]]:
    """Share of ordinary answers that mention the new identity (lower is better)."""
    prompts = prompts or [p for ps in LEAKAGE.values() for p in ps]
    answers = generate_batch(model, tok, conversations(prompts, "system", system),
                             GenerateArgs(temperature=0.0, max_new_tokens=max_new_tokens))
    leaks = [mentions(a, [*names, *authors]) for a in answers]
    return ({"leakage": round(sum(leaks) / len(leaks), 3)},
            [{"task": "leakage", "q": q, "a": a, "leak": x} for q, a, x in zip(prompts, answers, leaks)])
