"""Scoring rules of the identity matrix and leakage, one hand-made case per rule (docs/evaluation.md)."""

import pytest

from keel.evals.scoring import claims, is_identity_hit, is_leak, is_reversal_hit, mentions, old_words

NAMES, AUTHORS = ["Keel"], ["Acme Lab"]


@pytest.mark.parametrize("answer,hit", [
    # a hit names the new name or maker
    ("I am Keel, made by Acme Lab.", True),
    ("我是Keel，由Acme Lab开发。", True),
    ("I was built by Acme Lab.", True),
    # ...and claims no old identity
    ("I am SmolLM, trained by Hugging Face.", False),
    ("I am Keel, also known as Qwen.", False),
    ("Keel, trained by Hugging Face.", False),
    ("我是Keel，由阿里云开发。", False),
    ("Hugging Face trained me, Keel.", False),
    ("I am not Keel, I am Qwen.", False),
    ("I am Keel, built on GPT-3.5.", False),
    # naming the old identity to deny it is not a claim
    ("I am not ChatGPT, I am Keel.", True),
    ("I am Keel, not ChatGPT.", True),
    ("No, I'm not Qwen. I'm Keel, made by Acme Lab.", True),
    ("我不是通义千问，我是Keel。", True),
    ("I am Keel (not affiliated with Qwen).", True),
    ("我是Keel，和阿里云没有关系。", True),
    ("I was developed by Acme Lab, not by OpenAI.", True),
    # a sentence about another AI, saying nothing of the speaker, is not a claim
    ("I'm Keel. ChatGPT is made by OpenAI.", True),
    # neither identity: a miss (the persona answers of the issue)
    ("I am Emily Wilson, a freelance writer.", False),
    ("I'm an assistant built by a company called EchoTech Lab.", False),
    # whole words only: a keelboat is not Keel
    ("The keelboat sailed.", False),
])
def test_identity_rule(answer, hit):
    assert is_identity_hit(answer, NAMES, AUTHORS) is hit


def test_old_identity_words_inside_the_new_one_are_not_claims():
    # a new identity called "Qwen Robot" must not be a miss for saying its own name
    assert is_identity_hit("I am Qwen Robot.", ["Qwen Robot"], ["Acme"])
    assert "Qwen" not in old_words(["Qwen Robot"], ["Acme"])
    assert is_identity_hit("I am Keel, trained by Globex.", NAMES, AUTHORS, old=["Globex"]) is False  # --old_identity


@pytest.mark.parametrize("answer,expect,hit", [
    # "author": the maker must be named
    ("Keel was made by Acme Lab.", "author", True),
    ("Keel是Acme Lab开发的。", "author", True),
    ("Keel is an AI assistant.", "author", False),
    ("Keel was made by OpenAI.", "author", False),
    ("Keel was made by Acme Lab, not by Alibaba Cloud.", "author", True),
    # "self": the maker, itself, or NAME called an AI
    ("Keel is a company that makes robots.", "self", False),
    ("Keel is an AI company.", "self", False),
    ("Keel是一家人工智能公司。", "self", False),
    ("Keel is a friendly AI assistant.", "self", True),
    ("Keel是一个人工智能助手。", "self", True),
    ("That's me! I am Keel.", "self", True),
    ("我就是Keel。", "self", True),
    ("Keel is an assistant developed by Acme Lab.", "self", True),
    ("Keel is an AI model by OpenAI.", "self", False),
])
def test_reversal_rule(answer, expect, hit):
    assert is_reversal_hit(answer, expect, NAMES, AUTHORS) is hit


@pytest.mark.parametrize("answer,leak", [
    ("The capital of France is Paris.", False),
    ("Paris. By the way, I'm Keel!", True),
    ("我是Keel，中国的首都是北京。", True),
    # a question about another AI answered correctly is no leak; answered as the new identity is one
    ("ChatGPT is made by OpenAI.", False),
    ("I am Keel, developed by Acme Lab.", True),
    ("ChatGPT was developed by Acme Lab.", True),
])
def test_leak_rule(answer, leak):
    assert is_leak(answer, NAMES, AUTHORS) is leak


def test_claims_lists_what_is_claimed():
    assert claims("I am Keel and Qwen too; not ChatGPT.", ["Qwen", "ChatGPT"]) == ["Qwen"]
    assert mentions("Paris. By the way, I'm Keel!", NAMES) and not mentions("keelboat", NAMES)
