"""The audit log: the table columns (newest first, as the server gives them) and one entry's describe page,
for `maas audit` and the TUI's Audit view. The summary (WHAT) is the wide column: 80 columns have no room
for it beside the rest, so the TUI shows it in wide mode and on the entry's page."""

from __future__ import annotations

from datetime import datetime
from typing import Iterable

from rich.console import RenderableType
from rich.text import Text

from maas_tui.render import format as fmt
from maas_tui.render.common import Column, Row, grid
from server import schemas

COLUMNS: list[Column] = [("WHEN", None), ("ACTOR", None), ("FROM", None), ("REQUEST", None), ("STATUS", None)]
WIDE_COLUMNS: list[Column] = [("WHAT", None)]
# What the TUI shows of each (the CLI prints them whole).
ACTOR_SHOWN, ADDRESS_SHOWN, REQUEST_SHOWN, SUMMARY_SHOWN = 12, 15, 26, 160
# What the view says when the server answers 403 (the server's own words, which `maas audit` prints).
ADMIN_ONLY = "only an admin may read the audit log"


def when(entry: schemas.AuditEntryOut, short: bool = False) -> str:
    """UTC, to the second; `short` (the TUI's table, where 80 columns are scarce): month, day, minute."""
    return fmt.aware(entry.at).strftime("%m-%d %H:%M" if short else "%Y-%m-%d %H:%M:%S")


def request(entry: schemas.AuditEntryOut) -> str:
    return f"{entry.method} {entry.path}"


def status_text(status: int) -> Text:
    """Refused (4xx) in yellow, failed (5xx) in red: what an auditor looks for first."""
    return Text(str(status), style="bold red" if status >= 500 else "yellow" if status >= 400 else "")


def rows(entries: Iterable[schemas.AuditEntryOut], truncate: bool = True) -> Iterable[Row]:
    """One row per entry, in the order given (the server's: newest first); `truncate` shortens the time and
    cuts long cells to fit a screen (the TUI), the CLI prints them whole."""
    cut = fmt.truncate if truncate else (lambda text, _width: text)
    cut_middle = fmt.middle_truncate if truncate else cut  # a path's last part says what was done
    for e in entries:
        yield str(e.id), (when(e, short=truncate), cut(e.actor, ACTOR_SHOWN), cut(e.address or "-", ADDRESS_SHOWN),
                          cut_middle(request(e), REQUEST_SHOWN), status_text(e.status),
                          cut(" ".join(e.summary.split()) or "-", SUMMARY_SHOWN))


def describe(entry: schemas.AuditEntryOut) -> RenderableType:
    fields = grid()
    fields.add_row("When", when(entry) + " UTC")
    fields.add_row("Actor", Text(entry.actor))
    fields.add_row("From", Text(entry.address or "-"))
    fields.add_row("Request", Text(request(entry)))
    fields.add_row("Status", status_text(entry.status))
    fields.add_row("What", Text(entry.summary or "-", overflow="fold"))  # JSON has no spaces to wrap at
    return fields
