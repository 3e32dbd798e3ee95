"""`keel infer`: chat with a model, answer one query, or answer a JSONL file.

    keel infer                                   # interactive chat with the embedded model
    keel infer --adapters output/v0-.../checkpoint-150 --stream true --temperature 0
    keel infer --query "Who are you?"           # prints only the answer
    keel infer --input_file in.jsonl --output_file out.jsonl

In the chat: /clear resets the conversation, /exit or Ctrl-D leaves, Ctrl-C stops the answer
being written (not the program). The system prompt defaults to the one the adapter was
trained with, else the chat template's own default. A prompt that leaves no room for
--max_new_tokens in the model's context is refused with its row (--truncation_strategy delete,
before anything is answered) or cut from its start (left).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from keel.core.errors import KeelError
from keel.core.flags import note_once, parse_flags
from keel.model.generate import GenerateArgs, context_length, generate_batch, stream_answer
from keel.model.load import ModelArgs, load_model
from keel.model.template import prompt_ids, with_system

PRESETS = {"identity": 0.0, "code": 0.3, "creative": 0.8}


@dataclass
class InferArgs:
    query: str | None = None
    """Answer this one question, print only the answer, and exit."""
    input_file: str | None = None
    """Answer every row of this JSONL file (rows with 'query' or 'messages')."""
    output_file: str | None = None
    """Where batch answers go, one JSON row each, written as they finish (default: INPUT.answers.jsonl)."""
    system: str | None = None
    """System prompt. Default: the adapter's training system prompt, else the template's default."""
    stream: bool = True
    """Print answers token by token as they are generated."""
    preset: str | None = None
    """Temperature preset: identity (0), code (0.3) or creative (0.8). An explicit --temperature wins."""
    batch_size: int = 8
    """Rows answered together in --input_file mode."""
    truncation_strategy: str = "delete"
    """A prompt too long for the model's context with --max_new_tokens: delete refuses it, naming its row, before anything is answered; left cuts its start to fit (said on stderr)."""

    def __post_init__(self):
        if self.preset is not None and self.preset not in PRESETS:
            raise KeelError(f"--preset: '{self.preset}' is not one of {', '.join(PRESETS)}")
        if self.input_file is not None and not Path(self.input_file).is_file():
            raise KeelError(f"--input_file: '{self.input_file}' does not exist")
        if self.output_file is not None and self.input_file is None:
            raise KeelError("--output_file needs --input_file")
        if self.batch_size < 1:
            raise KeelError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.truncation_strategy not in ("delete", "left"):
            raise KeelError(f"--truncation_strategy must be delete or left, got '{self.truncation_strategy}' "
                            "(right would cut the question's end and the assistant's turn)")


def read_queries(path: str) -> tuple[list[list[dict]], list[int]]:
    """Read a JSONL of {"query": str} or {"messages": [...]} rows into conversations, with their line numbers."""
    from keel.data.formats import parse_jsonl, read_text

    convs, lines = [], []
    for n, row in parse_jsonl(read_text(path), path):
        if isinstance(row, dict) and isinstance(row.get("query"), str):
            convs.append([{"role": "user", "content": row["query"]}])
        elif isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
            msgs = row["messages"]
            if not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role")
                       in ("system", "user", "assistant") for m in msgs):
                raise KeelError(f"{path}: line {n}: field 'messages' needs role/content objects")
            if msgs[-1]["role"] == "assistant":  # answer the conversation up to its last question
                msgs = msgs[:-1]
            convs.append(msgs)
        else:
            raise KeelError(f"{path}: line {n}: needs a field 'query' (string) or 'messages' (list)")
        lines.append(n)
    if not convs:
        raise KeelError(f"{path}: no rows to answer")
    return convs, lines


class Fit:
    """Whether prompts fit the model's context with --max_new_tokens, per --truncation_strategy."""

    def __init__(self, model, tok, gen: GenerateArgs, strategy: str):
        self.tok, self.gen, self.strategy = tok, gen, strategy
        self.context = context_length(model, tok)
        self.limit = self.context - gen.max_new_tokens  # the most prompt tokens that leave room for the answer
        if self.limit < 1:  # a tutorial's 2048 on a small-context model: prompts keep half the context
            note_once(f"--max_new_tokens {gen.max_new_tokens} is the model's whole context of {self.context} tokens "
                      f"or more: prompts may use {self.context // 2} tokens, and a longer answer runs past the context")
            self.limit = self.context // 2
        try:  # a token spans at most this many characters: a far longer text is over the limit untokenized
            self.longest = max(len(t) for t in tok.get_vocab()) or None
        except (AttributeError, NotImplementedError, TypeError, ValueError):
            self.longest = None

    def tokens(self, messages: list[dict]) -> tuple[int, bool]:
        """(the prompt's tokens, exact); a huge text gets a lower bound above the limit, never tokenized whole."""
        chars = sum(len(m["content"]) for m in messages)
        if self.longest and chars > (self.limit + 1) * self.longest:
            return chars // self.longest, False
        return len(prompt_ids(self.tok, messages)), True

    def check(self, messages: list[dict], where: str) -> list[dict]:
        """The messages to answer: as they are when they fit; else refused (delete) or cut at their start (left)."""
        n, exact = self.tokens(messages)
        if n <= self.limit:
            return messages
        size = f"{n} tokens" if exact else f"at least {n} tokens"
        if self.strategy == "delete":
            raise KeelError(f"{where}: the prompt is {size}; with --max_new_tokens {self.gen.max_new_tokens} it does "
                            f"not fit the model's context of {self.context} (at most {self.limit} prompt tokens): "
                            "shorten it, or --truncation_strategy left cuts its start")
        print(f"{where}: the prompt is {size}: cut to its last {self.limit} (--truncation_strategy left)",
              file=sys.stderr)
        return clip_start(messages, (self.limit + 1) * self.longest) if self.longest else messages


