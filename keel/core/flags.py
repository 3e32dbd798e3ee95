"""Dataclass fields become command-line flags.

Each concern (model, data, LoRA, training, eval, ...) is one dataclass in the module that uses
it. A field's docstring (the string literal right under it) is its `--help` text; its type
gives the parser; `__post_init__` validates and raises `KeelError` naming the flag.
Flags use ms-swift's spelling (`--max_new_tokens`); the dashed form (`--max-new-tokens`) is
accepted too. Booleans take `true`/`false` (a bare `--stream` means true).

    parsed = parse_flags(argv, [ModelArgs, InferArgs], prog="keel infer")
    model_args, infer_args = parsed.configs
    parsed.given   # names of the flags the user actually typed (for "explicit flags win")

ms-swift flags that Keel accepts but has no use for (`NOT_USED`) are never refused: given with a
value other than the default, each is reported once on stderr (`note_once`), so a pasted tutorial
command runs and says what it ignored.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import os
import sys
import textwrap
import types
import typing
from pathlib import Path

from keel.core.errors import KeelError

TRUE_WORDS = {"true", "1", "yes", "on"}
FALSE_WORDS = {"false", "0", "no", "off"}
# ms-swift flags Keel accepts with their ms-swift spelling and has no use for: flag -> why.
NOT_USED = {
    "dataloader_num_workers": "rows are tokenized once before training and held in memory, so no loader workers run",
    "model_type": "Keel reads the architecture and chat template from the model's own files",
}
_notes_shown: set[str] = set()


def parse_bool(text: str) -> bool:
    """Parse ms-swift style booleans: true/false (also 1/0, yes/no, on/off)."""
    word = str(text).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def field_docs(cls) -> dict[str, str]:
    """Map each field of a dataclass to the docstring written under it in the source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap_optional(tp):
    """`X | None` -> X (flags never take the literal None)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, tp, help_text: str):
    tp = _unwrap_optional(tp)
    names = [f"--{f.name}"]
    if "_" in f.name:
        names.append(f"--{f.name.replace('_', '-')}")
    names += list(f.metadata.get("aliases", ()))
    kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
    if typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0] if typing.get_args(tp) else str
        kwargs.update(nargs="+", type=item, metavar=f.name.upper())
    elif tp is bool:
        kwargs.update(nargs="?", const=True, type=parse_bool, metavar="true|false")
    else:
        kwargs.update(type=tp, metavar=f.name.upper())
    if "choices" in f.metadata:
        kwargs["choices"] = f.metadata["choices"]
    parser.add_argument(*names, **kwargs)


class _Parser(argparse.ArgumentParser):
    """argparse that raises KeelError (one line) instead of printing usage and exiting."""

    def error(self, message):
        raise KeelError(f"{self.prog}: {message}")


@dataclasses.dataclass
class Parsed:
    configs: list
    given: set[str]
    raw: dict


def build_parser(classes: list[type], prog: str, description: str = "") -> _Parser:
    parser = _Parser(prog=prog, description=description, allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    seen: dict[str, type] = {}
    for cls in classes:
        group = parser.add_argument_group(cls.__name__.removesuffix("Args").lower() or cls.__name__)
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if not f.init or f.name in seen:
                continue
            seen[f.name] = cls
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            help_text = docs.get(f.name, "")
            help_text = f"{help_text} (default: {default})".replace("%", "%%")
            _add_field(group, f, hints[f.name], help_text)
    return parser


def _suggest(parser: argparse.ArgumentParser, flag: str) -> str:
    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    close = difflib.get_close_matches(flag.split("=")[0], options, n=1, cutoff=0.5)
    return f"; did you mean {close[0]}?" if close else f"; see {parser.prog} --help"


def read_config_file(path: str, known: set[str]) -> dict:
    """Read a `--config FILE.yaml` (or .json) whose keys are flag names without dashes."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise KeelError(f"{path}: config file does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise KeelError(f"{path}: {at}not valid YAML") from None
    if not isinstance(data, dict):
        raise KeelError(f"{path}: a config file must be a mapping of flag: value")
    out = {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise KeelError(f"{path}: unknown key '{key}'{hint}")
        out[name] = value
    return out


def _coerce(value, tp, flag: str):
    """Coerce a YAML value to a field's type, so a config file behaves like the command line."""
    tp = _unwrap_optional(tp)
    if value is None:
        return None
    if typing.get_origin(tp) is list:
        item = (typing.get_args(tp) or (str,))[0]
        seq = value if isinstance(value, list) else [value]
        return [_coerce(v, item, flag) for v in seq]
    try:
        if tp is bool:
            return value if isinstance(value, bool) else parse_bool(value)
        return tp(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise KeelError(f"--{flag}: cannot read {value!r} as {getattr(tp, '__name__', tp)}") from None


def parse_flags(argv: list[str], classes: list[type], prog: str, description: str = "",
                positionals: tuple = ()) -> Parsed:
    """Parse argv into one instance per dataclass. Unknown flags name the closest valid flag.

    A field named `config` (if any class has one) is read first as a YAML file of the same
    keys; flags typed on the command line win over it.
    """
    _notes_shown.clear()  # a new command: each of its notes is shown once
    parser = build_parser(classes, prog, description)
    for name, kwargs in positionals:
        parser.add_argument(name, **kwargs)
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        raise SystemExit(0)
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        bad = next((u for u in unknown if u.startswith("-")), unknown[0])
        if bad.startswith("-"):
            raise KeelError(f"{prog}: unknown flag {bad}{_suggest(parser, bad)}")
        raise KeelError(f"{prog}: unexpected argument '{bad}'")
    given = dict(vars(ns))
    hints = {}
    for cls in classes:
        hints.update({f.name: (cls, typing.get_type_hints(cls)[f.name])
                      for f in dataclasses.fields(cls) if f.init})
    values = {}
    if given.get("config"):
        from_file = read_config_file(given["config"], set(hints) - {"config"})
        values.update({k: _coerce(v, hints[k][1], k) for k, v in from_file.items()})
    values.update(given)
    configs = []
    for cls in classes:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        configs.append(cls(**{k: v for k, v in values.items() if k in names}))
    note_unused(configs, set(values))
    return Parsed(configs=configs, given=set(given) | set(values), raw=values)


def note_once(text: str):
    """Print `note: TEXT` on stderr once per command, from the main process only (torchrun rank 0)."""
    if text in _notes_shown or os.environ.get("RANK", "0") != "0":
        return
    _notes_shown.add(text)
    print(f"note: {text}", file=sys.stderr, flush=True)


def note_unused(configs: list, given: set[str]):
    """One note per NOT_USED flag given with a value other than its default (nothing is lost otherwise)."""
    for c in configs:
        for f in dataclasses.fields(c):
            if f.name not in NOT_USED or f.name not in given:
                continue
            value = getattr(c, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if value != default:
                shown = " ".join(map(str, value)) if isinstance(value, list) else value
                note_once(f"--{f.name} {shown}: accepted for ms-swift compatibility and not used: {NOT_USED[f.name]}")


def check_zh_en(flag: str, values: list[str], required: bool = True):
    """Names and authors are one value, or two: Chinese, then English (chosen per row by its language)."""
    if (required and not values) or len(values) > 2 or not all(v.strip() for v in values):
        raise KeelError(f"--{flag} takes one value or two (Chinese, English)")


def to_argv(*configs) -> list[str]:
    """The flags that would rebuild these configs (fields that differ from their defaults), for logs."""
    argv = []
    for c in configs:
        for f in dataclasses.fields(c):
            value = getattr(c, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if not f.init or value == default:
                continue
            values = value if isinstance(value, list) else [value]
            argv += [f"--{f.name}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return argv


def to_dict(*configs) -> dict:
    """Merge dataclass instances into one flat dict (the resolved config saved as args.json)."""
    out = {}
    for c in configs:
        out.update(dataclasses.asdict(c))
    return out


def print_error_and_exit(err: KeelError, code: int = 2):
    msg = " ".join(str(err).split("\n")).strip()
    print(f"keel: error: {msg}", file=sys.stderr)
    raise SystemExit(code)
