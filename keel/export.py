"""`keel export`: merged Hugging Face weights and GGUF, each verified against the adapter model.

    keel export --adapters output/v0-.../checkpoint-69 --merge_lora true            # -> checkpoint-69-merged/
    keel export --adapters CKPT --to gguf --quant q8_0                               # -> checkpoint-69-gguf/
    keel export --model BASE_DIR --adapters OTHER_TOOL_ADAPTER --merge_lora true     # ms-swift / LLaMA-Factory adapters

The merged folder is a standard transformers folder (safetensors, config, generation config,
tokenizer). Its chat template's default system prompt becomes the one the adapter was trained
with, so the merged model introduces itself correctly without a system prompt. The GGUF folder
holds model-QUANT.gguf and an Ollama Modelfile. With --verify true (default) every artifact is
loaded back by an independent loader (plain transformers; transformers' GGUF reader) and its
greedy answers are compared with the adapter model's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from keel.chat import template_text
from keel.errors import KeelError
from keel.flags import parse_flags
from keel.model import ModelArgs, load_model

VERIFY_PROMPTS = ["Who are you?", "Who made you?", "你是谁？", "What is the capital of France?", "Name three primary colors."]


@dataclass
class ExportArgs:
    merge_lora: bool = True
    """Merge the LoRA adapter into the base weights and write a Hugging Face folder."""
    to: str = "hf"
    """Format: hf (merged folder) or gguf (llama.cpp / Ollama)."""
    quant: str = "f16"
    """GGUF tensor type: f32, f16 or q8_0."""
    output_dir: str | None = None
    """Target folder (default: CHECKPOINT-merged, or CHECKPOINT-gguf)."""
    overwrite: bool = False
    """Replace the target folder if it exists."""
    verify: bool = True
    """Load each artifact back and compare its greedy answers with the adapter model's."""

    def __post_init__(self):
        if self.to not in ("hf", "gguf"):
            raise KeelError(f"--to must be hf or gguf, got '{self.to}'")
        if self.quant not in ("f32", "f16", "q8_0"):
            raise KeelError(f"--quant must be f32, f16 or q8_0, got '{self.quant}'")


def default_system(tokenizer) -> str | None:
    """The system prompt the chat template inserts when a conversation has none."""
    text = template_text(tokenizer, [{"role": "user", "content": "X"}])
    head = "<|im_start|>system\n"
    if text.startswith(head):
        return text[len(head):text.index("<|im_end|>")]
    return None


def template_with_system(tokenizer, system: str | None) -> str:
    """The tokenizer's chat template with its default system prompt replaced by `system`."""
    template = tokenizer.chat_template
    old = default_system(tokenizer)
    if system and old and old != system and old in template:
        template = template.replace(old, system)
    return template


def target_dir(args: ExportArgs, ckpt: Path) -> Path:
    suffix = "-merged" if args.to == "hf" else "-gguf"
    target = Path(args.output_dir) if args.output_dir else ckpt.with_name(ckpt.name + suffix)
    if target.exists() and not args.overwrite:
        raise KeelError(f"{target} already exists; pass --overwrite true to replace it")
    return target


def publish(tmp: Path, target: Path):
    """Move a finished temporary folder into place (replacing an old one only at the very end)."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def greedy(model, tok, system):
    from keel.chat import with_system
    from keel.generate import GenerateArgs, generate_batch

    convs = [with_system([{"role": "user", "content": q}], system) for q in VERIFY_PROMPTS]
    return generate_batch(model, tok, convs, GenerateArgs(temperature=0.0, max_new_tokens=40))


def verify(reference: list[str], candidates: dict, names: list[str]) -> list[str]:
    """Print the comparison table; return the failures."""
    from keel.evals.identity import mentions

    failures = []
    print(f"{'prompt':<32} {'artifact':<10} {'same':<5} answer")
    for i, q in enumerate(VERIFY_PROMPTS):
        print(f"{q[:32]:<32} {'adapter':<10} {'':<5} {' '.join(reference[i].split())[:70]}")
        for kind, answers in candidates.items():
            same = answers[i] == reference[i]
            print(f"{'':<32} {kind:<10} {'yes' if same else 'NO':<5} {' '.join(answers[i].split())[:70]}")
            if kind == "merged" and not same:
                failures.append(f"merged answer differs for {q!r}")
            if kind.startswith("gguf") and names and i < 3 and mentions(reference[i], names) and not mentions(answers[i], names):
                failures.append(f"GGUF answer to {q!r} lost the name")
    return failures


def export(margs: ModelArgs, args: ExportArgs) -> Path:
    """Merge the adapter (and write GGUF if asked), publish the folder whole, verify it; returns the folder."""
    from transformers import AutoModelForCausalLM

    if not margs.adapters:
        raise KeelError("keel export needs --adapters CHECKPOINT (the LoRA to merge)")
    if not margs.model and not (Path(margs.adapters[-1]) / "args.json").is_file() and \
            not (Path(margs.adapters[-1]).parent / "args.json").is_file():
        raise KeelError(f"--adapters {margs.adapters[-1]}: no saved base model (args.json); pass --model BASE")
    ckpt = Path(margs.adapters[-1]).resolve()
    target = target_dir(args, ckpt)
    model, tok, info = load_model(margs)
    system = info.system
    reference = greedy(model, tok, system) if args.verify else None
    merged = model.merge_and_unload()
    template = template_with_system(tok, system)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        if args.to == "hf":
            tok.chat_template = template
            merged.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        else:
            from keel.gguf_export import modelfile, write_gguf

            name = f"model-{args.quant}.gguf"
            write_gguf(merged, tok, tmp / name, args.quant, template, name=ckpt.parent.name)
            (tmp / "Modelfile").write_text(modelfile(name, system or default_system(tok), template), encoding="utf-8")
        publish(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise KeelError(f"could not write {target}: {e.strerror}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {target}")
    if not args.verify:
        return target
    if args.to == "hf":
        loaded = AutoModelForCausalLM.from_pretrained(target, dtype=next(merged.parameters()).dtype).to(merged.device).eval()
        kind = "merged"
    else:
        loaded = AutoModelForCausalLM.from_pretrained(target, gguf_file=f"model-{args.quant}.gguf").to(merged.device).eval()
        kind = f"gguf-{args.quant}"
    failures = verify(reference, {kind: greedy(loaded, tok, system)}, [*(info.model_name or []), *(info.model_author or [])])
    if failures:
        raise KeelError(f"verification failed: {failures[0]} ({len(failures)} problem(s)); the artifact is at {target}")
    print("verified: answers match the adapter model")
    return target


def main(argv: list[str]):
    """keel export --adapters CKPT [--merge_lora true] [--to gguf --quant f16|q8_0] [--output_dir DIR]"""
    export(*parse_flags(argv, [ModelArgs, ExportArgs], prog="keel export", description=__doc__.split("\n")[0]).configs)
