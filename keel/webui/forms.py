"""What the web UI's forms send, checked, and turned into the argv the CLI takes.

    ident = identity_of(IdentityForm(...))            # names and authors as --name/--author take them
    rows, kinds = preview_rows(ident, form.system)    # keel data identity's builder, one kind per row
    argv = sft_argv(form, data_file, folder)          # ["sft", "--dataset", ...]: checked by keel sft's own parser

Request bodies are validated as strictly as keel deploy's (keel/serve/api.py `validate`): "abc" is not a
learning rate, 2.5 is not a rank. Values the CLI would refuse are refused with the CLI's own message,
because the argv is parsed by `keel sft`'s parser before a child process starts. Every field is bounded to
what a person would type (a name of a few hundred characters, a system prompt of a few KB) and no text may
hold a NUL byte, so one request cannot hold the UI's CPU or reach a file or process with a broken name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, StringConstraints

from keel.core.errors import KeelError
from keel.serve.api import STRICT, ApiError

# keel recipe identity's fixed settings (keel/recipe.py), logged at every step for the live curves.
RECIPE_FLAGS = ["--warmup_ratio", "0.05", "--save_total_limit", "1", "--logging_steps", "1"]


def no_nul(text: str) -> str:
    if "\0" in text:
        raise ValueError("holds a NUL byte")
    return text


def text(limit: int):
    """A string of at most `limit` characters without NUL bytes."""
    return Annotated[str, StringConstraints(max_length=limit), AfterValidator(no_nul)]


# What a person types: names and makers, a system prompt of a few KB, a path, one turn of a conversation.
NAME, SYSTEM, PATH, TURN, FOLDER = text(200), text(4000), text(1024), text(8000), text(128)
MAX_ROWS, MAX_TURNS = 2000, 32


class IdentityForm(BaseModel):
    model_config = STRICT
    name_zh: NAME = ""
    name_en: NAME = ""
    author_zh: NAME = ""
    author_en: NAME = ""
    system: SYSTEM = "You are a helpful assistant."
    model: PATH = ""


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "user", "assistant"]
    content: TURN
    loss: bool | None = None


class Row(BaseModel):
    model_config = STRICT
    messages: list[Message] = Field(min_length=1, max_length=MAX_TURNS)


class CheckForm(IdentityForm):
    rows: list[Row] = Field(min_length=1, max_length=MAX_ROWS)


class RunForm(IdentityForm):
    folder: FOLDER = ""
    rows: list[Row] | None = Field(None, max_length=MAX_ROWS)
    general: PATH | None = None  # None: the recipe's ballast#N
    # None here and below: the recipe's or keel sft's default
    num_train_epochs: float | None = Field(None, gt=0, le=1000)
    learning_rate: float | None = Field(None, gt=0, le=1)
    lora_rank: int | None = Field(None, ge=1, le=1024)
    max_length: int | None = Field(None, ge=8, le=1 << 17)
    probes: bool = True
    eval_steps: int = Field(10, ge=1, le=1_000_000)


def form_defaults(model: str | None = None) -> dict:
    """The form's defaults: keel recipe identity's settings for this machine (CPU or GPU) and model (None: the
    embedded one), keel sft's for the rest."""
    from keel.data.mix import DataArgs
    from keel.model.load import pick_device_dtype
    from keel.model.lora import LoraArgs
    from keel.recipes.identity import recipe_defaults as settings

    d = settings(pick_device_dtype()[0].type, model)
    return {"general": f"ballast#{d['ballast']}", "num_train_epochs": float(d["num_train_epochs"]),
            "learning_rate": d["learning_rate"], "gradient_accumulation_steps": d["gradient_accumulation_steps"],
            "ballast_loss": d["ballast_loss"],
            "lora_rank": LoraArgs().lora_rank, "max_length": DataArgs().max_length, "probes": True, "eval_steps": 10}


