"""`maas audit`: who changed what through /v2, from where, and how it ended (admin). The table comes from
maas_tui/render/audit.py, as in the TUI's Audit view."""

from __future__ import annotations

from typing import Optional

import typer

from maas_tui.cli.output import Format, OutputOption, emit, print_rows
from maas_tui.render import audit as render


def audit(limit: int = typer.Option(100, min=1, max=1000, help="how many entries, newest first"),
          actor: Optional[str] = typer.Option(None, help="only changes by this user"),
          since: Optional[str] = typer.Option(None, help="only since this day, YYYY-MM-DD"),
          output: Format = OutputOption) -> None:
    """The audit log: every change made through the API, newest first (admin). Secrets never appear."""
    from maas_tui.cli.main import call

    entries = call(lambda c: c.audit(limit, actor, since))
    if output in (Format.json, Format.yaml):
        emit(entries, output)
        return
    # WHAT (the request's summary) is the point of an entry: a terminal printing the log has room for it
    # where the TUI's 80 columns have not, so the CLI shows it in both table formats.
    print_rows(render.COLUMNS, render.WIDE_COLUMNS, render.rows(entries, truncate=False), wide=True)


def register(app: typer.Typer) -> None:
    app.command("audit")(audit)
