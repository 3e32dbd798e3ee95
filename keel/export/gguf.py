"""Write a merged Llama or Qwen2 model as GGUF (llama.cpp, Ollama) with the `gguf` library.

    write_gguf(model, tokenizer, "model-f16.gguf", quant="f16", chat_template=template)

Tensors get llama.cpp's names from gguf's own name map; Llama's q/k projections are permuted to
llama.cpp's rotary layout (as its converter does; transformers' GGUF loader undoes it). The
tokenizer is stored as a GPT-2-style BPE (tokens, types, merges) with its special ids and the
chat template, so the file is self-contained.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
from pathlib import Path

import numpy as np

from keel.core.errors import KeelError

# HF model_type -> (gguf architecture, pre-tokenizer name, permute q/k for llama.cpp's rope layout)
ARCHS = {"llama": ("LLAMA", "smollm", True), "qwen2": ("QWEN2", "qwen2", False)}
# Written by the gguf library from the merged weights; the k-quants by llama.cpp's quantizer from an f16 file.
WRITE_QUANTS = ("f32", "f16", "q8_0")
K_QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M"}
QUANTS = (*WRITE_QUANTS, *K_QUANTS)


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
    if quant not in WRITE_QUANTS:
        raise KeelError(f"--quant must be one of {', '.join(WRITE_QUANTS)} here (k-quants: quantize_gguf), got '{quant}'")
    arch_name, pre, permute = ARCHS[cfg.model_type]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    add_header(writer, cfg, quant, name)
    add_tokenizer(writer, tokenizer, cfg.vocab_size, pre, chat_template)
    add_tensors(writer, model, arch, permute, quant)
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


def add_header(writer, cfg, quant: str, name: str):
    """The architecture's hyperparameters and the file type, from the transformers config."""
    import gguf

    n_head = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant])


def add_tokenizer(writer, tokenizer, vocab_size: int, pre: str, chat_template: str | None):
    """The BPE vocabulary, merges, special ids and chat template, so the file needs no tokenizer beside it."""
    tokens, types, merges = tokenizer_pieces(tokenizer, vocab_size)
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


def add_tensors(writer, model, arch, permute: bool, quant: str):
    """Every weight under llama.cpp's name, q/k permuted for its rope layout, in the asked type where it fits."""
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    tied = getattr(cfg, "tie_word_embeddings", False)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp reads the output head from token_embd when output.weight is absent
        new = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise KeelError(f"GGUF export: no llama.cpp name for tensor '{key}'")
        data = tensor.detach().float().cpu().numpy()
        if permute and key.endswith("q_proj.weight"):
            data = permute_qk(data, cfg.num_attention_heads)
        elif permute and key.endswith("k_proj.weight"):
            data = permute_qk(data, cfg.num_key_value_heads)
        qtype = gguf.GGMLQuantizationType.F32
        if data.ndim == 2 and quant == "f16":
            data, qtype = data.astype(np.float16), gguf.GGMLQuantizationType.F16
        elif data.ndim == 2 and quant == "q8_0" and data.shape[-1] % 32 == 0:
            data, qtype = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        elif data.ndim == 2 and quant == "q8_0":
            data, qtype = data.astype(np.float16), gguf.GGMLQuantizationType.F16
        writer.add_tensor(new, data, raw_dtype=qtype)


