"""Printing results: a table for people, JSON or YAML for scripts, one format flag everywhere."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Callable, Sequence

import typer
import yaml
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table, box

from maas_tui.render import format as tui_format

# Piped output keeps one row per line, whatever its width, so scripts can grep it.
console = Console(width=None if sys.stdout.isatty() else 400)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 400)


class Format(StrEnum):
    table = "table"
    wide = "wide"
    json = "json"
    yaml = "yaml"


OutputOption = typer.Option(Format.table, "--output", "-o", help="table, wide, json or yaml")

Column = tuple[str, Callable[[Any], Any]]


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def emit(data: Any, fmt: Format, columns: Sequence[Column] = (), wide_columns: Sequence[Column] = ()) -> None:
    """Print one object or a list in the chosen format. Lists come out as {"items": [...]} in JSON/YAML."""
    if fmt in (Format.json, Format.yaml):
        plain = _plain(data)
        if isinstance(plain, list):
            plain = {"items": plain}
        if fmt == Format.json:
            sys.stdout.write(json.dumps(plain, indent=2) + "\n")
        else:
            sys.stdout.write(yaml.safe_dump(plain, sort_keys=False))
        return
    rows = data if isinstance(data, list) else [data]
    cols = list(columns) + (list(wide_columns) if fmt == Format.wide else [])
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for header, _ in cols:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*("" if (v := get(row)) is None else str(v) for _, get in cols))
    console.print(table)


def human_bytes(value: int | None) -> str:
    if value is None:
        return ""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(value)


def age(moment: datetime | None) -> str:
    if moment is None:
        return ""
    seconds = int((datetime.now(UTC) - (moment if moment.tzinfo else moment.replace(tzinfo=UTC))).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def instance_state(instance: Any) -> str:
    """`downloading 42%` while the agent reports download progress, else the state itself (the TUI's wording)."""
    return tui_format.instance_state(instance.state, getattr(instance, "download_progress", None))
