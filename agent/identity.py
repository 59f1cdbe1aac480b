"""The agent's worker identity, kept in its data folder (mode 0600).

The server mints a new worker token at each registration and, for a name that is taken, lets a
registration through only with that worker's current token (or an operator's approval). So the
agent saves the token it was given and presents it when it registers again, after a restart too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FILE_NAME = "worker.json"


def load_token(data_dir: Path, name: str) -> str | None:
    """The saved token of worker `name` (None: none saved, another name's, or unreadable)."""
    try:
        saved = json.loads((data_dir / FILE_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("name") != name or not isinstance(saved.get("token"), str):
        return None
    return saved["token"]


def save_token(data_dir: Path, name: str, token: str) -> None:
    """Replace the saved identity at once (a crash leaves the old file or the new one, never half)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / FILE_NAME
    partial = path.with_suffix(".tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"name": name, "token": token}, handle)
    os.chmod(partial, 0o600)
    os.replace(partial, path)
