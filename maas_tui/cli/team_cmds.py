"""`maas team ...`: teams own models; users belong to them as members or viewers; a team's quota caps
what its instances claim together (GPUs, GPU memory, host RAM, replicas). Tables and the describe page
come from maas_tui/render/teams.py, as in the TUI's Teams view."""

from __future__ import annotations

from typing import Optional

import typer

from maas_tui.cli import limits_cmds
from maas_tui.cli.output import Format, OutputOption, emit, fail, now, print_renderable, print_rows
from maas_tui.render import teams as render
from server import schemas
from server.schemas import parse_size

team_app = typer.Typer(help="Teams: who owns which models, who may change or read them, and their quotas.",
                       no_args_is_help=True)
secret_app = typer.Typer(help="Team secrets: values a model's env names as {secret: NAME}, encrypted at rest.",
                         no_args_is_help=True)


def _call(work):  # late import: main imports this module
    from maas_tui.cli.main import call

    return call(work)


def _show(teams: schemas.TeamOut | list[schemas.TeamOut], output: Format) -> None:
    """Teams as the TUI's Teams view shows them (table, wide), or the API objects (json, yaml)."""
    if output in (Format.json, Format.yaml):
        emit(teams, output)
        return
    print_rows(render.COLUMNS, render.WIDE_COLUMNS, render.rows(teams if isinstance(teams, list) else [teams], now(),
                                                                truncate=False), output == Format.wide)


@team_app.command("list")
def team_list(output: Format = OutputOption) -> None:
    """Your teams (every team for admins and operators), with their members."""
    _show(_call(lambda c: c.list_teams()), output)


@team_app.command("create")
def team_create(name: str = typer.Argument(..., help="lower-case team name"), output: Format = OutputOption) -> None:
    """Create a team (admin)."""
    _show(_call(lambda c: c.create_team(name)), output)


@team_app.command("delete")
def team_delete(name: str = typer.Argument(..., help="a team that owns no models")) -> None:
    """Delete a team (admin)."""
    _call(lambda c: c.delete_team(name))
    typer.echo(f"team {name} deleted")


@team_app.command("add-member")
def team_add_member(team: str = typer.Argument(...), user: str = typer.Argument(...),
                    role: str = typer.Option("member", help="member (changes the team's models) or viewer (reads them)"),
                    output: Format = OutputOption) -> None:
    """Add a user to a team, or change their role in it (admin)."""
    _show(_call(lambda c: c.set_team_member(team, user, role)), output)


@team_app.command("remove-member")
def team_remove_member(team: str = typer.Argument(...), user: str = typer.Argument(...),
                       output: Format = OutputOption) -> None:
    """Remove a user from a team (admin)."""
    _show(_call(lambda c: c.remove_team_member(team, user)), output)


def _find(name: str) -> schemas.TeamOut:
    team = next((t for t in _call(lambda c: c.list_teams()) if t.name == name), None)
    if team is None:
        fail(f"no team {name!r} (or not one of yours)")
    return team


@team_app.command("describe")
def team_describe(name: str = typer.Argument(...), output: Format = OutputOption) -> None:
    """A team's members, quota and what its instances claim now."""
    team = _find(name)
    if output in (Format.json, Format.yaml):
        emit(team, output)
        return
    print_renderable(render.describe(team, now=now()))


def _limit(option: str, value: str | None, size: bool) -> int | None:
    """A limit as typed: a count (or a size like 80GiB); `unlimited` (or `none`) removes it."""
    if value is None or value.strip().lower() in ("unlimited", "none"):
        return None
    number = parse_size(value) if size else (int(value) if value.strip().isdigit() else None)
    if number is None:
        what = "a size like 80GiB or 512MiB" if size else "a whole number"
        fail(f"{option} {value!r}: give {what}, or 'unlimited'", code=2)
    return number


