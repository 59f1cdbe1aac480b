"""`maas audit`: who changed what through /v2, from where, and how it ended (admin)."""

from __future__ import annotations

from typing import Optional

import typer

from maas_tui.cli.output import Format, OutputOption, emit

_COLUMNS = [("WHEN", lambda e: e.at.strftime("%Y-%m-%d %H:%M:%S")), ("ACTOR", lambda e: e.actor),
            ("FROM", lambda e: e.address or "-"), ("REQUEST", lambda e: f"{e.method} {e.path}"),
            ("STATUS", lambda e: str(e.status)), ("WHAT", lambda e: e.summary or "-")]


def audit(limit: int = typer.Option(100, min=1, max=1000, help="how many entries, newest first"),
          actor: Optional[str] = typer.Option(None, help="only changes by this user"),
          since: Optional[str] = typer.Option(None, help="only since this day, YYYY-MM-DD"),
          output: Format = OutputOption) -> None:
    """The audit log: every change made through the API, newest first (admin). Secrets never appear."""
    from maas_tui.cli.main import call

    emit(call(lambda c: c.audit(limit, actor, since)), output, _COLUMNS)


def register(app: typer.Typer) -> None:
    app.command("audit")(audit)
