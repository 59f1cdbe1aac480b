"""Where the CLI and TUI find the server: flags, then MAAS_SERVER / MAAS_API_KEY, then the config file."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs


def config_path() -> Path:
    override = os.environ.get("MAAS_CONFIG")
    return Path(override) if override else Path(platformdirs.user_config_dir("maas")) / "config.json"


@dataclass
class ClientConfig:
    server: str = ""
    token: str = ""


# Set by the global `--context` option (or MAAS_CONTEXT): which context this command uses.
ACTIVE_CONTEXT: str | None = None
DEFAULT_CONTEXT = "default"


def read_file() -> dict:
    """The config file as {"current_context": str, "contexts": {name: {"server", "token"}}}.

    A file from before contexts ({"server", "token"}) reads as one context named "default".
    """
    path = config_path()
    data: dict = {}
    if path.exists():
        try:
            loaded = json.loads(path.read_text())
            data = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            data = {}
    contexts = data.get("contexts") if isinstance(data.get("contexts"), dict) else {}
    if not contexts and (data.get("server") or data.get("token")):
        contexts = {DEFAULT_CONTEXT: {"server": str(data.get("server", "")), "token": str(data.get("token", ""))}}
    current = str(data.get("current_context") or (DEFAULT_CONTEXT if DEFAULT_CONTEXT in contexts else ""))
    return {"current_context": current, "contexts": contexts}


def write_file(data: dict) -> Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"current_context": data.get("current_context", ""), "contexts": data.get("contexts", {})},
                  handle, indent=2)
    return path


def active_context_name(data: dict | None = None) -> str:
    data = data if data is not None else read_file()
    return ACTIVE_CONTEXT or os.environ.get("MAAS_CONTEXT") or data["current_context"] or DEFAULT_CONTEXT


def load() -> ClientConfig:
    data = read_file()
    name = active_context_name(data)
    entry = data["contexts"].get(name) or {}
    config = ClientConfig(server=str(entry.get("server", "")), token=str(entry.get("token", "")))
    config.server = os.environ.get("MAAS_SERVER") or config.server
    config.token = os.environ.get("MAAS_API_KEY") or config.token
    return config


def save(config: ClientConfig, context: str | None = None) -> Path:
    """Store the server and credentials in a context (the active one by default); it becomes current
    when there was none."""
    data = read_file()
    name = context or active_context_name(data)
    data["contexts"][name] = {"server": config.server, "token": config.token}
    if not data["current_context"] or data["current_context"] not in data["contexts"]:
        data["current_context"] = name
    return write_file(data)