def quantize_gguf(src: Path, dst: Path, quant: str) -> Path:
    """Quantize an f16/f32 GGUF to a k-quant with llama.cpp's own quantizer (as `llama-quantize` does).

    Tensors whose rows are not a multiple of 256 cannot hold k-quant blocks; llama.cpp then picks
    its fallback type for them (q5_0/q5_1/q8_0, or f16), as it does for every model.
    """
    from keel.model.llama_backend import require_llama_cpp

    lc = require_llama_cpp()
    if quant not in K_QUANTS:
        raise KeelError(f"--quant {quant}: llama.cpp's quantizer is used for {', '.join(K_QUANTS)} only")
    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, K_QUANTS[quant])
    params.nthread = len(os.sched_getaffinity(0))
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        with quiet_fds() as log:  # llama.cpp logs every tensor; only a failure's last words are kept
            failed = lc.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if failed:
            tmp.unlink(missing_ok=True)
            last = next((line for line in reversed("".join(log).splitlines()) if line.strip()), "no message")
            raise KeelError(f"llama.cpp could not quantize {src.name} to {quant}: {last.strip()}")
        os.replace(tmp, dst)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise KeelError(f"could not write {dst}: {e.strerror}") from None
    return dst


@contextlib.contextmanager
def quiet_fds():
    """Send this process's C-level stdout and stderr to a temporary file for the block; yields a list that
    holds what was written there once the block has ended."""
    import sys
    import tempfile

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    text: list[str] = []
    with tempfile.TemporaryFile() as log:
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield text
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            log.seek(0)
            text.append(log.read().decode("utf-8", errors="replace"))


# Ollama Modelfile: the chat-template families Keel can write a TEMPLATE for. Each family says how
# one message renders, and the Go template (Ollama's text/template) that renders the same text.
# Ollama passes system messages both as .System and inside .Messages, so the range skips them.
CHATML_GO = ("{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
             "{{- range .Messages }}{{- if ne .Role \"system\" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
             "{{ end }}{{- end }}<|im_start|>assistant\n")
FAMILIES = {
    "chatml": {"message": "<|im_start|>{role}\n{content}<|im_end|>\n", "prompt": "<|im_start|>assistant\n",
               "go": CHATML_GO, "stop": ["<|im_end|>", "<|im_start|>"], "models": "SmolLM2, Qwen2.5"},
}
MODELFILE_TEMPLATE = CHATML_GO
PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Who?"}]


def render_family(family: dict, system: str | None, messages: list[dict]) -> str:
    """What the family's Go template renders for this system prompt and these (non-system) messages."""
    turns = ([{"role": "system", "content": system}] if system else []) + [m for m in messages if m["role"] != "system"]
    return "".join(family["message"].format(**m) for m in turns) + family["prompt"]


def chat_family(tokenizer, template: str) -> tuple[str, str | None]:
    """(family, the template's default system prompt) if `template` renders as a family Keel knows, else a KeelError."""
    def hf(msgs):
        return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=True)

    for name, fam in FAMILIES.items():
        with_sys = hf([{"role": "system", "content": "S"}, *PROBE])
        if with_sys != render_family(fam, "S", PROBE):
            continue
        without = hf(PROBE)
        rest = "".join(fam["message"].format(**m) for m in PROBE) + fam["prompt"]
        if without == rest:
            return name, None
        head = without[:-len(rest)] if without.endswith(rest) else ""
        pre, _, post = fam["message"].partition("{content}")
        pre = pre.format(role="system")
        if head.startswith(pre) and head.endswith(post):
            return name, head[len(pre):-len(post)]
    known = "; ".join(f"{k} ({v['models']})" for k, v in FAMILIES.items())
    raise KeelError(f"Ollama Modelfile: this chat template is not of a family Keel can write a TEMPLATE for "
                    f"(supported: {known}); export with --to hf, or write the Modelfile by hand")


def modelfile(gguf_name: str, tokenizer, template: str, system: str | None = None) -> str:
    """An Ollama Modelfile whose TEMPLATE, SYSTEM and stops render what the chat template renders."""
    name, default = chat_family(tokenizer, template)
    fam = FAMILIES[name]
    system = system or default
    lines = [f"FROM ./{gguf_name}", 'TEMPLATE """' + fam["go"] + '"""']
    if system:  # Ollama fills .System with it when a request has no system message, as the template does
        lines.append('SYSTEM """' + system + '"""')
    lines += [f'PARAMETER stop "{s}"' for s in fam["stop"]]
    return "\n".join(lines) + "\n"
