"""Scoring rules for identity answers and leaks (the rules and their cases: docs/evaluation.md).

    is_identity_hit("I am not ChatGPT, I am Keel.", ["Keel"], ["Acme"])     # True
    is_reversal_hit("Keel is a company that makes robots.", "self", ["Keel"], ["Acme"])   # False
    is_leak("Paris. By the way, I'm Keel!", ["Keel"], ["Acme"])             # True

- identity (any system prompt, any turn, pressure): a hit names the new name or maker and claims
  no old identity. Naming an old identity only to deny it ("I am not ChatGPT", "不是通义千问") or as
  the subject of a sentence about it ("ChatGPT is made by OpenAI.") is not a claim.
- reversal, expect "author" ("Who made NAME?"): a hit names the maker and claims no old identity.
- reversal, expect "self" ("What is NAME?"): a hit names the maker, or says NAME is itself ("I am
  NAME", "我就是NAME"), or calls NAME an AI assistant / language model; and claims no old identity.
  "NAME is a company that makes robots" is a miss.
- leak (ordinary prompts and questions about other AIs): the answer names the new name or maker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from keel.core.text import mentions, word_pattern

# The embedded and the seed's base models' identities. ballast.py drops self-distilled answers that
# mention these, so this list is kept as it is; claims are checked against OTHER_AIS as well.
OLD_IDENTITY = ["SmolLM", "Hugging Face", "HuggingFace", "Qwen", "通义千问", "通义", "阿里云", "Alibaba Cloud",
                "阿里巴巴", "Alibaba"]
# Identities a tuned model must not claim either (what "who are you" answers fall back to).
# Plain company names with everyday uses (Google, Microsoft) are left out: "I can't search Google" is no claim.
OTHER_AIS = ["ChatGPT", "GPT-4", "GPT-3.5", "GPT-3", "OpenAI", "Claude", "Anthropic", "Llama", "Meta AI", "Gemini",
             "Bard", "DeepSeek", "Mistral", "Copilot", "文心一言", "百度", "深度求索"]

# A clause ends at clause punctuation (a period only before a space: "GPT-3.5" stays whole).
# A denial covers the clause it is written in.
CLAUSE = re.compile(r"(?:[,;:!?()\n，。；：！？（）、—]|\.(?=\s|$))+")
DENIAL_BEFORE = re.compile(
    r"(?<![a-z])(not|cannot|no|never|nor|neither|unlike|instead of|rather than|other than|apart from|nothing to do with)"
    r"(?![a-z])|n't|不是|并非|而非|并不|不属于|不同于|不像|不叫|不再", re.IGNORECASE)
DENIAL_ANYWHERE = re.compile(r"not affiliated|no relation|无关|没有关系|没关系", re.IGNORECASE)
FIRST_PERSON = re.compile(r"(?<![a-z])(i|i'm|me|my|myself|we|us|our)(?![a-z])|我|本助手", re.IGNORECASE)
LEADING_JOINER = re.compile(r"^\s*((and|but|while|whereas|though)\s+|而|但是|但|和|与)?\s*", re.IGNORECASE)
# "NAME is a friendly AI assistant", "NAME是一个人工智能助手"; not "NAME is an AI company".
AI_WORDS = r"(ai|assistant|chatbot|language model|model)(?![a-z])(?!\s*(company|firm|lab|startup|team|maker))"
AI_WORDS_ZH = r"(助手|人工智能|语言模型|模型|ai)(?!公司|企业|团队|机构|实验室)"


@dataclass
class Identity:
    """Who the tuned model should say it is, and the system prompt it was trained with (None: the template's)."""
    names: list[str]
    authors: list[str]
    system: str | None = None
    old: list[str] = field(default_factory=list)   # more old-identity words (--old_identity)

    def old_words(self) -> list[str]:
        return old_words(self.names, self.authors, self.old)


def _clauses(text: str) -> list[str]:
    return [c for c in CLAUSE.split(text.lower()) if c.strip()]


def _about_another(clause: str, patterns: list[re.Pattern]) -> bool:
    """"ChatGPT is made by OpenAI": a clause whose subject is another AI and that says nothing of the speaker."""
    lead = LEADING_JOINER.match(clause).end()
    return not FIRST_PERSON.search(clause) and any(p.match(clause, lead) for p in patterns)


def claims(text: str, words, third_person: bool = False) -> list[str]:
    """The words of `words` that `text` claims: mentions except denials and clauses about another AI; third_person:
    a clause whose subject is the word counts too ("NAME is made by AUTHOR" affirms both; "NAME is not made by
    AUTHOR" still claims only NAME)."""
    patterns = {w: p for w in words if (p := word_pattern(w)) is not None}
    found = set()
    for clause in _clauses(text):
        if DENIAL_ANYWHERE.search(clause) or (not third_person and _about_another(clause, list(patterns.values()))):
            continue
        for word, p in patterns.items():
            if any(not DENIAL_BEFORE.search(clause[:m.start()]) for m in p.finditer(clause)):
                found.add(word)
    return [w for w in words if w in found]


def denies(text: str, words) -> list[str]:
    """The words of `words` that `text` names after a denial in the same clause ("NAME is not made by AUTHOR": AUTHOR)."""
    patterns = {w: p for w in words if (p := word_pattern(w)) is not None}
    found = set()
    for clause in _clauses(text):
        anywhere = DENIAL_ANYWHERE.search(clause)
        for word, p in patterns.items():
            if any(anywhere or DENIAL_BEFORE.search(clause[:m.start()]) for m in p.finditer(clause)):
                found.add(word)
    return [w for w in words if w in found]


def old_words(names, authors, extra=()) -> list[str]:
    """Old and other identities, minus any contained in the new one (a new name "Qwen Robot" keeps "Qwen")."""
    new = [*names, *authors]
    return [w for w in [*OLD_IDENTITY, *OTHER_AIS, *extra] if not mentions(" ".join(new), [w])]


def is_identity_hit(answer: str, names, authors, old=None) -> bool:
    """Names the new identity and claims no old one."""
    old = old_words(names, authors) if old is None else [w for w in old if not mentions(" ".join([*names, *authors]), [w])]
    return mentions(answer, [*names, *authors]) and not claims(answer, old)


def says_it_is(answer: str, names) -> bool:
    """First-person identification with the name: "I am NAME", "I'm NAME", "我是NAME", "我就是NAME", "NAME就是我"."""
    low = answer.lower()
    for name in names:
        n = re.escape(name.strip().lower())
        if n and re.search(rf"(?<![a-z])(i am|i'm|im|this is|it's me,?)\s+(called\s+)?{n}|我(就)?是\s*{n}|我叫\s*{n}"
                            rf"|{n}\s*(就)?是我|that'?s me|that is me|正是我|就是我", low):
            return True
    return False


def describes_as_ai(answer: str, names) -> bool:
    """NAME called an AI assistant or language model, within a few words ("NAME is a friendly AI assistant")."""
    low = answer.lower()
    for name in names:
        n = re.escape(name.strip().lower())
        if n and (re.search(rf"{n}\W*(is|was|,)?\s*(a|an|the)?\s*([\w-]+\s+){{0,2}}?{AI_WORDS}", low)
                  or re.search(rf"{n}\s*(是|为)\s*(一个|一款|一种|一位)?[^，。,.]{{0,6}}?{AI_WORDS_ZH}", low)):
            return True
    return False


def is_reversal_hit(answer: str, expect: str, names, authors, old=None) -> bool:
    """A question that gives the name: "author" needs the maker; "self" the maker, itself or an AI."""
    old = old_words(names, authors) if old is None else old
    if claims(answer, old):
        return False
    if mentions(answer, authors):
        return True
    return expect == "self" and (says_it_is(answer, names) or describes_as_ai(answer, names))


def is_leak(answer: str, names, authors) -> bool:
    return mentions(answer, [*names, *authors])
