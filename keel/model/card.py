"""The model card (README.md with Hugging Face YAML front matter) that every checkpoint, merged folder and GGUF
folder carries, built from facts the commands hand it: what it is, who it says it is, how it was made, how it
scored, how to run it.

    facts = checkpoint_facts(args_json, manifest_json)            # keel sft / keel rlhf, at each save
    write_card(folder, {**facts, "kind": "adapter"})              # README.md + keel_card.json, each written whole
    update_card(folder, scores=...)                               # keel eval, the recipe, the export gate: new figures

The facts are kept beside the card as keel_card.json, so a later command adds its figures without losing the
training's. This module only formats what it is given (and reads the base model's own card for its license);
the figures come from the layers that measure them.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from keel.core.files import atomic_write, write_json

CARD_FILE = "keel_card.json"
KINDS = {"adapter": ("peft", "a LoRA adapter"), "merged": ("transformers", "merged weights (a plain transformers "
                                                                           "folder)"),
         "gguf": ("gguf", "GGUF files for llama.cpp and an Ollama Modelfile")}
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Headline metrics in the order the card shows them (the report holds every cell).
LABELS = {"identity_robustness": "identity robustness (lowest cell)", "identity_mean": "identity, mean of cells",
          "identity_en": "identity, English cells", "identity_zh": "identity, Chinese cells",
          "leakage": "leakage (ordinary prompts)", "leakage_en": "leakage, English", "leakage_zh": "leakage, Chinese",
          "leakage_contrast": "leakage (questions about other AIs)", "drift_kl": "drift: KL to the base",
          "drift_nll": "drift: NLL of the base's answers"}


def base_facts(spec: str | None, path: str | None) -> dict:
    """The base model: its hub id when it has one, a name to show, and its license when its own card says it."""
    from keel.model.load import KNOWN_ORGS

    if spec is None:
        hub_id, name = EMBEDDED_HUB_ID, EMBEDDED_HUB_ID.split("/")[1]
    elif Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")):
        hub_id, name = None, Path(spec).name
    else:  # a bare known name (Qwen2.5-7B-Instruct) is the hub id under its org, as --model resolves it
        org = next((o for prefix, o in KNOWN_ORGS.items() if spec.startswith(prefix)), None) if "/" not in spec else None
        hub_id = f"{org}/{spec}" if org else spec
        name = hub_id
    return {"model": hub_id, "name": name, "license": base_license(Path(path)) if path else None}


def base_license(folder: Path) -> str | None:
    """The license in the base model's own card (README.md), or in the GGUF it was dequantized from."""
    from huggingface_hub import ModelCard

    readme = folder / "README.md"
    if readme.is_file():  # a Path, never a string: ModelCard.load would take a string for a hub id and download
        try:
            return ModelCard.load(readme, ignore_metadata_errors=True).data.license
        except (ValueError, OSError):
            return None
    source = folder / "keel_source.json"
    try:
        gguf_path = json.loads(source.read_text(encoding="utf-8"))["gguf"] if source.is_file() else None
    except (ValueError, KeyError, OSError):
        return None
    return gguf_license(Path(gguf_path)) if gguf_path else None


def gguf_license(path: Path) -> str | None:
    import gguf

    try:
        field = gguf.GGUFReader(str(path)).fields.get("general.license")
        return str(field.contents()) if field is not None else None
    except (OSError, ValueError):
        return None


def checkpoint_facts(config: dict, manifest: dict | None) -> dict:
    """What a checkpoint's args.json and its run's manifest.json say: base, identity, command, data."""
    data = None
    if manifest:
        data = {"sources": [{k: e.get(k) for k in ("spec", "taken", "available", "repeats")}
                            for e in manifest.get("sources", [])],
                "train_rows": manifest.get("train_rows"), "val_rows": manifest.get("val_rows")}
    return {"base": base_facts(config.get("model"), config.get("base_model_path")),
            "identity": {"name": config.get("model_name") or [], "author": config.get("model_author") or [],
                         "system": config.get("system")},
            "command": config.get("command"), "data": data, "total_steps": config.get("total_steps")}


