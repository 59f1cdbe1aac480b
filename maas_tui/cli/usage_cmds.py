"""`maas usage`: gateway requests and tokens summed by day, hour, team, model, route, key and/or user,
over a span (`--since 7d`, `--since 24h` or a date). Columns from maas_tui/render/usage.py."""

from __future__ import annotations

from typing import Optional

import typer

from maas_tui.cli.output import Format, OutputOption, emit, fail
from maas_tui.render import usage as render

BY_HELP = "group by any of " + ", ".join(render.GROUPS) + " (comma-separated, in the order of the columns)"


def register(app: typer.Typer) -> None:
    @app.command()
    def usage(by: str = typer.Option("day,key,model", "--by", help=BY_HELP),
              since: Optional[str] = typer.Option(None, help="first day (YYYY-MM-DD) or a span back: 7d, 24h"),
              until: Optional[str] = typer.Option(None, help="last day, YYYY-MM-DD"),
              output: Format = OutputOption) -> None:
        """Gateway usage: requests and tokens by day, hour, team, model, route, API key and user. A request
        through a model route counts under the model that served it, with the route beside it."""
        from maas_tui.cli.main import call  # late import: main imports this module

        groups = [g.strip() for g in by.split(",") if g.strip()]
        unknown = [g for g in groups if g not in render.GROUPS]
        if unknown or not groups:
            fail(f"--by: unknown grouping {', '.join(unknown) or '(none)'}; choose from {', '.join(render.GROUPS)}",
                 code=2)
        emit(call(lambda c: c.usage(",".join(groups), since, until)), output, render.table_columns(groups))
