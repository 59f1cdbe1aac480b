"""The HTTP face of server/services/access.py: a 403 for a role that may not, a 404 for an object
the caller may not see."""

from __future__ import annotations

from aiohttp import web

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
