"""Printing results: a table for people, JSON or YAML for scripts, one format flag everywhere.

Nothing the server or a file says is read as Rich markup: the consoles have markup off and table cells
are Text, so a message holding `[red]` prints as typed. Styles are applied with Text and `style=`.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Callable, Iterable, NoReturn, Sequence

import typer
import yaml
from pydantic import BaseModel
from rich.console import Console, RenderableType
from rich.table import Table, box
from rich.text import Text

from maas_tui.render import format as fmt
from maas_tui.render.common import Column as RenderColumn, Row

# Piped output keeps one row per line, whatever its width, so scripts can grep it.
console = Console(width=None if sys.stdout.isatty() else 400, markup=False, highlight=False)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 400, markup=False, highlight=False)


class Format(StrEnum):
    table = "table"
    wide = "wide"
    json = "json"
    yaml = "yaml"


OutputOption = typer.Option(Format.table, "--output", "-o", help="table, wide, json or yaml")

Column = tuple[str, Callable[[Any], Any]]


def print_error(message: str) -> None:
    err_console.print(Text.assemble(("error:", "bold red"), " ", message))


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: MESSAGE` on stderr and exit: 1 a failure, 2 a usage error."""
    print_error(message)
    raise typer.Exit(code)


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def literal(value: Any) -> Text:
    """A cell printed as it is (Rich would read `[...]` in a str as markup)."""
    return value if isinstance(value, Text) else Text("" if value is None else str(value))


def print_data(plain: Any, fmt_: Format) -> None:
    if fmt_ == Format.json:
        sys.stdout.write(json.dumps(plain, indent=2) + "\n")
    else:
        sys.stdout.write(yaml.safe_dump(plain, sort_keys=False, allow_unicode=True))


def emit(data: Any, fmt_: Format, columns: Sequence[Column] = (), wide_columns: Sequence[Column] = ()) -> None:
    """Print one object or a list in the chosen format. Lists come out as {"items": [...]} in JSON/YAML."""
    if fmt_ in (Format.json, Format.yaml):
        plain = _plain(data)
        if isinstance(plain, list):
            plain = {"items": plain}
        print_data(plain, fmt_)
        return
    rows = data if isinstance(data, list) else [data]
    cols = list(columns) + (list(wide_columns) if fmt_ == Format.wide else [])
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for header, _ in cols:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*(literal(get(row)) for _, get in cols))
    console.print(table)


def print_rows(columns: Sequence[RenderColumn], wide_columns: Sequence[RenderColumn], rows: Iterable[Row],
               wide: bool) -> None:
    """A table of a renderer's rows (maas_tui/render/<kind>.py): the TUI's columns and cells."""
    count = len(columns) + (len(wide_columns) if wide else 0)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for header, _ in (list(columns) + list(wide_columns))[:count]:
        table.add_column(header, overflow="fold")
    for _, cells in rows:
        table.add_row(*(literal(cell) for cell in cells[:count]))
    console.print(table)


def print_renderable(renderable: RenderableType) -> None:
    console.print(renderable)


def emit_document(document: dict[str, Any], fmt_: Format) -> None:
    """One kubectl-style document (kind, metadata, spec, status) as JSON or YAML."""
    print_data(document, fmt_)


def now() -> datetime:
    return datetime.now(UTC)


def age(moment: datetime | None) -> str:
    """How long ago, as the TUI says it (5s, 3m, 2h, 4d); empty for None."""
    return "" if moment is None else fmt.age(moment, now())


def human_bytes(value: int | None) -> str:
    return fmt.iec_bytes(value)


def instance_state(instance: Any) -> str:
    """`downloading 42%` while the agent reports download progress, else the state itself (the TUI's wording)."""
    return fmt.instance_state(instance.state, getattr(instance, "download_progress", None))
