"""A GGUF file run by llama.cpp (through llama-cpp-python), behind the transformers calls Keel makes.

    model, tok, info = load_gguf("checkpoint-69-gguf/model-q4_k_m.gguf")
    generate_batch(model, tok, [[{"role": "user", "content": "Who are you?"}]])   # llama.cpp's answer
    tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # the GGUF's own template

`keel deploy --model X.gguf` and the export gate use these two objects where they would use a
transformers model and tokenizer, so the server, the eval and the gate run unchanged on what users
serve. Everything model-specific comes from the GGUF file, never from a Hugging Face folder:
- the prompt is the chat template stored in the GGUF's metadata, rendered the way llama-cpp-python
  renders it for `create_chat_completion` (its Jinja2ChatFormatter); a file without one is rendered
  with llama.cpp's own fallback (its built-in `chatml`), as llama.cpp's server does;
- token ids, special tokens, end-of-generation tokens and decoding are llama.cpp's vocabulary's;
- generation is llama.cpp's sampler: greedy at temperature 0, as `keel.model.generate` is.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from keel.core.errors import KeelError
from keel.model.generate import PREFILL_CHUNK

PIP_HINT = 'pip install -e ".[gguf]"  (llama-cpp-python; it builds llama.cpp from source, a few minutes)'
FALLBACK_TEMPLATE = "chatml"  # what llama.cpp's server uses for a GGUF without a chat template


def require_llama_cpp():
    """The llama_cpp module, or a one-line error saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise KeelError(f"this GGUF step runs llama.cpp, which is not installed: {PIP_HINT}") from None
    return llama_cpp


