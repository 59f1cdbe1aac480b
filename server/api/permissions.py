"""The HTTP face of server/services/access.py: a 403 for a role that may not, a 404 for an object
the caller may not see."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import Select, select

from server.api.errors import ApiError, forbidden, not_found
from server.api.routing import principal_of
from server.services import access


def require_cluster_role(request: web.Request, doing: str) -> None:
    """Workers, backends, Higress: admins and operators."""
    if not access.runs_cluster(principal_of(request)):
        raise forbidden(f"only admins and operators may {doing}")


def require_admin(request: web.Request, doing: str) -> None:
    if not access.is_admin(principal_of(request)):
        raise forbidden(f"only an admin may {doing}")


def require_team(request: web.Request, team: str | None, what: str, write: bool = False) -> None:
    """`what` belongs to `team`: missing for callers outside it, read-only for its viewers."""
    granted = access.team_access(principal_of(request), team)
    if granted is None:
        raise not_found(what)
    if write and granted != "write":
        raise ApiError(403, "forbidden", f"{what} belongs to team {team}, where you may only read")


def visible_teams(request: web.Request) -> frozenset[str] | None:
    return access.visible_teams(principal_of(request))


def only_visible(request: web.Request, query: Select, team_column: Any) -> Select:
    """`query` narrowed to the rows of the caller's teams (every row for admins and operators)."""
    if (teams := visible_teams(request)) is not None:
        query = query.where(team_column.in_(teams))
    return query


async def team_row(request: web.Request, session: Any, table: Any, where: Any, what: str, write: bool = False) -> Any:
    """The one row of `table` matching `where` (a team-owned object: model, instance, route) if the caller
    may see it, and change it with `write`: a 404 naming `what` when it is missing or outside the caller's teams."""
    row = (await session.execute(select(table).where(where))).scalar_one_or_none()
    if row is None:
        raise not_found(what)
    require_team(request, row.team, what, write)
    return row
