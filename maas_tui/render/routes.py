"""Model routes: the table columns (targets with their share, fallbacks) and the describe page, for
`maas route list|get`."""

from __future__ import annotations

from datetime import datetime
from typing import Iterable

from rich.console import Group, RenderableType
from rich.text import Text

from maas_tui.render import format as fmt
from maas_tui.render.common import Column, Row, grid, section, small_table
from server import schemas

COLUMNS: list[Column] = [("NAME", None), ("TEAM", None), ("TARGETS", None), ("FALLBACKS", None)]
WIDE_COLUMNS: list[Column] = [("AGE", None)]


def shares(route: schemas.RouteOut) -> list[tuple[str, int, float]]:
    """(model, weight, percent of the requests) per target."""
    total = sum(t.weight for t in route.targets) or 1
    return [(t.model, t.weight, 100.0 * t.weight / total) for t in route.targets]


def _percent(value: float) -> str:
    """95%, 99.5%, 33.3%, 0.01%: never rounded to a share it is not (99.5 is no 100)."""
    text = f"{value:.1f}".rstrip("0").rstrip(".") if value >= 0.1 else f"{value:.2g}"
    return f"{text}%"


def targets_text(route: schemas.RouteOut) -> str:
    return " ".join(f"{model}={_percent(percent)}" for model, _, percent in shares(route))


def rows(routes: Iterable[schemas.RouteOut], now: datetime) -> Iterable[Row]:
    for route in sorted(routes, key=lambda r: r.name):
        yield route.name, (route.name, route.team or "-", targets_text(route), ", ".join(route.fallbacks) or "-",
                           fmt.age(route.created_at, now))


def describe(route: schemas.RouteOut, now: datetime) -> RenderableType:
    fields = grid()
    fields.add_row("Name", Text(route.name))
    fields.add_row("Team", Text(route.team or "-"))
    fields.add_row("Created", fmt.age(route.created_at, now) + " ago")
    table = small_table("MODEL", "WEIGHT", "SHARE", wrap="")
    for model, weight, percent in shares(route):
        table.add_row(Text(model), str(weight), _percent(percent))
    parts: list[RenderableType] = [fields, Text(""), section("Targets (a weighted choice per request)"), table]
    if route.fallbacks:
        parts += [Text(""), section("Fallbacks (in order, when no target answers)"),
                  Text("\n".join(route.fallbacks))]
    return Group(*parts)
