"""Write a merged Llama or Qwen2 model as GGUF (llama.cpp, Ollama) with the `gguf` library.

    write_gguf(model, tokenizer, "model-f16.gguf", quant="f16", chat_template=template)

Tensors get llama.cpp's names from gguf's own name map; Llama's q/k projections are permuted to
llama.cpp's rotary layout (as its converter does; transformers' GGUF loader undoes it). The
tokenizer is stored as a GPT-2-style BPE (tokens, types, merges) with its special ids and the
chat template, so the file is self-contained.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from keel.errors import KeelError

# HF model_type -> (gguf architecture, pre-tokenizer name, permute q/k for llama.cpp's rope layout)
ARCHS = {"llama": ("LLAMA", "smollm", True), "qwen2": ("QWEN2", "qwen2", False)}
QUANTS = ("f32", "f16", "q8_0")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half layout -> llama.cpp's interleaved layout for one q or k weight (out, in)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tokenizer_pieces(tokenizer, vocab_size: int):
    """Tokens in id order, their llama.cpp types, and the BPE merges as 'a b' strings."""
    import gguf

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise KeelError(f"GGUF export supports BPE tokenizers only, this one is {data['model']['type']}")
    by_id = {i: t for t, i in data["model"]["vocab"].items()}
    special = {a["id"] for a in data.get("added_tokens", []) if a.get("special")}
    for a in data.get("added_tokens", []):
        by_id[a["id"]] = a["content"]
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
        else:  # embedding rows beyond the tokenizer (padded vocabularies, e.g. Qwen2.5)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    return tokens, types, merges


def write_gguf(model, tokenizer, path: Path, quant: str = "f16", chat_template: str | None = None, name: str = "model"):
    """Write `model` (a plain, merged transformers model) to `path` atomically."""
    import gguf

    cfg = model.config
    if cfg.model_type not in ARCHS:
        raise KeelError(f"GGUF export supports {', '.join(ARCHS)} models; this one is '{cfg.model_type}'")
    if quant not in QUANTS:
        raise KeelError(f"--quant must be one of {', '.join(QUANTS)}, got '{quant}'")
    arch_name, pre, permute = ARCHS[cfg.model_type]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant])
    tokens, types, merges = tokenizer_pieces(tokenizer, cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_add_bos_token(False)
    for setter, tid in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id, tokenizer.eos_token_id),
                        (writer.add_pad_token_id, tokenizer.pad_token_id), (writer.add_unk_token_id, tokenizer.unk_token_id)):
        if tid is not None:
            setter(tid)
    if chat_template:
        writer.add_chat_template(chat_template)

    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    state = model.state_dict()
    tied = getattr(cfg, "tie_word_embeddings", False)
    for key, tensor in state.items():
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp reads the output head from token_embd when output.weight is absent
        new = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise KeelError(f"GGUF export: no llama.cpp name for tensor '{key}'")
        data = tensor.detach().float().cpu().numpy()
        if permute and key.endswith("q_proj.weight"):
            data = permute_qk(data, n_head)
        elif permute and key.endswith("k_proj.weight"):
            data = permute_qk(data, n_kv)
        qtype = gguf.GGMLQuantizationType.F32
        if data.ndim == 2 and quant == "f16":
            data, qtype = data.astype(np.float16), gguf.GGMLQuantizationType.F16
        elif data.ndim == 2 and quant == "q8_0" and data.shape[-1] % 32 == 0:
            data, qtype = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        elif data.ndim == 2 and quant == "q8_0":
            data, qtype = data.astype(np.float16), gguf.GGMLQuantizationType.F16
        writer.add_tensor(new, data, raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise KeelError(f"could not write {path}: {e.strerror}") from None
    return path


def modelfile(gguf_name: str, system: str | None, chat_template: str) -> str:
    """An Ollama Modelfile for a ChatML model (the template family of SmolLM2 and Qwen2.5)."""
    if "<|im_start|>" not in chat_template:
        raise KeelError("the Ollama Modelfile is written for ChatML templates only")
    lines = [f"FROM ./{gguf_name}", 'TEMPLATE """' + MODELFILE_TEMPLATE + '"""']
    if system:
        lines.append('SYSTEM """' + system + '"""')
    lines += ['PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"']
    return "\n".join(lines) + "\n"


MODELFILE_TEMPLATE = ("{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
                      "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                      "<|im_start|>assistant\n")
