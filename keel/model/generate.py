"""Text generation shared by infer, eval, deploy and ballast.

    answers = generate_batch(model, tok, [[{"role": "user", "content": "Hi"}]], max_new_tokens=64)
    for piece in stream_answer(model, tok, messages, GenerateArgs(temperature=0)):
        print(piece, end="")

Greedy when temperature is 0 (or below MIN_TEMPERATURE). Batches are left-padded and sorted by prompt length so
that little compute goes to padding. A streamed answer's prompt runs through the model in chunks, so a stop is
seen within one chunk even while a long prompt is being read.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass

import torch

from keel.core.errors import KeelError
from keel.model.template import prompt_ids

# Below this a temperature is greedy: logits divided by ~1e-38 overflow to inf and sampling fails (vLLM's
# _SAMPLING_EPS is the same 1e-5).
MIN_TEMPERATURE = 1e-5
# Prompt tokens per forward pass before a streamed answer: stopping is checked between chunks. Reading a prompt
# in chunks of 256 cost no more than one pass on a CPU; 128 cost about 30% more (docs/serving.md).
PREFILL_CHUNK = 256


@dataclass
class GenerateArgs:
    temperature: float = 0.0
    """Sampling temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability adds up to top_p."""
    max_new_tokens: int = 512
    """The most tokens to generate for one answer."""
    seed: int | None = None
    """Random seed for sampling (answers repeat for the same seed)."""

    def __post_init__(self):
        if self.temperature < 0:
            raise KeelError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise KeelError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise KeelError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")


def sampling_kwargs(tokenizer, gen: GenerateArgs) -> dict:
    """Keyword arguments for `model.generate` (greedy when temperature is 0 or below MIN_TEMPERATURE)."""
    kw = {"max_new_tokens": gen.max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if gen.temperature >= MIN_TEMPERATURE:
        kw.update(do_sample=True, temperature=gen.temperature, top_p=gen.top_p)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


def _seed(gen: GenerateArgs):
    if gen.seed is not None:
        import torch

        torch.manual_seed(gen.seed)


def model_device(model):
    return next(model.parameters()).device


def no_grad_context(model):
    """inference_mode, or no_grad for a model sharded by FSDP (transformers' mark): the weights it gathers for a
    pass live in buffers that later training passes reuse, and inference tensors cannot be updated outside it."""
    import torch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return torch.no_grad() if getattr(inner, "_is_fsdp_managed_module", False) else torch.inference_mode()


def context_length(model, tokenizer) -> int:
    """The most tokens the model reads at once (prompt and answer together)."""
    return int(getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length)


def prefill(model, ids, stop: threading.Event):
    """(cache, stopped): all but the prompt's last token run through the model PREFILL_CHUNK tokens at a time,
    `stop` checked between chunks (in one pass a long prompt could not be stopped). The cache is None when the
    prompt fits one chunk or the model is not a torch module (llama.cpp checks between its own batches)."""
    from transformers import DynamicCache

    if ids.shape[1] <= PREFILL_CHUNK or not isinstance(model, torch.nn.Module):
        return None, False
    cache = DynamicCache(config=model.config)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model passes it on
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
    with torch.inference_mode():
        for start in range(0, ids.shape[1] - 1, PREFILL_CHUNK):
            if stop.is_set():
                return None, True
            part = ids[:, start:min(start + PREFILL_CHUNK, ids.shape[1] - 1)]  # (1, chunk)
            model(input_ids=part, cache=cache, use_cache=True, **keep)  # only the cache is wanted, not logits
    return cache, stop.is_set()


def generate_batch(model, tokenizer, conversations: list[list[dict]], gen: GenerateArgs | None = None,
                   batch_size: int = 8, progress=None, max_prompt_tokens: int | None = None) -> list[str]:
    """Answer many conversations; returns the answers in input order. Prompts longer than `max_prompt_tokens`
    keep their last tokens."""
    gen = gen or GenerateArgs()
    _seed(gen)
    prompts = [prompt_ids(tokenizer, c)[-max_prompt_tokens:] if max_prompt_tokens else prompt_ids(tokenizer, c)
               for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    device = model_device(model)
    pad = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = pad_batch([prompts[i] for i in idx], pad, left=True)  # (B, T): generation continues on the right
        width = ids.shape[1]
        with no_grad_context(model):
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 **sampling_kwargs(tokenizer, gen))
        for row, i in enumerate(idx):
            answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
        if progress is not None:
            progress(len(idx))
    return answers


def stream_answer(model, tokenizer, messages: list[dict], gen: GenerateArgs,
                  stop: threading.Event | None = None, outcome: dict | None = None, max_prompt_tokens: int | None = None):
    """Yield the answer as text pieces while it is generated. Setting `stop` ends it early, even while the prompt is
    being read. A prompt longer than `max_prompt_tokens` keeps its last tokens.

    If `outcome` is a dict it receives, once the answer is complete, `tokens` (the number generated,
    an end-of-turn token included) and `finish_reason`: "length" when max_new_tokens cut the answer,
    else "stop" (the model ended its turn, or `stop` was set).
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    stop = stop or threading.Event()

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return stop.is_set()

    _seed(gen)
    ids = prompt_ids(tokenizer, messages)
    ids = torch.tensor([ids[-max_prompt_tokens:] if max_prompt_tokens else ids], device=model_device(model))
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def run():
        try:
            cache, stopped = prefill(model, ids, stop)
            if stopped:
                streamer.end()
                if outcome is not None:
                    outcome.update(tokens=0, finish_reason="stop")
                return
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                     stopping_criteria=StoppingCriteriaList([_Stop()]),
                                     **({"cache": cache} if cache is not None else {}), **sampling_kwargs(tokenizer, gen))
            if outcome is not None:
                n = out.shape[1] - ids.shape[1]
                ends = model.generation_config.eos_token_id
                ends = set(ends if isinstance(ends, list) else [ends]) | {tokenizer.eos_token_id}
                cut = n >= gen.max_new_tokens and int(out[0, -1]) not in ends
                outcome.update(tokens=n, finish_reason="length" if cut else "stop")
        except BaseException as e:  # surfaced in the caller's thread below
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        for piece in streamer:
            if piece:
                yield piece
    finally:
        stop.set()
        thread.join()
    if errors:
        raise errors[0]


def answer(model, tokenizer, messages: list[dict], gen: GenerateArgs | None = None) -> str:
    """One answer, not streamed."""
    return generate_batch(model, tokenizer, [messages], gen or GenerateArgs(), batch_size=1)[0]


def pad_batch(seqs: list[list[int]], value: int, left: bool = False):
    """(ids, mask), both (B, T): sequences padded with `value` to the longest, on the right or the left."""
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for j, x in enumerate(seqs):
        where = slice(width - len(x), width) if left else slice(0, len(x))
        ids[j, where], mask[j, where] = torch.tensor(x, dtype=torch.long), 1
    return ids, mask