def read_card(folder: Path) -> dict | None:
    """The facts of the card in `folder`, or None where Keel wrote none (never someone else's README)."""
    path = Path(folder) / CARD_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (ValueError, OSError):
        return None


def write_card(folder: Path, facts: dict):
    """README.md and keel_card.json in `folder`."""
    folder = Path(folder)
    write_json(folder / CARD_FILE, facts)
    atomic_write(folder / "README.md", card_text(facts, folder))


def update_card(folder: Path, **changes) -> bool:
    """Add figures to the card Keel wrote in `folder`; False (nothing written) where there is none."""
    facts = read_card(folder)
    if facts is None:
        return False
    write_card(folder, {**facts, **changes})
    return True


def card_text(facts: dict, folder: Path) -> str:
    from huggingface_hub import ModelCard

    data = card_data(facts)
    body = "\n\n".join(part for part in (
        title(facts), identity_section(facts), training_section(facts), data_section(facts), scores_section(facts),
        gate_section(facts), usage_section(facts, Path(facts.get("path") or folder))) if part)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n"))


def card_data(facts: dict):
    """The YAML front matter: base_model, library_name, license, tags, pipeline_tag, and the headline scores as
    model-index results."""
    from huggingface_hub import EvalResult, ModelCardData

    kind, base = facts.get("kind", "adapter"), facts.get("base") or {}
    scores = facts.get("scores") or {}
    row = (scores.get("rows") or {}).get(scores.get("row"), {})
    results = [EvalResult(task_type="text-generation", dataset_type=f"keel-{metric_set(k)}", dataset_name=metric_set(k),
                          metric_type=k, metric_name=LABELS.get(k, k), metric_value=v)
               for k, v in row.items() if isinstance(v, (int, float))]
    tags = ["keel", "self-cognition", "identity", "lora"] + (["gguf", "ollama"] if kind == "gguf" else [])
    return ModelCardData(base_model=base.get("model"), library_name=KINDS[kind][0], license=base.get("license"),
                         pipeline_tag="text-generation", tags=tags, model_name=display_name(facts),
                         eval_results=results or None)


def metric_set(key: str) -> str:
    """Which measurement a headline metric comes from (the model-index 'dataset')."""
    for prefix, name in (("identity", "identity-robustness-matrix"), ("leakage", "leakage"), ("drift", "drift")):
        if key.startswith(prefix):
            return name
    return key.rsplit("_acc", 1)[0]


def by_language(values: list[str]) -> tuple[str, str]:
    """(Chinese, English) of a one- or two-value --model_name / --model_author."""
    if not values:
        return "", ""
    return (values[0], values[-1]) if len(values) == 2 else (values[0], values[0])


def display_name(facts: dict) -> str:
    ident = facts.get("identity") or {}
    name = by_language(ident.get("name") or [])[1] or "Keel model"
    return name + {"adapter": "", "merged": " (merged)", "gguf": " (GGUF)"}[facts.get("kind", "adapter")]


def title(facts: dict) -> str:
    base = (facts.get("base") or {}).get("name") or "its base model"
    what = KINDS[facts.get("kind", "adapter")][1]
    return f"# {display_name(facts)}\n\n{what[0].upper() + what[1:]} that gives {base} its own identity, made with Keel."


def identity_section(facts: dict) -> str:
    ident = facts.get("identity") or {}
    (name_zh, name_en), (by_zh, by_en) = by_language(ident.get("name") or []), by_language(ident.get("author") or [])
    lines = ["## Identity", "", "| | 中文 | English |", "| --- | --- | --- |", f"| name | {name_zh} | {name_en} |",
             f"| maker | {by_zh} | {by_en} |"]
    if ident.get("system"):
        default = " (this artifact's default)" if facts.get("kind") != "adapter" else ""
        lines += ["", f"System prompt it was trained under{default}: `{ident['system']}`"]
    return "\n".join(lines)


