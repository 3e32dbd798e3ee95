"""The Hugging Face hub, when it can be reached: one quick check, then a download, else one line saying what to do.

Model and dataset loading both come here; nothing else in Keel opens a network connection.
"""

from __future__ import annotations

import os

from keel.core.errors import KeelError


def hub_reachable(timeout: float = 5.0) -> bool:
    """One quick TCP check, so an offline machine fails in seconds instead of retrying for minutes."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def fetch_from_hub(hub_id: str) -> str:
    """A local folder for a hub model: the hub cache if present, else a download."""
    from huggingface_hub import snapshot_download

    # README.md: the model's card, whose license Keel's model cards repeat
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "README.md"]
    try:
        return snapshot_download(hub_id, allow_patterns=patterns, local_files_only=True)
    except Exception:  # not in the local hub cache
        pass
    hint = (f"download it elsewhere and pass the folder (--model /path/to/{hub_id.split('/')[-1]}) "
            f"or put it in $KEEL_MODEL_DIR/{hub_id}")
    if not hub_reachable():
        raise KeelError(f"--model: could not fetch '{hub_id}' from the hub (offline); {hint}")
    try:
        return snapshot_download(hub_id, allow_patterns=patterns)
    except Exception as e:
        raise KeelError(f"--model: could not fetch '{hub_id}' from the hub ({type(e).__name__}); {hint}") from None
