"""`keel export`: merged Hugging Face weights and GGUF, each verified against the adapter model.

    keel export --adapters output/v0-.../checkpoint-69 --merge_lora true            # -> checkpoint-69-merged/
    keel export --adapters CKPT --to gguf                                            # -> checkpoint-69-gguf/ (q8_0)
    keel export --adapters CKPT --to gguf --quant q4_k_m q8_0 --max_identity_drop 0.05  # one GGUF per type
    keel export --model BASE_DIR --adapters OTHER_TOOL_ADAPTER --merge_lora true     # ms-swift / LLaMA-Factory adapters

The merged folder is a standard transformers folder (safetensors, config, generation config,
tokenizer). Its chat template's default system prompt becomes the one the adapter was trained
with, so the merged model introduces itself correctly without a system prompt. The GGUF folder
holds model-QUANT.gguf per --quant (q8_0/f16/f32 written by the gguf library, q4_k_m/q5_k_m by
llama.cpp's own quantizer from an f16 file) and an Ollama Modelfile generated from the chat template.
With --verify true (default) every artifact goes through the identity gate (keel/export/verify.py):
the merged folder loaded back by transformers, each GGUF run by llama.cpp with the chat template in
its own metadata; one table, and exit 2 when an artifact's identity fell more than
--max_identity_drop below the adapter's (the artifact stays, marked FAILED in gate.json).
Every exported folder gets a model card (README.md with Hugging Face metadata): the checkpoint's identity,
training command, data and scores, the gate's table, and how to run it (keel/model/card.py).
GGUF steps that run llama.cpp need the extra: pip install -e ".[gguf]".
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from keel.core.errors import KeelError
from keel.core.flags import parse_flags
from keel.export.merge import target_dir, write_artifacts
from keel.model.load import ModelArgs, load_model
from keel.model.template import default_system


@dataclass
class ExportArgs:
    merge_lora: bool = True
    """Merge the LoRA adapter into the base weights and write a Hugging Face folder."""
    to: str = "hf"
    """Format: hf (merged folder) or gguf (llama.cpp / Ollama)."""
    # Not q4_k_m, Ollama's usual pick: on the embedded SmolLM2-135M it failed the gate (docs/export.md).
    quant: list[str] = field(default_factory=lambda: ["q8_0"])
    """GGUF tensor types, one file each: q8_0, f16, f32, or q4_k_m, q5_k_m (llama.cpp's quantizer)."""
    output_dir: str | None = None
    """Target folder (default: CHECKPOINT-merged, or CHECKPOINT-gguf)."""
    overwrite: bool = False
    """Replace the target folder if it exists."""
    verify: bool = True
    """Run the identity gate on every artifact (GGUF files answer through llama.cpp); false skips it."""
    max_identity_drop: float = 0.05
    """The gate fails an artifact whose identity score is more than this below the adapter's."""

    def __post_init__(self):
        from keel.export.gguf import QUANTS

        if self.to not in ("hf", "gguf"):
            raise KeelError(f"--to must be hf or gguf, got '{self.to}'")
        if isinstance(self.quant, str):
            self.quant = [self.quant]
        bad = [q for q in self.quant if q not in QUANTS]
        if bad or not self.quant:
            raise KeelError(f"--quant: '{bad[0] if bad else ''}' is not a GGUF type Keel writes ({', '.join(QUANTS)})")
        self.quant = list(dict.fromkeys(self.quant))
        if not 0 <= self.max_identity_drop <= 1:
            raise KeelError(f"--max_identity_drop must be in [0, 1], got {self.max_identity_drop}")


def template_with_system(tokenizer, system: str | None) -> str:
    """The tokenizer's chat template with its default system prompt replaced by `system`."""
    template = tokenizer.chat_template
    old = default_system(tokenizer)
    if system and old and old != system and old in template:
        template = template.replace(old, system)
    return template


def gate_rows(gate, args: ExportArgs, target: Path, tok, dtype, device) -> list:
    """Load every artifact in `target` back the way users run it and score it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from keel.export.verify import modelfile_mismatch, prompt_mismatch

    rows = []
    if args.to == "hf":
        start = time.perf_counter()
        loaded = AutoModelForCausalLM.from_pretrained(target, dtype=dtype).to(device).eval()
        ltok = AutoTokenizer.from_pretrained(target)
        if ltok.pad_token_id is None:
            ltok.pad_token = ltok.eos_token
        rows.append(gate.score("merged", loaded, ltok, target, time.perf_counter() - start,
                               [prompt_mismatch(ltok, tok)]))
        return rows
    from keel.model.llama_backend import load_gguf

    for i, q in enumerate(args.quant):
        path = target / f"model-{q}.gguf"
        start = time.perf_counter()
        model, gtok, _ = load_gguf(path)
        load_s = time.perf_counter() - start
        checks = [prompt_mismatch(gtok, tok)]
        if i == 0:  # the Modelfile points at the first GGUF
            checks.append(modelfile_mismatch(target / "Modelfile", tok))
        rows.append(gate.score(f"gguf-{q}", model, gtok, path, load_s, checks))
        del model, gtok
    return rows


def check_inputs(margs: ModelArgs, args: ExportArgs) -> tuple[Path, Path]:
    """(checkpoint, target folder), or a KeelError before minutes of loading and scoring."""
    if not margs.adapters:
        raise KeelError("keel export needs --adapters CHECKPOINT (the LoRA to merge)")
    if not margs.model and not (Path(margs.adapters[-1]) / "args.json").is_file() and \
            not (Path(margs.adapters[-1]).parent / "args.json").is_file():
        raise KeelError(f"--adapters {margs.adapters[-1]}: no saved base model (args.json); pass --model BASE")
    ckpt = Path(margs.adapters[-1]).resolve()
    target = target_dir(args, ckpt)
    if args.to == "gguf":
        from keel.export.gguf import K_QUANTS
        from keel.model.llama_backend import require_llama_cpp

        if args.verify or any(q in K_QUANTS for q in args.quant):
            require_llama_cpp()
    return ckpt, target


def reference_gate(args: ExportArgs, model, tok, info, ckpt: Path, load_s: float, template: str):
    """(the gate, its first row: the adapter answering under the template the artifacts get), or (None, None)."""
    from keel.evals.scoring import Identity
    from keel.export.verify import Gate

    if not args.verify:
        return None, None
    names, authors = list(info.model_name or []), list(info.model_author or [])
    if not (names or authors):
        raise KeelError("the export gate needs the identity, and the adapter has no saved model_name/model_author; "
                        "pass --verify false to export without it")
    tok.chat_template = template  # the reference is the adapter under the template the artifacts get
    gate = Gate(Identity(names, authors, info.system), tok)
    print("gate: answering as the adapter (the reference)...", flush=True)
    return gate, gate.score("adapter", model, tok, ckpt, load_s)


def run_gate(gate, rows: list, args: ExportArgs, target: Path, tok, dtype, device) -> tuple[dict, str | None]:
    """Score every artifact against the reference row, print the table, write gate.json; returns gate.json's content
    and, when an artifact failed, the one-line verdict."""
    from keel.core.files import write_json

    rows += gate_rows(gate, args, target, tok, dtype, device)
    failed = gate.judge(rows, args.max_identity_drop)
    print(gate.table(rows))
    record = {"max_identity_drop": args.max_identity_drop, "rows": [
        {k: v for k, v in vars(r).items() if k != "samples"} | {"verdict": "FAILED" if r.problems else "passed"}
        for r in rows]}
    write_json(target / "gate.json", record)
    if failed:
        r = failed[0]
        return record, (f"export gate: {len(failed)} artifact(s) FAILED, {r.artifact}: {r.problems[0]}; "
                        f"left in place at {target} (see gate.json)")
    return record, None


def write_export_card(target: Path, ckpt: Path, args: ExportArgs, info, gate: dict | None):
    """The exported folder's model card: the checkpoint's story (its card, else its args.json and manifest), the
    gate's table, and how to run this artifact."""
    from keel.model.card import base_facts, checkpoint_facts, read_card, write_card
    from keel.model.load import read_adapter_args

    source = read_card(ckpt)
    if source is None:
        manifest = ckpt.parent / "manifest.json"
        source = checkpoint_facts(read_adapter_args(ckpt), json.loads(manifest.read_text(encoding="utf-8"))
                                  if manifest.is_file() else None)
    scores = source.get("scores")
    if scores:
        scores = {**scores, "measured_on": f"on the adapter this was exported from ({ckpt.name}); this artifact's own "
                                          "figures are the export gate's"}
    facts = {**source, "kind": "merged" if args.to == "hf" else "gguf", "path": str(target), "source": str(ckpt),
             "base": base_facts(info.model, info.path), "scores": scores, "gate": gate,
             "identity": {"name": info.model_name or [], "author": info.model_author or [], "system": info.system},
             "files": [f"model-{q}.gguf" for q in args.quant] if args.to == "gguf" else None}
    write_card(target, facts)


def export(margs: ModelArgs, args: ExportArgs) -> Path:
    """Merge the adapter (and write GGUF if asked), publish the folder whole, run the gate, write the model card;
    returns the folder."""
    ckpt, target = check_inputs(margs, args)
    start = time.perf_counter()
    model, tok, info = load_model(margs)
    load_s = time.perf_counter() - start
    template = template_with_system(tok, info.system)
    mf = None
    if args.to == "gguf":
        from keel.export.gguf import modelfile

        mf = modelfile(f"model-{args.quant[0]}.gguf", tok, template, info.system)  # an unsupported family fails now
    gate, reference = reference_gate(args, model, tok, info, ckpt, load_s, template)
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    merged = model.merge_and_unload()
    write_artifacts(merged, tok, target, args, template, mf, ckpt.parent.name)
    print(f"wrote {target}")
    record = error = None
    if args.verify:
        del merged, model
        record, error = run_gate(gate, [reference], args, target, tok, dtype, device)
    write_export_card(target, ckpt, args, info, record)
    if error:
        raise KeelError(error)
    if args.verify:
        print(f"gate: passed (every artifact within {args.max_identity_drop} of the adapter's identity score)")
    return target


CONFIGS = (ModelArgs, ExportArgs)


def main(argv: list[str]):
    """keel export --adapters CKPT [--merge_lora true] [--to gguf --quant q8_0 q4_k_m ...] [--verify true] [--output_dir DIR]"""
    export(*parse_flags(argv, CONFIGS, prog="keel export", description=__doc__.split("\n")[0]).configs)