@team_app.command("quota")
def team_quota(name: str = typer.Argument(...),
               gpus: str | None = typer.Option(None, "--gpus", help="GPUs its instances may claim (or 'unlimited')"),
               vram: str | None = typer.Option(None, "--vram", help="GPU memory they may claim, e.g. 80GiB"),
               ram: str | None = typer.Option(None, "--ram", help="host RAM they may claim, e.g. 64GiB"),
               replicas: str | None = typer.Option(None, "--replicas", help="instances that may hold a claim"),
               clear: bool = typer.Option(False, "--clear", help="remove every limit not given here"),
               output: Format = OutputOption) -> None:
    """Set a team's quota (admin). Limits not given stay as they are (with --clear: unlimited). An instance
    whose placement would take its team over a limit stays pending with the reason quota_exceeded."""
    given = {"gpus": (gpus, "--gpus", False), "vram_bytes": (vram, "--vram", True),
             "ram_bytes": (ram, "--ram", True), "replicas": (replicas, "--replicas", False)}
    if not clear and all(value is None for value, _, _ in given.values()):
        fail("give at least one of --gpus, --vram, --ram, --replicas, or --clear", code=2)
    current = schemas.TeamQuota() if clear else _find(name).quota
    changes = {field: _limit(option, value, size) for field, (value, option, size) in given.items() if value is not None}
    quota = current.model_copy(update=changes)
    _show(_call(lambda c: c.set_team_quota(name, quota)), output)


@team_app.command("limits")
def team_limits(name: str = typer.Argument(...), rpm: Optional[str] = limits_cmds.RPM,
                tpm: Optional[str] = limits_cmds.TPM, max_concurrency: Optional[str] = limits_cmds.MAX_CONCURRENCY,
                budget_day: Optional[str] = limits_cmds.BUDGET_DAY,
                budget_month: Optional[str] = limits_cmds.BUDGET_MONTH, output: Format = OutputOption) -> None:
    """Show or set a team's gateway limits (admins set them): they hold for the requests to the team's models,
    whichever member's key sends them. Limits not given stay as they are ('none' removes one)."""
    limits_cmds.set_or_show("team", name, limits_cmds.changes(rpm, tpm, max_concurrency, budget_day, budget_month),
                            output)


def _team_of(team: str | None) -> str:
    """The team named, else the caller's only team."""
    if team:
        return team
    teams = _call(lambda c: c.list_teams())
    if len(teams) != 1:
        fail("name the team with --team (you see " + (", ".join(t.name for t in teams) or "no team") + ")", code=2)
    return teams[0].name


_SECRET_COLUMNS = [("NAME", lambda s: s.name), ("TEAM", lambda s: s.team), ("UPDATED", lambda s: str(s.updated_at))]


@secret_app.command("set")
def secret_set(name: str = typer.Argument(..., help="the secret's name"),
               team: Optional[str] = typer.Option(None, help="the owning team (default: your only team)"),
               value: Optional[str] = typer.Option(None, help="the value (default: read from standard input, so it "
                                                              "stays out of the shell history)"),
               output: Format = OutputOption) -> None:
    """Set a team secret; a model names it with `--env-secret KEY=NAME` (YAML: env: {KEY: {secret: NAME}})."""
    import sys

    secret = value if value is not None else sys.stdin.read(16 * 1024 + 1).rstrip("\n")
    owner = _team_of(team)
    emit(_call(lambda c: c.set_secret(owner, name, secret)), output, _SECRET_COLUMNS)


@secret_app.command("list")
def secret_list(team: Optional[str] = typer.Option(None, help="the team (default: your only team)"),
                output: Format = OutputOption) -> None:
    """A team's secrets (names only: values are never shown again)."""
    owner = _team_of(team)
    emit(_call(lambda c: c.list_secrets(owner)), output, _SECRET_COLUMNS)


@secret_app.command("delete")
def secret_delete(name: str = typer.Argument(...),
                  team: Optional[str] = typer.Option(None, help="the team (default: your only team)")) -> None:
    """Delete a team secret that no model names."""
    owner = _team_of(team)
    _call(lambda c: c.delete_secret(owner, name))
    typer.echo(f"secret {name} of team {owner} deleted")
