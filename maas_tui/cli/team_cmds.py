"""`maas team ...`: teams own models; users belong to them as members or viewers."""

from __future__ import annotations

from typing import Optional

import typer

from maas_tui.cli.output import Format, OutputOption, emit, fail

team_app = typer.Typer(help="Teams: who owns which models, and who may change or read them.", no_args_is_help=True)
secret_app = typer.Typer(help="Team secrets: values a model's env names as {secret: NAME}, encrypted at rest.",
                         no_args_is_help=True)

_COLUMNS = [("NAME", lambda t: t.name),
            ("MEMBERS", lambda t: ", ".join(f"{m.username}({m.role})" for m in t.members) or "-")]


def _call(work):  # late import: main imports this module
    from maas_tui.cli.main import call

    return call(work)


@team_app.command("list")
def team_list(output: Format = OutputOption) -> None:
    """Your teams (every team for admins and operators), with their members."""
    emit(_call(lambda c: c.list_teams()), output, _COLUMNS)


@team_app.command("create")
def team_create(name: str = typer.Argument(..., help="lower-case team name"), output: Format = OutputOption) -> None:
    """Create a team (admin)."""
    emit(_call(lambda c: c.create_team(name)), output, _COLUMNS)


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
    emit(_call(lambda c: c.set_team_member(team, user, role)), output, _COLUMNS)


@team_app.command("remove-member")
def team_remove_member(team: str = typer.Argument(...), user: str = typer.Argument(...),
                       output: Format = OutputOption) -> None:
    """Remove a user from a team (admin)."""
    emit(_call(lambda c: c.remove_team_member(team, user)), output, _COLUMNS)


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