def with_defaults(form: RunForm) -> tuple[RunForm, dict]:
    """The form with its empty fields set to the defaults, and the recipe's settings the form does not show
    (keel sft flags: gradient accumulation, how ballast is learned)."""
    d = form_defaults(form.model.strip() or None)
    filled = form.model_copy(update={k: d[k] for k in ("general", "num_train_epochs", "learning_rate", "lora_rank",
                                                       "max_length") if getattr(form, k) is None})
    return filled, {k: d[k] for k in ("gradient_accumulation_steps", "ballast_loss")}


def identity_of(form: IdentityForm) -> tuple[list[str], list[str]]:
    """(names, authors): one value or (Chinese, English), as `--name`/`--author` take them."""
    names = [v.strip() for v in (form.name_zh, form.name_en) if v.strip()]
    authors = [v.strip() for v in (form.author_zh, form.author_en) if v.strip()]
    if not names:
        raise ApiError(400, "name: give the new name (Chinese, English or both); it is empty or only spaces", "name_en")
    if not authors:
        raise ApiError(400, "author: give the maker (Chinese, English or both); it is empty or only spaces", "author_en")
    if not form.system.strip():
        raise ApiError(400, "system: the training system prompt is empty", "system")
    return names, authors


def check_model(model: str) -> str | None:
    """The --model to pass (None: the embedded model); a path that does not exist is a 400."""
    if not model.strip():
        return None
    from keel.model.load import resolve_model_path

    if not Path(model).expanduser().exists():
        raise ApiError(400, f"model: '{model}' does not exist (give a local model folder or .gguf file, "
                       "or leave it empty for the embedded model)", "model")
    try:
        resolve_model_path(model)  # a folder without config.json, a file that is not .gguf
    except KeelError as e:
        raise ApiError(400, f"model: {str(e).removeprefix('--model: ')}", "model") from None
    return model


def preview_rows(names: list[str], authors: list[str], system: str) -> tuple[list[dict], list[str]]:
    """The rows `keel data identity --name ... --author ... --system ...` writes, with each row's kind."""
    from keel.data.identity import Builder, IdentityArgs

    try:
        rows, tags = Builder(IdentityArgs(name=names, author=authors, system=system)).build()
    except KeelError as e:
        raise ApiError(400, str(e)) from None
    return rows, [t["kind"] for t in tags]


def row_dicts(rows: list[Row]) -> list[dict]:
    return [{"messages": [m.model_dump(exclude_none=True) for m in r.messages]} for r in rows]


def findings(path: Path, names: list[str], authors: list[str], system: str, tokenizer, max_length: int) -> list[dict]:
    """`keel data check`'s problems for a rows file, each with its row number when it names one."""
    from keel.data.check import CheckArgs, check_file

    args = CheckArgs(files=[str(path)], model_name=names, model_author=authors, system=system, max_length=max_length)
    problems, stats = check_file(str(path), args, tokenizer)
    out = []
    for p in problems:
        row = p.split(": row ", 1)[1].split(":", 1)[0] if ": row " in p else ""
        out.append({"row": int(row) if row.isdigit() else None, "message": p.replace(str(path) + ": ", "")})
    if stats.get("over_max_length"):
        out.append({"row": None, "message": f"{stats['over_max_length']} row(s) longer than max_length {max_length} tokens"})
    return out


def check_general(spec: str, allowed: list[Path]) -> list[str]:
    """The general-data dataset specs: ballast#N, a hub id, a local file (with #N / #N%) inside `allowed` (links
    followed: 403 otherwise), or nothing. Local files are given by their resolved path."""
    from keel.data.mix import parse_spec, resolve_source

    specs = []
    for s in spec.split():
        try:
            source, _, _ = parse_spec(s)
            if source != "ballast":
                local = Path(source).expanduser().is_file()
                path = resolve_source(source, None)
                if local:
                    path = path.resolve()
                    if not any(path.is_relative_to(folder) for folder in allowed):
                        raise ApiError(403, f"general data: '{source}' is outside the output folders and the "
                                       "data folders this UI may read (keel web-ui --allow_data_dir)", "general",
                                       "outside_allowed_folders")
                    s = str(path) + s[len(source):]
        except KeelError as e:
            raise ApiError(400, f"general data: {str(e).removeprefix('--dataset ')}", "general") from None
        specs.append(s)
    return specs


