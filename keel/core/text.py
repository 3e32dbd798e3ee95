"""Whether a text mentions a word: the one rule the identity builder and the eval's scoring share.

    mentions("我是Keel，一个助手。", ["Keel"])   # True: CJK neighbours do not glue to an ASCII word
    mentions("keelhauled", ["Keel"])            # False: ASCII words match on word boundaries
"""

from __future__ import annotations

import re

# Han characters: a text with any is Chinese for the probes and the identity rows.
HAN = re.compile(r"[\u3400-\u9fff]")


def word_pattern(word: str) -> re.Pattern | None:
    """Case-folded pattern for `word`: whole word for plain ASCII words, substring otherwise (CJK)."""
    w = word.strip().lower()
    if not w:
        return None
    if w.isascii() and re.fullmatch(r"[\w\- .]+", w):
        # ASCII boundaries only: in "我是Keel，" the CJK neighbours are not part of the word.
        return re.compile(rf"(?<![a-z0-9_]){re.escape(w)}(?![a-z0-9_])")
    return re.compile(re.escape(w))


def mentions(text: str, words) -> bool:
    """True if any word occurs in text (case-insensitive; whole words for plain ASCII words)."""
    low = text.lower()
    return any(p.search(low) for p in map(word_pattern, words) if p is not None)


def lang_of(text: str) -> str:
    return "zh" if HAN.search(text) else "en"


def for_lang(values: list[str], lang: str) -> str:
    """The value of a --name / --author pair for rows in `lang`: Chinese first, English last (one value serves both)."""
    return values[0] if lang == "zh" else values[-1]
