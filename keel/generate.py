"""Text generation shared by infer, eval, deploy and ballast.

    answers = generate_batch(model, tok, [[{"role": "user", "content": "Hi"}]], max_new_tokens=64)
    for piece in stream_answer(model, tok, messages, GenerateArgs(temperature=0)):
        print(piece, end="")

Greedy when temperature is 0. Batches are sorted by prompt length so that little compute goes to
padding. Greedy batches run Keel's own loop (`greedy_batch`): its answers are transformers'
`generate` greedy answers (tests/test_generate.py), with less work:
- the prompts' common start (chat template and system prompt: most of an eval prompt) is computed
  once and its KV cache shared by every row, laid out as [prefix | padding | row's own tokens];
- a row that reached its end-of-sequence token leaves the batch (its cache rows are dropped)
  instead of generating padding until the longest answer ends;
- no per-step logits processors or stopping criteria beyond the end-of-sequence check.
Sampling, and a model whose generation config asks for logits processors (repetition penalty,
forced or suppressed tokens...), go through `generate`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from keel.chat import prompt_ids
from keel.errors import KeelError


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
    """Keyword arguments for `model.generate` (greedy when temperature == 0)."""
    kw = {"max_new_tokens": gen.max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if gen.temperature > 0:
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


# Generation-config fields that change greedy answers through logits processors; any of them set sends
# a batch to transformers' generate, which applies them.
PROCESSOR_FIELDS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0,
                    "min_new_tokens": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                    "forced_bos_token_id": None, "forced_eos_token_id": None, "sequence_bias": None,
                    "exponential_decay_length_penalty": None, "stop_strings": None, "renormalize_logits": False,
                    "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0, "num_beams": 1}


def plain_greedy(model) -> bool:
    """Whether greedy decoding of `model` is a bare argmax (no processor in its generation config)."""
    config = getattr(model, "generation_config", None)
    return all(getattr(config, k, None) in (None, default) for k, default in PROCESSOR_FIELDS.items())


def eos_ids(model, tokenizer) -> set[int]:
    """The tokens that end an answer, as generate reads them: the generation config's, else the tokenizer's."""
    ends = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ends = tokenizer.eos_token_id if ends is None else ends
    return set(ends if isinstance(ends, list) else [ends])


def common_prefix(prompts: list[list[int]]) -> int:
    """Tokens every prompt starts with, less one: each row keeps a token whose logits give its first answer token."""
    n = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == prompts[0][k]:
            k += 1
        n = k
    return max(n, 0)


def _cache_kwarg(model) -> str:
    """transformers 5.2x renamed the forward's `past_key_values` to `cache` (the old name warns, then goes in 5.40)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def greedy_batch(model, prompts: list[list[int]], max_new_tokens: int, ends: set[int], pad: int) -> list[list[int]]:
    """Greedy answers (token ids, the end token included) of a batch of prompts, with the KV cache.

    The cache holds [shared prefix | left padding | row tail]: the prefix is computed once (batch
    1) and repeated for every row; position ids count only real tokens (RoPE sees what it sees in
    a lone run), and the attention mask hides the padding. Rows that end leave the batch.
    """
    import torch
    from transformers import DynamicCache

    from keel.batching import pad_batch

    device = model_device(model)
    p = common_prefix(prompts) if len(prompts) > 1 else 0
    cache = DynamicCache(config=getattr(model, "config", None))
    kv = {_cache_kwarg(model): cache, "use_cache": True}
    with torch.inference_mode():
        if p:
            model(input_ids=torch.tensor([prompts[0][:p]], device=device), logits_to_keep=1, **kv)
            cache.batch_repeat_interleave(len(prompts))
        ids, mask = pad_batch([x[p:] for x in prompts], pad, left=True)              # (B, T)
        pos = (mask.cumsum(-1) - 1 + p).clamp(min=0)                                 # (B, T)
        mask = torch.cat([torch.ones(len(prompts), p, dtype=mask.dtype), mask], 1).to(device)  # (B, p + T)
        logits = model(input_ids=ids.to(device), attention_mask=mask, position_ids=pos.to(device), logits_to_keep=1,
                       **kv).logits[:, -1]                                            # (B, V)
        nxt = pos[:, -1].to(device)                                                   # (B,): last position
        rows = list(range(len(prompts)))                                              # batch row -> prompt
        out: list[list[int]] = [[] for _ in prompts]
        for n in range(max_new_tokens):
            tokens = logits.argmax(-1)                                                # (B,)
            keep = []
            for r, (i, t) in enumerate(zip(rows, tokens.tolist())):
                out[i].append(t)
                if t not in ends:
                    keep.append(r)
            if not keep or n == max_new_tokens - 1:
                break
            if len(keep) < len(rows):                # finished rows leave: their cache, mask and positions
                sel = torch.tensor(keep, device=device)
                cache.batch_select_indices(sel)
                tokens, mask, nxt, rows = tokens[sel], mask[sel], nxt[sel], [rows[r] for r in keep]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
            nxt = nxt + 1
            logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=nxt[:, None],
                           **kv).logits[:, -1]
    return out


def generate_batch(model, tokenizer, conversations: list[list[dict]], gen: GenerateArgs | None = None,
                   batch_size: int = 8, progress=None) -> list[str]:
    """Answer many conversations; returns the answers in input order."""
    import torch

    from keel.batching import pad_batch

    gen = gen or GenerateArgs()
    _seed(gen)
    prompts = [prompt_ids(tokenizer, c) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    device = model_device(model)
    pad = tokenizer.pad_token_id
    own_loop = gen.temperature == 0 and plain_greedy(model)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        if own_loop:
            outs = greedy_batch(model, [prompts[i] for i in idx], gen.max_new_tokens, eos_ids(model, tokenizer), pad)
            for i, new in zip(idx, outs):
                answers[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
        else:
            ids, mask = pad_batch([prompts[i] for i in idx], pad, left=True)  # (B, T): generation continues on the right
            width = ids.shape[1]
            with torch.inference_mode():
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     **sampling_kwargs(tokenizer, gen))
            for row, i in enumerate(idx):
                answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
        if progress is not None:
            progress(len(idx))
    return answers


def stream_answer(model, tokenizer, messages: list[dict], gen: GenerateArgs,
                  stop: threading.Event | None = None, outcome: dict | None = None):
    """Yield the answer as text pieces while it is generated. Setting `stop` ends it early.

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
    ids = torch.tensor([prompt_ids(tokenizer, messages)], device=model_device(model))
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def run():
        try:
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                     stopping_criteria=StoppingCriteriaList([_Stop()]),
                                     **sampling_kwargs(tokenizer, gen))
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