def clip_start(messages: list[dict], chars: int) -> list[dict]:
    """The conversation's last `chars` characters of message text: earlier messages dropped, the first one kept
    cut at its start (the ids are cut to the limit afterwards; this only spares tokenizing a huge text)."""
    out = []
    for m in reversed(messages):
        if chars <= 0:
            break
        out.append({**m, "content": m["content"][-chars:]})
        chars -= len(m["content"])
    return out[::-1]


def drop_torn_tail(path: Path) -> bool:
    """Cut a last line that has no newline (a kill mid-write), so appended rows start on a line of their own."""
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return False
        f.truncate(data.rfind(b"\n") + 1)
    return True


def run_batch(model, tok, args: InferArgs, gen: GenerateArgs, system: str | None):
    convs, lines = read_queries(args.input_file)
    out_path = Path(args.output_file or Path(args.input_file).with_suffix(".answers.jsonl"))
    done = set()
    if out_path.is_file():  # resume: rows already answered are kept, not redone
        if drop_torn_tail(out_path):
            print(f"{out_path}: dropped a torn last line left by an interrupted run (its row is answered again)",
                  file=sys.stderr)
        for line in out_path.read_text(encoding="utf-8").splitlines():
            try:
                done.add(json.loads(line)["index"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    todo = [i for i in range(len(convs)) if i not in done]
    fit = Fit(model, tok, gen, args.truncation_strategy)
    prompts = {i: fit.check(with_system(convs[i], system), f"{args.input_file}: line {lines[i]}") for i in todo}
    with open(out_path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), args.batch_size):
            idx = todo[start:start + args.batch_size]
            batch = [prompts[i] for i in idx]
            for i, ans in zip(idx, generate_batch(model, tok, batch, gen, batch_size=len(idx), max_prompt_tokens=fit.limit)):
                f.write(json.dumps({"index": i, "messages": convs[i], "response": ans}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            print(f"answered {len(done) + start + len(idx)}/{len(convs)}", file=sys.stderr)
    print(f"wrote {out_path}", file=sys.stderr)


def say(model, tok, msgs: list[dict], gen: GenerateArgs, args: InferArgs, limit: int, pieces: list,
        stop: threading.Event | None = None):
    """Print the answer, streamed or whole, collecting it in `pieces` (kept when Ctrl-C stops it)."""
    if args.stream:
        for piece in stream_answer(model, tok, msgs, gen, stop, max_prompt_tokens=limit):
            pieces.append(piece)
            print(piece, end="", flush=True)
    else:
        pieces.append(generate_batch(model, tok, [msgs], gen, max_prompt_tokens=limit)[0])
        print(pieces[0], end="")


def chat_loop(model, tok, args: InferArgs, gen: GenerateArgs, system: str | None):
    print("keel chat: /clear resets, /exit or Ctrl-D leaves, Ctrl-C stops an answer.", file=sys.stderr)
    fit = Fit(model, tok, gen, args.truncation_strategy)
    history: list[dict] = []
    while True:
        try:
            text = input("<<< ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        if text.strip() in ("/exit", "/quit"):
            return
        if text.strip() == "/clear":
            history = []
            print("(conversation cleared)")
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        try:
            msgs = fit.check(with_system(history, system), "this conversation")
        except KeelError as e:
            print(f"keel: {e} (/clear starts a new conversation)", file=sys.stderr)
            history.pop()
            continue
        stop, pieces = threading.Event(), []
        print(">>> ", end="", flush=True)
        try:
            say(model, tok, msgs, gen, args, fit.limit, pieces, stop)
        except KeyboardInterrupt:
            stop.set()
            print(" [stopped]", end="")
        print()
        history.append({"role": "assistant", "content": "".join(pieces).strip()})


def infer(margs: ModelArgs, args: InferArgs, gen: GenerateArgs):
    """Answer --query, answer --input_file, or chat."""
    if args.input_file:
        read_queries(args.input_file)  # fail on a bad row before the model is loaded
    model, tok, info = load_model(margs)
    system = args.system if args.system is not None else info.system
    if args.query is not None:
        fit = Fit(model, tok, gen, args.truncation_strategy)
        msgs = fit.check(with_system([{"role": "user", "content": args.query}], system), "--query")
        say(model, tok, msgs, gen, args, fit.limit, [])
        print()
    elif args.input_file:
        run_batch(model, tok, args, gen, system)
    else:
        chat_loop(model, tok, args, gen, system)


CONFIGS = (ModelArgs, InferArgs, GenerateArgs)


def main(argv: list[str]):
    parsed = parse_flags(argv, CONFIGS, prog="keel infer", description=__doc__)
    margs, args, gen = parsed.configs
    if args.preset and "temperature" not in parsed.given:
        gen.temperature = PRESETS[args.preset]  # a preset sets the temperature unless the flag is typed
    infer(margs, args, gen)
