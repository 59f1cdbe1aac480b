"""Who may do what: the one place roles and team memberships are read.

Roles (users.role): `admin` does everything; `operator` runs the cluster (workers, backends, every
team's models and instances, Higress, all usage) but manages no users or teams; `member` works in its
teams (deploys and changes their models, restarts their instances, reads their logs); `viewer` reads
its teams' objects. A member's role in a team (`member` or `viewer`) narrows what it may do there.

An object the caller may not read is answered as missing (404), so names of other teams' models do
not leak; one it may read but not change is a 403.
"""

from __future__ import annotations

from typing import Literal, Protocol

from sqlalchemy import and_, false, or_

from server.db import tables

Access = Literal["read", "write"]


class Caller(Protocol):
    kind: str
    name: str
    role: str
    teams: tuple[tuple[str, str], ...]  # (team, the caller's role in it)

    def team_role(self, team: str | None) -> str | None: ...


def is_admin(caller: Caller) -> bool:
    return caller.kind == "user" and caller.role == "admin"


def runs_cluster(caller: Caller) -> bool:
    """Workers, backends, Higress, every team's models and every key's usage."""
    return caller.kind == "user" and caller.role in ("admin", "operator")


def team_access(caller: Caller, team: str | None) -> Access | None:
    """What the caller may do with the objects of `team` (None: it may not see them)."""
    if caller.kind != "user":
        return None
    if runs_cluster(caller):
        return "write"
    role = caller.team_role(team)
    if role is None:
        return None
    return "read" if "viewer" in (role, caller.role) else "write"


def sees_secrets(caller: Caller, team: str | None) -> bool:
    """Model env values: admins and the owning team's members; operators and viewers see names only."""
    return is_admin(caller) or (caller.kind == "user" and caller.role == "member"
                                and caller.team_role(team) == "member")


def visible_teams(caller: Caller) -> frozenset[str] | None:
    """The teams whose objects the caller may read; None: all of them."""
    if runs_cluster(caller):
        return None
    return frozenset(team for team, _ in caller.teams) if caller.kind == "user" else frozenset()


# Events of cluster objects everyone may read; those of keys and users only their owner (and admins,
# operators): SSH logins carry client addresses.
_PUBLIC_EVENT_KINDS = ("workers", "backends")


def sees_event(caller: Caller, kind: str, team: str | None, object_name: str, actor: str) -> bool:
    if runs_cluster(caller):
        return True
    if kind in _PUBLIC_EVENT_KINDS:
        return caller.kind == "user"
    if team is not None:
        return team in (visible_teams(caller) or ())
    return caller.kind == "user" and caller.name in (object_name, actor)


def event_clause(caller: Caller):
    """`sees_event` as a WHERE clause on the events table (None: every event)."""
    if runs_cluster(caller):
        return None
    if caller.kind != "user":
        return false()
    return or_(tables.Event.kind.in_(_PUBLIC_EVENT_KINDS),
               tables.Event.team.in_(visible_teams(caller) or ()),
               and_(tables.Event.team.is_(None), or_(tables.Event.object_name == caller.name,
                                                     tables.Event.actor == caller.name)))


REDACTED = "<redacted>"


def redact_env(env: dict[str, object]) -> dict[str, object]:
    """Values hidden; references to secrets ({secret: NAME}) kept: they hold no value."""
    return {name: value if isinstance(value, dict) or hasattr(value, "secret") else REDACTED
            for name, value in env.items()}
