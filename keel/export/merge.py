"""The export's files: the merged Hugging Face folder, or the GGUF files and the Ollama Modelfile, built in a
hidden temporary folder beside the target and renamed into place whole.

    target = target_dir(args, ckpt)                       # KeelError if it exists and --overwrite is false
    write_artifacts(merged, tok, target, args, template, modelfile_text, name)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from keel.core.errors import KeelError
from keel.core.files import share_files, temp_dir


def target_dir(args, ckpt: Path) -> Path:
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


def write_ggufs(merged, tok, tmp: Path, quants: list[str], template: str, name: str):
    """One GGUF per type in `tmp`: q8_0/f16/f32 from the weights, k-quants from an f16 file by llama.cpp."""
    from keel.export.gguf import K_QUANTS, quantize_gguf, write_gguf

    for q in quants:
        if q not in K_QUANTS:
            write_gguf(merged, tok, tmp / f"model-{q}.gguf", q, template, name=name)
    k = [q for q in quants if q in K_QUANTS]
    if k:
        f16 = tmp / "model-f16.gguf"
        if not f16.exists():
            write_gguf(merged, tok, f16, "f16", template, name=name)
        for q in k:
            quantize_gguf(f16, tmp / f"model-{q}.gguf", q)
        if "f16" not in quants:
            f16.unlink()


def write_merged(merged, tok, folder: Path, template: str):
    """A standard transformers folder: safetensors, config, generation config, tokenizer with `template`."""
    tok.chat_template = template
    merged.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


def write_artifacts(merged, tok, target: Path, args, template: str, modelfile: str | None, name: str) -> Path:
    """The merged folder (--to hf) or the GGUFs and Modelfile (--to gguf) at `target`, whole or not at all."""
    tmp = temp_dir(target.parent, f".{target.name}-")
    try:
        if args.to == "hf":
            write_merged(merged, tok, tmp, template)
        else:
            write_ggufs(merged, tok, tmp, args.quant, template, name)
            (tmp / "Modelfile").write_text(modelfile, encoding="utf-8")
        share_files(tmp)
        publish(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise KeelError(f"could not write {target}: {e.strerror}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
