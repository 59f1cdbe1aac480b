"""What the per-kind renderers share: column lists, the describe grid, the events table, documents."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable

from pydantic import BaseModel
from rich.table import Table
from rich.text import Text

from maas_tui.render import format as fmt
from server import schemas

# A column: its header and the widest it may grow in the TUI (None: as wide as its cells).
Column = tuple[str, int | None]
Row = tuple[str, tuple[Any, ...]]  # a key (what the TUI keeps the cursor on) and the cells


def grid() -> Table:
    """The describe page's field list: bold names, values beside them."""
    table = Table.grid(padding=(0, 1))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    return table


def small_table(*columns: str, wrap: str = "MESSAGE") -> Table:
    table = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column, no_wrap=column != wrap)
    return table


def events_table(events: Iterable[schemas.EventOut], now: datetime) -> Table:
    """The events under a describe page (newest first, as given)."""
    table = small_table("AGE", "OBJECT", "REASON", "MESSAGE")
    for event in events:
        table.add_row(fmt.age(event.created_at, now), Text(event.object_name), Text(event.reason), Text(event.message))
    return table


def section(title: str) -> Text:
    return Text(title, style="bold")


def document(kind: str, obj: BaseModel, spec: dict[str, Any], status: dict[str, Any],
             metadata: Iterable[str] = ("id", "created_at", "updated_at")) -> dict[str, Any]:
    """A kubectl-style document: kind, metadata (name first), spec (what `maas apply -f` takes), status."""
    data = obj.model_dump(mode="json")
    return {"kind": kind, "metadata": {"name": data["name"]} | {k: data[k] for k in metadata if k in data},
            "spec": spec, "status": status}
