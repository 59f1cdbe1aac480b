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


def load() -> ClientConfig:
    config = ClientConfig()
    path = config_path()
    if path.exists():
        try:
            data = json.loads(path.read_text())
            config = ClientConfig(server=str(data.get("server", "")), token=str(data.get("token", "")))
        except (OSError, ValueError):
            pass
    config.server = os.environ.get("MAAS_SERVER") or config.server
    config.token = os.environ.get("MAAS_API_KEY") or config.token
    return config


def save(config: ClientConfig) -> Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"server": config.server, "token": config.token}, handle, indent=2)
    return path
