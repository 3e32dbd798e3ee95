"""The `keel` command: one subcommand per job, ms-swift flag spelling.

    keel --help
    keel infer --query "Who are you?"
    keel sft --dataset self_cognition.json --model_name Keel --model_author "Acme Lab"

Subcommands are a plain dict from name to (module, summary); a module is imported only when
its subcommand runs, so `keel --help` is instant. Each module has `main(argv)`.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys

from keel.core.errors import KeelError
from keel.core.flags import print_error_and_exit

COMMANDS = {
    "infer": ("keel.serve.infer", "chat, answer one --query, or answer a JSONL file"),
    "sft": ("keel.train.sft", "LoRA fine-tune (ms-swift `swift sft` flags)"),
    "rlhf": ("keel.train.rlhf", "preference training on a LoRA adapter: DPO, ORPO, KTO (ms-swift `swift rlhf` flags)"),
    "eval": ("keel.evals.run", "identity robustness matrix, leakage, multiple-choice and drift; base vs tuned"),
    "data": ("keel.cli", "identity | check | ballast: build and check datasets"),
    "export": ("keel.export.run", "merge the LoRA into the weights, or write GGUF + Ollama Modelfile"),
    "deploy": ("keel.serve.deploy", "OpenAI-compatible server with a web chat and feedback buttons"),
    "feedback": ("keel.serve.feedback", "export rated answers as training rows"),
    "recipe": ("keel.recipes.identity", "one command: identity data + ballast + train + before/after report"),
    "web-ui": ("keel.webui.launch", "the identity workflow in the browser: data, training with live curves, compare, chat, export"),
}


# `keel data SUB`: the subcommands live in their layers (identity rows and checks need no model; ballast and
# identity pairs are written by the base model), so the dispatch is here, above them all.
DATA_SUBCOMMANDS = {"identity": "keel.data.identity", "check": "keel.data.check", "ballast": "keel.synth.ballast",
                    "identity --pairs": "keel.synth.identity_pairs"}
DATA_USAGE = """usage: keel data {identity,check,ballast} [flags]

    keel data identity --name NAME --author AUTHOR -o self_cognition.json
    keel data identity --pairs true --name NAME --author AUTHOR -o identity_pairs.jsonl   # for keel rlhf
    keel data check self_cognition.json --model_name NAME --model_author AUTHOR
    keel data ballast -n 200 -o ballast.jsonl"""


def main_data(argv: list[str]):
    """`keel data SUB ...`: hand the rest of argv to the subcommand's module."""
    if not argv or argv[0] in ("-h", "--help"):
        print(DATA_USAGE)
        raise SystemExit(0)
    if argv[0] not in ("identity", "check", "ballast"):
        raise KeelError(f"keel data: unknown subcommand '{argv[0]}' (choose from identity, check, ballast)")
    name = argv[0]
    if name == "identity" and any(a.split("=")[0] == "--pairs" for a in argv[1:]):
        name = "identity --pairs"
    return importlib.import_module(DATA_SUBCOMMANDS[name]).main(argv[1:])


NOISY_LIBRARIES = ("transformers", "peft", "accelerate", "torch", "huggingface_hub", "gguf", "tokenizers", "bitsandbytes")


def usage() -> str:
    lines = ["usage: keel <command> [flags]   (keel <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name:<9} {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def quiet_libraries():
    """Keep library chatter (progress bars, advice) off the user's terminal."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import logging
    import warnings

    # Only the libraries' own warnings (deprecations, advice); Keel's and the user's code still warn.
    for lib in NOISY_LIBRARIES:
        warnings.filterwarnings("ignore", module=rf"{lib}(\.|$)")
        logging.getLogger(lib).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def close_progress_bars():
    """A bar the error interrupted (training, generation) would otherwise share its line with the message."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        raise SystemExit(0)
    if argv[0] in ("-V", "--version"):
        from keel import __version__

        print(f"keel {__version__}")
        raise SystemExit(0)
    name, rest = argv[0], argv[1:]
    try:
        if name not in COMMANDS:
            close = difflib.get_close_matches(name, list(COMMANDS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "; see keel --help"
            raise KeelError(f"unknown command '{name}'{hint}")
        quiet_libraries()
        if name == "data":
            code = main_data(rest)
        else:
            code = importlib.import_module(COMMANDS[name][0]).main(rest)
    except KeelError as e:
        close_progress_bars()
        print_error_and_exit(e)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130)
    raise SystemExit(code or 0)