def _read_header(path: Path) -> dict:
    """Architecture and chat template from the GGUF header (gguf's reader), before llama.cpp loads it."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        out = {}
        arch = reader.fields.get("general.architecture")
        arch = arch.contents() if arch is not None else "?"
        for key, name in (("general.architecture", "arch"), ("tokenizer.chat_template", "chat_template"),
                          (f"{arch}.context_length", "context_length")):
            field = reader.fields.get(key)
            if field is not None:
                out[name] = field.contents()
    except Exception as e:  # gguf raises assorted errors (IndexError, ValueError, ...) on a damaged file
        raise KeelError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:160]})") from None
    return out


class LlamaCppTokenizer:
    """The tokenizer interface Keel uses (chat template, encode, decode, special ids), from the GGUF alone."""

    def __init__(self, llm, chat_template: str | None):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        lc = require_llama_cpp()
        self._llm = llm
        self._vocab = lc.llama_model_get_vocab(llm.model)
        n = lc.llama_vocab_n_tokens(self._vocab)
        control = [i for i in range(n) if lc.llama_vocab_get_attr(self._vocab, i) & lc.LLAMA_TOKEN_ATTR_CONTROL]
        self.added_tokens_encoder = {self._piece(i): i for i in control}
        self._control = set(control)
        self.eog_ids = [i for i in control if lc.llama_vocab_is_eog(self._vocab, i)] or [llm.token_eos()]
        self.eos_token_id = llm.token_eos()
        self.bos_token_id = llm.token_bos() if llm.token_bos() >= 0 else None
        self.eos_token = self._piece(self.eos_token_id)
        self.bos_token = self._piece(self.bos_token_id) if self.bos_token_id is not None else None
        pad = lc.llama_vocab_pad(self._vocab)
        self.pad_token_id = pad if pad >= 0 else self.eos_token_id
        self.model_max_length = llm.n_ctx()
        self.chat_template = chat_template
        self._formatters = {}
        if chat_template:
            for add in (False, True):
                self._formatters[add] = Jinja2ChatFormatter(chat_template, self.eos_token or "", self.bos_token or "",
                                                            add_generation_prompt=add)

    def _piece(self, i: int) -> str:
        return self._llm.detokenize([i], special=True).decode("utf-8", errors="replace")

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if self._formatters:
            return self._formatters[add_generation_prompt](messages=messages).prompt
        lc = require_llama_cpp()
        keep = [(m["role"].encode(), m["content"].encode()) for m in messages]  # alive while llama.cpp reads them
        chat = (lc.llama_chat_message * len(keep))(*[lc.llama_chat_message(role=r, content=c) for r, c in keep])
        size = 256 + 2 * sum(len(r) + len(c) for r, c in keep)
        buf = ctypes.create_string_buffer(size)
        n = lc.llama_chat_apply_template(FALLBACK_TEMPLATE.encode(), chat, len(keep), add_generation_prompt, buf, size)
        if n < 0 or n > size:
            raise KeelError("llama.cpp could not render the conversation with its fallback chat template")
        return buf.raw[:n].decode("utf-8")

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False, sanitize_control_tokens=False,
                            **kwargs):
        text = self._render(list(messages), add_generation_prompt)
        if not tokenize:
            return text
        if not sanitize_control_tokens:
            return self.encode(text)
        # Message text is text: render with placeholders, tokenize the template's parts with their
        # control tokens and each message's content as plain text (as transformers' sanitize does).
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        shown = self._render([{**m, "content": mark} for m, mark in zip(messages, marks)], add_generation_prompt)
        ids = []
        for m, mark in zip(messages, marks):
            head, _, shown = shown.partition(mark)
            ids += self.encode(head) + self.encode(m["content"], special=False)
        return ids + self.encode(shown)

    def encode(self, text: str, special: bool = True) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=special) if text else []

    def __call__(self, text: str, add_special_tokens: bool = False, **kwargs) -> dict:
        ids = self.encode(text)
        if add_special_tokens and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> str:
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._control]
        return self._llm.detokenize(ids, special=not skip_special_tokens).decode("utf-8", errors="replace")


@dataclass
class _Config:
    max_position_embeddings: int
    model_type: str


@dataclass
class _GenerationConfig:
    eos_token_id: list[int]


class LlamaCppModel:
    """`generate()` with transformers' calling convention (left-padded batches, streamer, stopping criteria),
    answered one row at a time by llama.cpp. One generation at a time (llama.cpp's context is not shared)."""

    training = False

    def __init__(self, llm, tok: LlamaCppTokenizer, arch: str):
        self.llm, self.tok = llm, tok
        self.config = _Config(llm.n_ctx(), arch)
        self.generation_config = _GenerationConfig(list(tok.eog_ids))
        self._lock = threading.Lock()

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def parameters(self):
        import torch

        yield torch.zeros(1)  # keel.model.generate reads the device from the first parameter: the CPU

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 512, pad_token_id=None, do_sample=False,
                 temperature=None, top_p=None, streamer=None, stopping_criteria=None, **kwargs):
        import torch

        rows = input_ids.tolist()
        masks = attention_mask.tolist() if attention_mask is not None else [[1] * len(r) for r in rows]
        temp = float(temperature or 0.0) if do_sample else 0.0
        outs = []
        with self._lock:
            for row, mask in zip(rows, masks):
                prompt = [t for t, m in zip(row, mask) if m]
                if len(prompt) + max_new_tokens > self.llm.n_ctx():
                    max_new_tokens = max(1, self.llm.n_ctx() - len(prompt))
                if streamer is not None:
                    streamer.put(torch.tensor([row]))  # the prompt: a skip_prompt streamer drops it
                if stopping_criteria is not None and not self._prefill(prompt[:-1], stopping_criteria):
                    outs.append(row)  # stopped while reading the prompt
                    continue
                new = []
                for token in self.llm.generate(prompt, temp=temp, top_k=0, top_p=float(top_p or 1.0), min_p=0.0,
                                               repeat_penalty=1.0):
                    new.append(token)
                    if streamer is not None:
                        streamer.put(torch.tensor([token]))
                    if token in self.generation_config.eos_token_id or len(new) >= max_new_tokens:
                        break
                    if stopping_criteria is not None and any(c(None, None) for c in stopping_criteria):
                        break
                outs.append(row + new)
        if streamer is not None:
            streamer.end()
        width = max(len(o) for o in outs)
        pad = pad_token_id if pad_token_id is not None else self.tok.pad_token_id
        return torch.tensor([o + [pad] * (width - len(o)) for o in outs])  # (B, T + new)


    def _prefill(self, tokens: list[int], stopping_criteria) -> bool:
        """Evaluate a long prompt (but its last token) in chunks, checking the stopping criteria between them;
        llama.cpp's generate then finds these tokens cached and reads only the last. False when stopped."""
        if len(tokens) < PREFILL_CHUNK:
            return True
        self.llm.reset()
        for start in range(0, len(tokens), PREFILL_CHUNK):
            if any(c(None, None) for c in stopping_criteria):
                return False
            self.llm.eval(tokens[start:start + PREFILL_CHUNK])
        return True


@dataclass
class GGUFInfo:
    """What keel deploy reads from load_model's info, for a GGUF file."""
    path: str
    name: str
    system: str | None = None
    model: str | None = None
    adapters: tuple = ()
    model_name: list[str] | None = None
    model_author: list[str] | None = None

    def as_dict(self):
        return {"model": self.model, "path": self.path, "name": self.name, "adapters": [], "system": self.system}


def load_gguf(path, n_ctx: int = 4096, n_threads: int | None = None):
    """(model, tokenizer, info) for a GGUF file, run by llama.cpp. Unsupported architectures fail in one line."""
    path = Path(path)
    if not path.is_file():
        raise KeelError(f"--model: GGUF file '{path}' does not exist")
    header = _read_header(path)
    require_llama_cpp()
    from llama_cpp import Llama

    threads = n_threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
    arch = header.get("arch", "?")
    n_ctx = min(n_ctx, int(header.get("context_length") or n_ctx))  # no context beyond the trained one
    try:
        llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_gpu_layers=-1,
                    verbose=False)
    except (ValueError, RuntimeError) as e:
        raise KeelError(f"{path}: llama.cpp could not load this GGUF (architecture '{arch}'): {e}") from None
    tok = LlamaCppTokenizer(llm, header.get("chat_template"))
    model = LlamaCppModel(llm, tok, arch)
    return model, tok, GGUFInfo(path=str(path.resolve()), name=path.stem)
