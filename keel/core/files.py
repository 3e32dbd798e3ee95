"""Files written whole or not at all: a temporary name in the same folder, then a rename.

    atomic_write(path, text)        # a kill or a full disk never leaves half a file at `path`
    atomic_write(path, text, private=True)   # 600 whatever the umask: for anything holding a key
    write_json(path, data)
    write_jsonl(path, rows)
    folder = temp_dir(parent, prefix)  # a folder built in place, then renamed: 755 under umask 022, not mkdtemp's 700
    share_files(folder)                # its files 644 under umask 022, whatever wrote them

Outputs get the permissions the user's umask gives any new file (644 and 755 under the usual 022), so a
checkpoint or an export can be read by the people and services the user shares the folder with.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (another thread may be creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shared_mode(folder: bool = False) -> int:
    """What open() or mkdir() would give under the umask (mkstemp and mkdtemp always give 600 and 700)."""
    return (0o777 if folder else 0o666) & ~current_umask()


def temp_dir(parent: str | Path, prefix: str) -> Path:
    """A new hidden folder in `parent` to fill and rename into place, with the umask's folder permissions."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, shared_mode(folder=True))
    return path


def share_files(folder: str | Path):
    """Give the files in `folder` the umask's permissions: safetensors writes its files 600 whatever the umask."""
    mode = shared_mode()
    for path in Path(folder).iterdir():
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def atomic_write(path: str | Path, text: str, private: bool = False):
    """Write `text` to `path` through a temporary file beside it; the old file stays until the rename.
    The file gets the umask's permissions, or 600 when `private` (it holds a key)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600 if private else shared_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_json(path: str | Path, data, indent: int = 2, private: bool = False):
    atomic_write(path, json.dumps(data, ensure_ascii=False, indent=indent), private)


def write_jsonl(path: str | Path, rows: list):
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