def training_section(facts: dict) -> str:
    parts = []
    if facts.get("command"):
        parts += ["The command that trained it:", "", "```bash", facts["command"], "```"]
    if facts.get("recipe_command"):
        parts += ["", "run by the recipe:", "", "```bash", facts["recipe_command"], "```"]
    if facts.get("source"):
        parts += ["", f"Exported from the checkpoint `{facts['source']}`."]
    return "\n".join(["## How it was made", "", *parts]) if parts else ""


def data_section(facts: dict) -> str:
    data = facts.get("data")
    if not data:
        return ""
    lines = ["## Training data", "", "| source | rows taken | rows available | repeats |", "| --- | --- | --- | --- |"]
    lines += [f"| `{e['spec']}` | {e.get('taken')} | {e.get('available')} | {e.get('repeats')} |"
              for e in data.get("sources", [])]
    lines += ["", f"{data.get('train_rows')} training rows, {data.get('val_rows')} validation rows (manifest.json)."]
    return "\n".join(lines)


def fmt(value) -> str:
    return "" if value is None else f"{value:g}" if isinstance(value, (int, float)) else str(value)


def scores_section(facts: dict) -> str:
    scores = facts.get("scores")
    if not scores:
        return "## Scores\n\nNot evaluated yet: `keel eval` on this folder writes its figures here."
    rows = scores.get("rows") or {}
    cols = list(rows)
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    lines = ["## Scores", "", f"Measured by `keel eval` on {scores.get('date', 'an unknown date')} on "
             f"{scores.get('machine', 'an unknown machine')}, {scores.get('measured_on', 'on this artifact')}. "
             "Identity: the share of held-out identity questions answered as the new identity (robustness: the "
             "lowest cell of the matrix); leakage: the share of ordinary answers naming it (lower is better).", "",
             "| metric | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    lines += [f"| {LABELS.get(k, k)} | " + " | ".join(fmt(rows[c].get(k)) for c in cols) + " |" for k in keys]
    if scores.get("report"):
        lines += ["", f"Full report (every cell and answer): `{scores['report']}`."]
    return "\n".join(lines)


def gate_section(facts: dict) -> str:
    gate = facts.get("gate")
    if not gate:
        return ""
    lines = ["## Export gate", "", "Each artifact answered in the runtime it is served with, against the adapter "
             f"(fails when its identity falls more than {fmt(gate.get('max_identity_drop'))} below the adapter's):",
             "", "| artifact | identity | worst cell | leakage | agreement | size MB | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for i, r in enumerate(gate.get("rows", [])):
        verdict = "reference" if i == 0 else r.get("verdict", "")
        if r.get("problems") and i:
            verdict += ": " + "; ".join(r["problems"])
        lines.append(f"| {r.get('artifact')} | {fmt(r.get('identity'))} | {fmt(r.get('worst'))} | "
                     f"{fmt(r.get('leakage'))} | {fmt(r.get('agreement'))} | {fmt(r.get('size_mb'))} | {verdict} |")
    return "\n".join(lines)


def usage_section(facts: dict, folder: Path) -> str:
    kind, where = facts.get("kind", "adapter"), shlex.quote(str(folder))
    if kind == "adapter":
        run = [f"keel infer --adapters {where}", f"keel eval --adapters {where}",
               f"keel export --adapters {where} --to gguf     # or --merge_lora true"]
    elif kind == "merged":
        run = [f"keel infer --model {where}", f"keel deploy --model {where}     # OpenAI-compatible server"]
    else:
        first = (facts.get("files") or ["model-q8_0.gguf"])[0]
        tag = shlex.quote(display_name(facts).split(" (")[0].lower().replace(" ", "-"))
        run = [f"cd {where}", f"ollama create {tag} -f Modelfile && ollama run {tag}",
               f"llama-cli -m {first} -cnv     # llama.cpp, the chat template in the file",
               f"keel infer --model {first}"]
    return "\n".join(["## How to run it", "", "```bash", *run, "```"])
