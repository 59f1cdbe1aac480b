"""Events: the table columns, newest first in the TUI and oldest first in the CLI (as given)."""

from __future__ import annotations

from datetime import datetime
from typing import Iterable

from rich.text import Text

from maas_tui.render import format as fmt
from maas_tui.render.common import Column, Row
from server import schemas

COLUMNS: list[Column] = [("AGE", None), ("KIND", None), ("OBJECT", None), ("REASON", None), ("BY", None),
                         ("MESSAGE", None)]
WIDE_COLUMNS: list[Column] = []
ALARMING = {"error", "failed", "unreachable", "notready", "unschedulable"}


def rows(events: Iterable[schemas.EventOut], now: datetime, truncate: bool = True) -> Iterable[Row]:
    """One row per event; `truncate` cuts long names and messages to fit a screen (the TUI), the CLI prints
    them whole (one line each)."""
    cut = fmt.truncate if truncate else (lambda text, _width: text)
    for e in events:
        reason = Text(e.reason, style="bold red" if e.reason.lower() in ALARMING else "")
        yield str(e.id), (fmt.age(e.created_at, now), e.kind.rstrip("s"), cut(e.object_name, 20), reason,
                          cut(e.actor, 10), cut(" ".join(e.message.split()), 120))
