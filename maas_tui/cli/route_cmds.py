"""`maas route ...`: model routes, aliases that clients call like a model, weighted between target
models with fallbacks (canaries: deploy a new model, shift weight, delete the old one). Tables and the
describe page come from maas_tui/render/routes.py."""

from __future__ import annotations

from typing import Optional

import typer

from maas_tui.cli.output import Format, OutputOption, emit, fail, now, print_renderable, print_rows
from maas_tui.render import routes as render
from server import schemas

route_app = typer.Typer(help="Model routes: aliases weighted between models, with fallbacks (canaries).",
                        no_args_is_help=True)

TO_HELP = "a target as MODEL=WEIGHT (repeat: --to new=5 --to old=95); the weights are shares of the requests"


def _call(work):  # late import: main imports this module
    from maas_tui.cli.main import call

    return call(work)


def parse_targets(values: list[str]) -> list[schemas.RouteTarget]:
    """MODEL=WEIGHT items (MODEL alone: weight 1); a wrong item is a usage error naming it."""
    targets = []
    for value in values:
        model, sep, weight = value.rpartition("=") if "=" in value else (value, "", "1")
        if not model or not weight.isdigit() or int(weight) < 1:
            fail(f"--to {value!r}: write MODEL=WEIGHT with a whole weight of 1 or more", code=2)
        try:
            targets.append(schemas.RouteTarget(model=model, weight=int(weight)))
        except ValueError as exc:
            fail(f"--to {value!r}: {str(exc).splitlines()[-1].strip()}", code=2)
    return targets


def _show(routes: schemas.RouteOut | list[schemas.RouteOut], output: Format) -> None:
    if output in (Format.json, Format.yaml):
        emit(routes, output)
        return
    print_rows(render.COLUMNS, render.WIDE_COLUMNS, render.rows(routes if isinstance(routes, list) else [routes], now()),
               output == Format.wide)


@route_app.command("list")
def route_list(output: Format = OutputOption) -> None:
    """The routes of your teams (every route for admins and operators)."""
    _show(_call(lambda c: c.list_routes()), output)


@route_app.command("get")
def route_get(name: str, output: Format = OutputOption) -> None:
    """One route: its targets with their share of the requests, and its fallbacks."""
    found = _call(lambda c: c.get_route(name))
    if output in (Format.json, Format.yaml, Format.wide):
        _show(found, output)
    else:
        print_renderable(render.describe(found, now()))


@route_app.command("create")
def route_create(name: str = typer.Argument(..., help="what clients send as `model`; no model may have it"),
                 to: list[str] = typer.Option(..., "--to", help=TO_HELP),
                 fallback: Optional[list[str]] = typer.Option(None, "--fallback",
                                                              help="a model tried when no target answers (repeat)"),
                 team: Optional[str] = typer.Option(None, help="the owning team (default: your only team)"),
                 output: Format = OutputOption) -> None:
    """Create a route: clients call NAME like a model; each request goes to one target, by weight."""
    try:
        body = schemas.RouteCreate(name=name, team=team, targets=parse_targets(to), fallbacks=fallback or [])
    except ValueError as exc:
        fail(str(exc).splitlines()[-1].strip(), code=2)
    _show(_call(lambda c: c.create_route(body)), output)


@route_app.command("update")
def route_update(name: str,
                 to: Optional[list[str]] = typer.Option(None, "--to", help=TO_HELP + "; replaces all the targets"),
                 fallback: Optional[list[str]] = typer.Option(None, "--fallback", help="replaces the fallbacks (repeat)"),
                 no_fallback: bool = typer.Option(False, "--no-fallback", help="remove every fallback"),
                 output: Format = OutputOption) -> None:
    """Change a route's targets and weights (shift a canary's share) or its fallbacks."""
    if fallback and no_fallback:
        fail("give --fallback or --no-fallback, not both", code=2)
    if not to and fallback is None and not no_fallback:
        fail("nothing to change: give --to, --fallback or --no-fallback", code=2)
    try:
        body = schemas.RouteUpdate(targets=parse_targets(to) if to else None,
                                   fallbacks=[] if no_fallback else fallback or None)
    except ValueError as exc:
        fail(str(exc).splitlines()[-1].strip(), code=2)
    _show(_call(lambda c: c.update_route(name, body)), output)


@route_app.command("delete")
def route_delete(name: str) -> None:
    """Delete a route (its target models stay)."""
    _call(lambda c: c.delete_route(name))
    typer.echo(f"route {name} deleted")
