"""`keel deploy`: an OpenAI-compatible server with a web chat that records 👍/👎 feedback.

    keel deploy --adapters output/v0-.../checkpoint-102            # http://127.0.0.1:8000/
    keel deploy --model checkpoint-102-gguf/model-q4_k_m.gguf      # the exported GGUF, run by llama.cpp (.[gguf])
    KEEL_API_KEY=SECRET keel deploy --host 0.0.0.0 --feedback_db feedback.sqlite   # a --api_key shows in `ps`
    curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \
        -d '{"messages": [{"role": "user", "content": "Who are you?"}]}'

Endpoints: POST /v1/chat/completions (stream or not), GET /v1/models, GET /health,
POST /v1/feedback {id, rating: up|down, correction?}, and the chat page at /.
Ratings go to a SQLite database; `keel feedback export` turns corrected bad answers into rows.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from keel.core.errors import KeelError
from keel.core.flags import parse_flags
from keel.model.load import ModelArgs, cache_root, load_model


@dataclass
class DeployArgs:
    host: str = "127.0.0.1"
    """Address to listen on. Anything but loopback needs --api_key."""
    port: int = 8000
    """Port to listen on."""
    api_key: str | None = None
    """Require `Authorization: Bearer KEY` on /v1/ requests (default: $KEEL_API_KEY, which keeps the key out of the process list)."""
    feedback_db: str | None = None
    """SQLite file for answers and ratings (default: feedback.sqlite beside the adapter, else in the cache)."""
    served_model_name: str | None = None
    """The model id reported by /v1/models (default: the adapter's folder name, else the model name)."""
    max_body_kb: int = 1024
    """Largest request body accepted, in KiB; larger ones get 413 before they are read."""
    max_queue: int = 64
    """Requests that may wait while one generates; more get 429 with Retry-After."""
    request_timeout: float = 300.0
    """Seconds a request may take, waiting included: a wait past it gets 503, a generation past it is cut (finish_reason length), and so is the reading of a long prompt."""
    read_timeout: float = 10.0
    """Seconds a request's body may take to arrive; a slower one gets 408 and its connection is closed."""
    max_connections: int = 128
    """Connections open at once (uvicorn's limit_concurrency); a request beyond it gets 503."""

    def __post_init__(self):
        self.api_key = self.api_key or os.environ.get("KEEL_API_KEY") or None
        if not 0 < self.port < 65536:
            raise KeelError(f"--port must be 1..65535, got {self.port}")
        if self.max_body_kb < 1:
            raise KeelError(f"--max_body_kb must be >= 1, got {self.max_body_kb}")
        if self.max_queue < 0:
            raise KeelError(f"--max_queue must be >= 0, got {self.max_queue}")
        for flag in ("request_timeout", "read_timeout"):
            value = getattr(self, flag)
            if not 0 < value < float("inf"):
                raise KeelError(f"--{flag} must be a number of seconds > 0, got {value}")
        if self.max_connections < 2:
            raise KeelError(f"--max_connections must be >= 2, got {self.max_connections}")
        if not is_loopback(self.host) and not self.api_key:
            raise KeelError(f"--host {self.host} is reachable from other machines: set --api_key (or KEEL_API_KEY) first")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def deploy(margs: ModelArgs, args: DeployArgs):
    """Load the model, open the feedback store and serve until stopped."""
    from keel.serve.feedback import FeedbackStore
    from keel.serve.server import create_app, make_server

    db = Path(args.feedback_db) if args.feedback_db else (
        Path(margs.adapters[-1]).resolve().parent / "feedback.sqlite" if margs.adapters else cache_root() / "feedback.sqlite")
    store = FeedbackStore(db)
    if margs.model and margs.model.endswith(".gguf"):  # served by llama.cpp, the runtime the export gate checked
        from keel.model.llama_backend import load_gguf

        if margs.adapters:
            raise KeelError("--model FILE.gguf is served as it is: drop --adapters (keel export --to gguf merges them in)")
        model, tok, info = load_gguf(margs.model)
    else:
        model, tok, info = load_model(margs)
    name = args.served_model_name or (Path(margs.adapters[-1]).name if margs.adapters else info.name)
    app = create_app(model, tok, info, api_key=args.api_key, store=store, model_id=name, max_body=args.max_body_kb * 1024,
                     max_queue=args.max_queue, request_timeout=args.request_timeout, read_timeout=args.read_timeout)
    print(f"keel deploy: http://{args.host}:{args.port}/  (model {name}, feedback {db})", flush=True)
    make_server(app, args.host, args.port, args.max_connections).run()


CONFIGS = (ModelArgs, DeployArgs)


def main(argv: list[str]):
    """keel deploy [--adapters CKPT | --model M] [--host 127.0.0.1] [--port 8000] [--api_key KEY]"""
    deploy(*parse_flags(argv, CONFIGS, prog="keel deploy", description=__doc__.split("\n")[0]).configs)
