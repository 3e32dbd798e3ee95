"""`keel web-ui`: the identity workflow in the browser, with live curves and a before/after chat.

    keel web-ui                                   # http://127.0.0.1:7860/
    keel web-ui --output_dir output keel-identity --port 7861
    KEEL_API_KEY=SECRET keel web-ui --host 0.0.0.0   # off loopback a key is required, as for keel deploy

Identity (name, author, system prompt, the rows `keel data identity` writes, editable, with `keel data
check`'s findings), Train (runs `keel sft` as a child process with the recipe's settings; live loss,
token accuracy and identity/leakage/drift probes from logging.jsonl; a run list that includes runs
started from the CLI in the same folders), Compare (base vs checkpoint, streaming; `keel eval` and its
report), Chat (keel deploy's web chat with 👍/👎, the feedback count and `keel feedback export`) and
Export (`keel export`, merged or GGUF, with its verification table). Runs go to the first --output_dir.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from keel.core.errors import KeelError
from keel.core.flags import parse_flags
from keel.serve.deploy import is_loopback


@dataclass
class WebUIArgs:
    host: str = "127.0.0.1"
    """Address to listen on. Anything but loopback needs --api_key."""
    port: int = 7860
    """Port to listen on."""
    api_key: str | None = None
    """Require `Authorization: Bearer KEY` on /api/ and /v1/ requests (default: $KEEL_API_KEY)."""
    output_dir: list[str] = field(default_factory=lambda: ["output", "keel-identity"])
    """Folders holding runs: new runs go to the first; every run under them is listed (keel sft and keel recipe
    write there by default). Requests may read and write nothing outside them."""
    allow_data_dir: list[str] = field(default_factory=list)
    """Folders besides --output_dir whose files a run may name as general data (any other local file is refused)."""

    def __post_init__(self):
        self.api_key = self.api_key or os.environ.get("KEEL_API_KEY") or None
        if not 0 < self.port < 65536:
            raise KeelError(f"--port must be 1..65535, got {self.port}")
        if not self.output_dir or not all(d.strip() for d in self.output_dir):
            raise KeelError("--output_dir takes one folder or more")
        if not is_loopback(self.host) and not self.api_key:
            raise KeelError(f"--host {self.host} is reachable from other machines: set --api_key (or KEEL_API_KEY) first")


def web_ui(args: WebUIArgs):
    """Serve the web UI until stopped (Ctrl-C); runs it started keep going."""
    from keel.serve.server import make_server
    from keel.webui.app import create_app

    roots = [Path(d) for d in args.output_dir]
    for r in roots:
        try:
            r.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise KeelError(f"--output_dir {r}: cannot create it ({e.strerror})") from None
    data_dirs = [Path(d) for d in args.allow_data_dir]
    missing = [str(d) for d in data_dirs if not d.is_dir()]
    if missing:
        raise KeelError(f"--allow_data_dir {missing[0]}: no such folder")
    app = create_app(roots, api_key=args.api_key, data_dirs=data_dirs)
    print(f"keel web-ui: http://{args.host}:{args.port}/  (runs in {', '.join(map(str, roots))})", flush=True)
    make_server(app, args.host, args.port).run()  # keel deploy's server: shutdown stops chat generations at once


CONFIGS = (WebUIArgs,)


def main(argv: list[str]):
    """keel web-ui [--host 127.0.0.1] [--port 7860] [--api_key KEY] [--output_dir DIR...]"""
    web_ui(*parse_flags(argv, CONFIGS, prog="keel web-ui", description=__doc__.split("\n")[0]).configs)
