"""Teams own models; users belong to teams with a role in each (server/services/access.py).

Admins create and delete teams, set who belongs to them and their quotas; everyone else sees the teams
they are in, with each team's quota and what its instances claim now (usage).
A change of membership touches the user's row, so every server drops the cached credentials of
that user through the change feed (like a revoked key).
"""

from __future__ import annotations

from aiohttp import web
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError

from server import schemas
from server.api.errors import ApiError, conflict, not_found, read_json
from server.api.permissions import require_admin
from server.api.routing import json_out, principal_of, route, server_of
from server.db import tables
from server.db.database import log_changes
from server.db.tables import utcnow
from server.events import record_event
from server.scheduler.placement import Usage, claim_cost
from server.scheduler.service import team_quota, team_wire
from server.scheduler.snapshot import CLAIMING
from server.services import access


async def _team(session, name: str) -> tables.Team:
    team = (await session.execute(select(tables.Team).where(tables.Team.name == name))).scalar_one_or_none()
    if team is None:
        raise not_found(f"team {name!r}")
    return team


async def team_usage(session, names: list[str]) -> dict[str, Usage]:
    """What the instances of these teams that hold a claim claim now: the sum the scheduler's
    snapshot counts against each team's quota (server/scheduler/snapshot.py)."""
    usage: dict[str, Usage] = {name: Usage() for name in names}
    rows = await session.execute(select(tables.ModelInstance.team, tables.ModelInstance.claim).where(
        tables.ModelInstance.team.in_(names), tables.ModelInstance.state.in_([s.value for s in CLAIMING]),
        tables.ModelInstance.worker_id.is_not(None), tables.ModelInstance.claim.is_not(None)))
    for team, raw in rows:
        try:
            claim = schemas.ResourceClaim.model_validate(raw)
        except ValueError:
            continue  # the scheduler counts nothing for a claim it cannot read either
        usage[team].add(claim_cost(claim))
    return usage


async def _team_out(session, team: tables.Team, usage: Usage | None = None) -> schemas.TeamOut:
    members = (await session.execute(
        select(tables.User.username, tables.TeamMember.role).join(tables.TeamMember)
        .where(tables.TeamMember.team_id == team.id).order_by(tables.User.username))).all()
    if usage is None:
        usage = (await team_usage(session, [team.name]))[team.name]
    return schemas.TeamOut(id=team.id, name=team.name, created_at=team.created_at,
                           members=[schemas.TeamMemberOut(username=u, role=r) for u, r in members],
                           quota=team_quota(team), usage=usage.to_out())


async def _user(session, username: str) -> tables.User:
    user = (await session.execute(select(tables.User).where(tables.User.username == username))).scalar_one_or_none()
    if user is None:
        raise not_found(f"user {username!r}")
    return user


def _credentials_changed(request: web.Request, user: tables.User) -> None:
    user.updated_at = utcnow()  # published: every server forgets this user's cached credentials
    server_of(request).auth.invalidate()


@route("GET", "/v2/teams", "List teams with their members (yours; every team for admins and operators)",
       response=schemas.TeamOut, response_list=True)
async def list_teams(request: web.Request) -> web.Response:
    query = select(tables.Team).order_by(tables.Team.name)
    if (teams := access.visible_teams(principal_of(request))) is not None:
        query = query.where(tables.Team.name.in_(teams))
    async with server_of(request).db.session() as s:
        teams = (await s.execute(query)).scalars().all()
        usage = await team_usage(s, [t.name for t in teams])
        return json_out([await _team_out(s, t, usage[t.name]) for t in teams])


@route("POST", "/v2/teams", "Create a team (admin)", body=schemas.TeamCreate, response=schemas.TeamOut, status=201)
async def create_team(request: web.Request) -> web.Response:
    require_admin(request, "create teams")
    body = await read_json(request, schemas.TeamCreate)
    async with server_of(request).db.session() as s:
        team = tables.Team(name=body.name)
        s.add(team)
        try:
            await s.flush()
        except IntegrityError:
            raise conflict(f"a team named {body.name!r} already exists") from None
        record_event(s, "teams", team, "Created", f"team {body.name} created", principal_of(request).name)
        await s.commit()
        return json_out(await _team_out(s, team), status=201)


