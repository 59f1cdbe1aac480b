"""Teams: the table columns (members, then used/limit per quota) and the describe page (members and a
QUOTA/USED/LIMIT/LEFT table), for `maas team list|describe` and the TUI's Teams view."""

from __future__ import annotations

from datetime import datetime
from typing import Callable, Iterable

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from maas_tui.render import format as fmt
from maas_tui.render.common import Column, Row, grid, section, small_table
from server import schemas

# (TeamQuota field, header, how a value prints)
QUOTAS: list[tuple[str, str, Callable[[int], str]]] = [
    ("gpus", "GPUS", str), ("vram_bytes", "VRAM", fmt.iec_bytes), ("ram_bytes", "RAM", fmt.iec_bytes),
    ("replicas", "REPLICAS", str)]
COLUMNS: list[Column] = [("NAME", None), ("MEMBERS", None)] + [(header, None) for _, header, _ in QUOTAS]
WIDE_COLUMNS: list[Column] = [("AGE", None)]
MEMBERS_SHOWN = 14  # characters of the member list in the TUI's table (the describe page has them all)


def members(team: schemas.TeamOut, roles: bool = True) -> str:
    return ", ".join(f"{m.username} ({m.role})" if roles else m.username for m in team.members)


def used_of(team: schemas.TeamOut, field: str, show: Callable[[int], str]) -> str:
    """`used/limit`, or `used/-` without a limit."""
    limit = getattr(team.quota, field)
    return f"{show(getattr(team.usage, field))}/{'-' if limit is None else show(limit)}"


def _used_text(team: schemas.TeamOut, field: str, show: Callable[[int], str]) -> Text:
    limit = getattr(team.quota, field)
    full = limit is not None and getattr(team.usage, field) >= limit
    return Text(used_of(team, field, show), style="bold yellow" if full else "")


def rows(teams: Iterable[schemas.TeamOut], now: datetime, truncate: bool = True) -> Iterable[Row]:
    """One row per team, by name; `truncate` cuts the member list to fit a screen (the TUI), the CLI
    prints it whole. A quota that is used up shows in yellow (the next instance would wait)."""
    for team in sorted(teams, key=lambda t: t.name):
        names = members(team, roles=False) or "-"  # the roles are on the describe page
        yield team.name, (team.name, fmt.truncate(names, MEMBERS_SHOWN) if truncate else names,
                          *(_used_text(team, field, show) for field, _, show in QUOTAS),
                          fmt.age(team.created_at, now))


def quota_table(team: schemas.TeamOut) -> Table:
    table = small_table("QUOTA", "USED", "LIMIT", "LEFT", wrap="")
    for field, header, show in QUOTAS:
        used, limit = getattr(team.usage, field), getattr(team.quota, field)
        table.add_row(header.lower(), show(used), "unlimited" if limit is None else show(limit),
                      "-" if limit is None else show(max(0, limit - used)))
    return table


def describe(team: schemas.TeamOut, *, now: datetime) -> RenderableType:
    fields = grid()
    fields.add_row("Name", Text(team.name))
    fields.add_row("Members", Text(members(team) or "none"))
    fields.add_row("Created", fmt.age(team.created_at, now) + " ago")
    return Group(fields, Text(""), section("Quota"),
                 quota_table(team))