def sft_argv(form: RunForm, names, authors, model: str | None, data_file: Path, general: list[str],
             folder: Path, fixed: dict) -> list[str]:
    """`keel sft` flags for this form (the recipe's settings, the few flags the form changes)."""
    from keel.train.sft import parse_args

    argv = ["--dataset", str(data_file), *general, "--model_name", *names, "--model_author", *authors,
            "--system", form.system, "--output_dir", str(folder), "--num_train_epochs", repr(form.num_train_epochs),
            "--learning_rate", repr(form.learning_rate), "--lora_rank", str(form.lora_rank),
            "--max_length", str(form.max_length), *(x for k, v in fixed.items() for x in (f"--{k}", str(v))),
            *RECIPE_FLAGS,
            # The probes run at each eval, and an eval needs held-out rows.
            "--eval_identity", "true" if form.probes else "false",
            "--split_dataset_ratio", "0.05" if form.probes else "0", "--eval_steps", str(form.eval_steps)]
    if model:
        argv = ["--model", model, *argv]
    try:
        parse_args(argv)  # keel sft's own checks, before anything is written or started
    except KeelError as e:
        raise ApiError(400, str(e)) from None
    return ["sft", *argv]


def run_folder(folder: str, root: Path) -> Path:
    """ROOT/FOLDER for a new run: a plain relative name that stays inside the root, links followed."""
    name = folder.strip()
    if not name:
        raise ApiError(400, "folder: give the run a folder name", "folder")
    if Path(name).is_absolute() or ".." in Path(name).parts or name.startswith("."):
        raise ApiError(400, f"folder: '{folder}' must be a plain name inside {root}", "folder")
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise ApiError(403, f"folder: '{folder}' leads outside {root} (a link)", "folder", "outside_output_folders")
    return path


def estimate(model_path: str, rows: list[dict], general: list[str], form: RunForm, tokenizer, roots) -> dict:
    """Tokens per epoch (counted with the model's tokenizer) and, from the newest earlier run of the same
    model under the roots, its measured tokens/s and peak memory; no run measured yet: no time is guessed."""
    from keel.model.template import render, with_system
    from keel.webui.runs import read_log, run_folders

    lengths = [len(ids[0]) for r in rows if (ids := render(tokenizer, with_system(r["messages"], form.system)))]
    mean = sum(lengths) / max(len(lengths), 1)
    ballast = sum(int(s.split("#")[1]) for s in general if s.startswith("ballast#"))
    tokens = int(sum(lengths) + ballast * mean)  # ballast answers are about as long as identity answers
    out = {"rows": len(rows) + ballast, "tokens_per_epoch": tokens, "epochs": form.num_train_epochs,
           "train_tokens": int(tokens * form.num_train_epochs), "weights_gb": round(weights_bytes(model_path) / 1e9, 4)}
    for run in sorted(run_folders(roots), key=lambda p: -p.stat().st_mtime):
        try:
            saved = json.loads((run / "args.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        log = [r for r in read_log(run) if "train_tokens_per_second" in r]
        if saved.get("base_model_path") == model_path and log:
            speed = sorted(r["train_tokens_per_second"] for r in log)[len(log) // 2]
            out.update(measured_on=str(run), tokens_per_second=speed,
                       seconds=round(out["train_tokens"] / max(speed, 1e-9)), peak_memory_gb=max(r["memory"] for r in log))
            break
    return out


def weights_bytes(model_path: str) -> int:
    """Bytes of the weights as training holds them (float32 on CPU), from the safetensors headers."""
    from safetensors import safe_open

    from keel.model.load import pick_device_dtype

    _, dtype = pick_device_dtype()
    n = 0
    for f in Path(model_path).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                shape = st.get_slice(key).get_shape()
                count = 1
                for d in shape:
                    count *= d
                n += count
    return n * dtype.itemsize