@route("DELETE", "/v2/teams/{name}", "Delete a team that owns no models (admin)")
async def delete_team(request: web.Request) -> web.Response:
    require_admin(request, "delete teams")
    name = request.match_info["name"]
    async with server_of(request).db.session() as s:
        team = await _team(s, name)
        owned = await s.scalar(select(func.count()).select_from(tables.Model).where(tables.Model.team == name))
        if owned:
            raise ApiError(409, "team_in_use", f"team {name!r} owns {owned} models: delete them first")
        users = (await s.execute(select(tables.User).join(tables.TeamMember)
                                 .where(tables.TeamMember.team_id == team.id))).scalars().all()
        for user in users:
            _credentials_changed(request, user)
        await s.execute(delete(tables.TeamMember).where(tables.TeamMember.team_id == team.id))
        # Published: a team made again under this name starts without the quota (the scheduler) or the
        # limits (the gateways' limiters: its gateway_limits row goes by ON DELETE CASCADE, unannounced).
        await log_changes(s, [{"kind": "teams", "action": "deleted", "object": team_wire(team),
                               "created_at": utcnow()}])
        await s.delete(team)
        record_event(s, "teams", team, "Deleted", f"team {name} deleted", principal_of(request).name)
        await s.commit()
    return web.json_response({"deleted": name})


@route("PUT", "/v2/teams/{name}/members/{username}", "Add a user to a team, or change their role in it (admin)",
       body=schemas.TeamMemberSet, response=schemas.TeamOut)
async def set_member(request: web.Request) -> web.Response:
    require_admin(request, "change who belongs to a team")
    body = await read_json(request, schemas.TeamMemberSet)
    async with server_of(request).db.session() as s:
        team = await _team(s, request.match_info["name"])
        user = await _user(s, request.match_info["username"])
        member = await s.get(tables.TeamMember, (team.id, user.id))
        if member is None:
            s.add(tables.TeamMember(team_id=team.id, user_id=user.id, role=body.role))
        else:
            member.role = body.role
        _credentials_changed(request, user)
        record_event(s, "teams", team, "MemberSet", f"{user.username}: {body.role}", principal_of(request).name)
        await s.commit()
        return json_out(await _team_out(s, team))


@route("DELETE", "/v2/teams/{name}/members/{username}", "Remove a user from a team (admin)", response=schemas.TeamOut)
async def remove_member(request: web.Request) -> web.Response:
    require_admin(request, "change who belongs to a team")
    async with server_of(request).db.session() as s:
        team = await _team(s, request.match_info["name"])
        user = await _user(s, request.match_info["username"])
        member = await s.get(tables.TeamMember, (team.id, user.id))
        if member is None:
            raise not_found(f"user {user.username!r} in team {team.name!r}")
        await s.delete(member)
        _credentials_changed(request, user)
        record_event(s, "teams", team, "MemberRemoved", user.username, principal_of(request).name)
        await s.commit()
        return json_out(await _team_out(s, team))


@route("PUT", "/v2/teams/{name}/quota", "Set a team's quota: GPUs, GPU memory, host RAM and replicas its instances "
       "may claim together; a field left out or null is unlimited (admin)", body=schemas.TeamQuota,
       response=schemas.TeamOut)
async def set_quota(request: web.Request) -> web.Response:
    require_admin(request, "set team quotas")
    body = await read_json(request, schemas.TeamQuota)
    async with server_of(request).db.session() as s:
        team = await _team(s, request.match_info["name"])
        before = team_quota(team)
        for field in schemas.TeamQuota.model_fields:
            setattr(team, f"quota_{field}", getattr(body, field))
        if before != body:
            limits = ", ".join(f"{k}={v}" for k, v in body.model_dump().items() if v is not None) or "unlimited"
            record_event(s, "teams", team, "QuotaSet", limits, principal_of(request).name)
            # Published for the scheduler of every server (kind `teams`; the watch does not offer it).
            await log_changes(s, [{"kind": "teams", "action": "updated", "object": team_wire(team),
                                   "created_at": utcnow()}])
        await s.commit()
        return json_out(await _team_out(s, team))
