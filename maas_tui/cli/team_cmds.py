"""`maas team ...`: teams own models; users belong to them as members or viewers."""

from __future__ import annotations

import typer

from maas_tui.cli.output import Format, OutputOption, emit

team_app = typer.Typer(help="Teams: who owns which models, and who may change or read them.", no_args_is_help=True)

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
