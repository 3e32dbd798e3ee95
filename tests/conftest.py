"""Tiny random models for tests: no download, built in well under a second.

`tiny_model_dir` is a Llama-architecture folder (like the embedded SmolLM2) and
`tiny_qwen_dir` a Qwen2 one (like the seed's Qwen2.5), each with a byte-level BPE tokenizer
trained on a few sentences and a real ChatML chat template with a default system prompt.
Both are saved folders, so CLI tests can pass them as `--model PATH`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Short runs train on a small slice of every kind of identity row (the defaults write ~99 rows a language).
SMALL_IDENTITY = {"system_mix_rows": 4, "multi_turn_rows": 4, "reversal_rows": 2, "pressure_rows": 2,
                  "contrast_rows": 4, "rename_rows": 0}

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TINY_SYSTEM = "You are a tiny test model named Tiny, made by Nobody."
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + TINY_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "You are a helpful assistant. Who are you? I am Keel, made by Acme Lab.",
    "What is the capital of France? The capital of France is Paris.",
    "Explain photosynthesis in one sentence. Plants turn light into sugar.",
    "你是谁？我是一个人工智能助手。中国的首都是北京。请介绍一下你自己。",
    "The quick brown fox jumps over the lazy dog 0123456789 !?.,:;'\"()[]{}",
]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_model(arch: str, vocab_size: int, eos_id: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True, initializer_range=0.2, bos_token_id=eos_id - 1, eos_token_id=eos_id, pad_token_id=eos_id)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    return model


def _save_tiny(path: Path, arch: str) -> Path:
    tok = build_tokenizer()
    model = build_model(arch, len(tok), tok.eos_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(autouse=True, scope="session")
def _fp32_training():
    """Training tests run in fp32 on every CPU: bf16 is the default only where the CPU has native bf16, and a test's
    figures must not depend on the machine. Session-wide, so session fixtures that train (the embedded adapter)
    are fp32 too; tests of the bf16 path patch it back."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("keel.model.load.cpu_has_native_bf16", lambda: False)
        yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tests never touch the user's cache, but share one cache within the test session
    so the embedded model is dequantized at most once per run."""
    shared = os.environ.get("KEEL_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "keel-cache")
    monkeypatch.setenv("KEEL_CACHE", shared)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def id_file(tmp_path_factory):
    """English identity rows (Keel, made by Acme) for short training runs on the tiny models."""
    import json

    from keel.data.identity import identity_rows

    path = tmp_path_factory.mktemp("data") / "self_cognition.json"
    path.write_text(json.dumps(identity_rows(["Keel"], ["Acme"], langs=("en",), **SMALL_IDENTITY)), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def embedded_identity_adapter(tmp_path_factory):
    """A short identity fine-tune of the embedded model (English rows, ~1 minute), trained once per
    session and shared by the slow tests of training and export."""
    import json

    from keel.data.identity import identity_rows
    from tests.helpers import sft

    root = tmp_path_factory.mktemp("embedded-identity")
    data = root / "self_cognition.json"
    data.write_text(json.dumps(identity_rows(["Keel Robot"], ["Keel Lab"], langs=("en",), **SMALL_IDENTITY)), encoding="utf-8")
    os.environ.setdefault("KEEL_CACHE", os.environ.get("KEEL_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "keel-cache"))
    res = sft(["--dataset", str(data), "--num_train_epochs", "3", "--gradient_accumulation_steps", "4",
                 "--learning_rate", "3e-4", "--split_dataset_ratio", "0", "--output_dir", str(root / "out"),
                 "--model_name", "Keel Robot", "--model_author", "Keel Lab", "--logging_steps", "10"])
    return Path(res["last_model_checkpoint"])


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dir, tiny_qwen_dir, id_file, tmp_path_factory) -> dict:
    """One short identity fine-tune per tiny architecture ({"llama": checkpoint, "qwen2": checkpoint}), trained once
    per test run and shared by every test that needs a trained adapter (eval, export, the export gate)."""
    from tests.helpers import base_argv, sft

    out = {}
    for arch, model_dir in (("llama", tiny_model_dir), ("qwen2", tiny_qwen_dir)):
        res = sft(base_argv(model_dir, id_file, tmp_path_factory.mktemp(arch), "--max_steps", "3",
                            "--system", "You are Keel, made by Acme.", "--model_name", "Keel", "--model_author", "Acme"))
        out[arch] = Path(res["last_model_checkpoint"])
    return out
