"""Who may set and read gateway limits (server/gateway/limits.py enforces them).

- An API key's limits: its owner and admins. A key's limits only narrow what its owner may do: every
  request also passes its team's and its model's limits, so a member who raises (or removes) their own
  key's limits gains nothing beyond what the team and model allow.
- A team's limits: admins (as for team quotas). They hold for the requests to the team's models, by any
  of its members' keys: a team's consumption is what its models serve.
- A model's limits: admins and operators, who run the cluster's capacity.
- Reading: admins and operators read every limit; others the limits of their own keys, of their teams and
  of their teams' models.
"""

from __future__ import annotations

from typing import Any

from server.schemas.limits import LIMIT_FIELDS, Limits
from server.services import access


def may_set(caller: Any, scope: str, owner_id: int | None = None) -> str | None:
    """None when the caller may set limits of this scope (for a key: the one owned by `owner_id`), else
    what only others may do, for the 403."""
    if scope == "key":
        return None if access.is_admin(caller) or owner_id == caller.user_id else "set another user's key limits"
    if scope == "team":
        return None if access.is_admin(caller) else "set team limits"
    return None if access.runs_cluster(caller) else "set model limits"


def may_read(caller: Any, scope: str, owner_id: int | None, team: str | None) -> bool:
    """`team`: the team's (scope team) or the model's team (scope model)."""
    if access.runs_cluster(caller):
        return True
    if scope == "key":
        return owner_id == caller.user_id
    return access.team_access(caller, team) is not None


def merged(current: Limits, change: Limits) -> Limits:
    """The limits after a change: the fields the change gives (null removes one), the others as they were."""
    return current.model_copy(update={name: getattr(change, name) for name in change.model_fields_set
                                      if name in LIMIT_FIELDS})


def summary(limits: Limits) -> str:
    return ", ".join(f"{name}={getattr(limits, name)}" for name in LIMIT_FIELDS
                     if getattr(limits, name) is not None) or "none"
