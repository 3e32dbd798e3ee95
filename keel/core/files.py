"""Files written whole or not at all: a temporary name in the same folder, then a rename.

    atomic_write(path, text)        # a kill or a full disk never leaves half a file at `path`
    write_json(path, data)
    write_jsonl(path, rows)
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write(path: str | Path, text: str):
    """Write `text` to `path` through a temporary file beside it; the old file stays until the rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data, indent: int = 2):
    atomic_write(path, json.dumps(data, ensure_ascii=False, indent=indent))


def write_jsonl(path: str | Path, rows: list):
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
