"""`keel data`: dataset tools.

    keel data identity --name NAME --author AUTHOR -o self_cognition.json
    keel data identity --pairs true --name NAME --author AUTHOR -o identity_pairs.jsonl   # for keel rlhf
    keel data check self_cognition.json --model_name NAME --model_author AUTHOR
    keel data ballast -n 200 -o ballast.jsonl
"""

from __future__ import annotations

import importlib

from keel.errors import KeelError

SUBCOMMANDS = {"identity": "keel.data.identity", "check": "keel.data.check", "ballast": "keel.ballast"}


def main(argv: list[str]):
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: keel data {" + ",".join(SUBCOMMANDS) + "} [flags]\n\n" + __doc__)
        raise SystemExit(0)
    if argv[0] not in SUBCOMMANDS:
        raise KeelError(f"keel data: unknown subcommand '{argv[0]}' (choose from {', '.join(SUBCOMMANDS)})")
    module = SUBCOMMANDS[argv[0]]
    if argv[0] == "identity" and any(a.split("=")[0] == "--pairs" for a in argv[1:]):
        module = "keel.identity_pairs"  # pairs need the base model's answers: outside the model-free data layer
    importlib.import_module(module).main(argv[1:])
