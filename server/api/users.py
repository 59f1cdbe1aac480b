"""Users and their SSH public keys, and the short-lived sessions the SSH front door mints.

The SSH front door's logic (keys that may log in, session tokens) lives in
server/services/ssh_sessions.py: the front door calls it directly inside the server process
(`maas start --ssh-port`), and through the routes below when it runs on its own
(`maas ssh serve --server URL`).
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from server import schemas
from server.api.errors import ApiError, bad_request, conflict, forbidden, not_found, read_json
from server.api.permissions import require_admin
from server.api.routing import Query, json_out, principal_of, route, server_of
from server.api.security import hash_password
from server.db import tables
from server.events import record_event
from server.services import ssh_sessions


def parse_public_key(text: str) -> tuple[str, str, str]:
    """(authorized_keys line without options or comment, SHA256 fingerprint, comment) of one OpenSSH public key."""
    import asyncssh

    line = text.strip()
    if not line or "\n" in line:
        raise bad_request("give exactly one public key line (e.g. the content of ~/.ssh/id_ed25519.pub)")
    if "PRIVATE KEY" in line:
        raise bad_request("that is a private key; give the .pub file")
    try:
        key = asyncssh.import_public_key(line)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise bad_request(f"not an OpenSSH public key: {exc}") from None
    comment = key.get_comment() or ""
    key.set_comment(None)
    return key.export_public_key("openssh").decode().strip(), key.get_fingerprint("sha256"), comment


def _check_self_or_admin(request: web.Request, username: str) -> None:
    principal = principal_of(request)
    if not (principal.is_admin or principal.name == username):
        raise forbidden("only an admin or the user themselves may do that")


def _check_admin(request: web.Request) -> None:
    require_admin(request, "do that")


async def _user(session, username: str) -> tables.User:
    user = (await session.execute(select(tables.User).where(tables.User.username == username))).scalar_one_or_none()
    if user is None:
        raise not_found(f"user {username!r}")
    return user


# --- users ------------------------------------------------------------------------


@route("GET", "/v2/users", "List users (admin)", response=schemas.UserOut, response_list=True)
async def list_users(request: web.Request) -> web.Response:
    _check_admin(request)
    async with server_of(request).db.session() as s:
        rows = (await s.execute(select(tables.User).order_by(tables.User.id))).scalars()
        return json_out([schemas.UserOut.model_validate(r) for r in rows])


@route("POST", "/v2/users", "Create a user (admin)", body=schemas.UserCreate, response=schemas.UserOut, status=201)
async def create_user(request: web.Request) -> web.Response:
    _check_admin(request)
    body = await read_json(request, schemas.UserCreate)
    password_hash = await asyncio.to_thread(hash_password, body.password)
    async with server_of(request).db.session() as s:
        user = tables.User(username=body.username, password_hash=password_hash, role=body.role)
        s.add(user)
        try:
            await s.flush()
        except IntegrityError:
            raise conflict(f"a user named {body.username!r} already exists") from None
        if body.role in ("member", "viewer"):  # admins and operators reach every team already
            for name in dict.fromkeys(body.teams):
                team_id = await s.scalar(select(tables.Team.id).where(tables.Team.name == name))
                if team_id is None:
                    raise not_found(f"team {name!r}")
                s.add(tables.TeamMember(team_id=team_id, user_id=user.id, role="viewer" if body.role == "viewer" else "member"))
        record_event(s, "users", user, "Created", f"user {body.username} created", principal_of(request).name)
        await s.commit()
        return json_out(schemas.UserOut.model_validate(user), status=201)


@route("PATCH", "/v2/users/{name}", "Change a user's role, or disable or enable them (admin); a disabled user's "
       "keys and sessions stop at once, on every server", body=schemas.UserUpdate, response=schemas.UserOut)
async def update_user(request: web.Request) -> web.Response:
    _check_admin(request)
    body = await read_json(request, schemas.UserUpdate)
    actor = principal_of(request).name
    async with server_of(request).db.session() as s:
        user = await _user(s, request.match_info["name"])
        if user.username == actor and ((body.role not in (None, "admin")) or body.disabled):
            raise conflict("you cannot take your own admin role away or disable yourself; another admin can")
        if body.role is not None and user.role != body.role:
            record_event(s, "users", user, "RoleChanged", f"{user.role} -> {body.role}", actor)
            user.role = body.role
        if body.disabled is not None and user.disabled != body.disabled:
            record_event(s, "users", user, "Disabled" if body.disabled else "Enabled", "", actor)
            user.disabled = body.disabled
        await s.commit()  # the row is published: every server drops the user's cached credentials
        server_of(request).auth.invalidate()
        return json_out(schemas.UserOut.model_validate(user))


@route("DELETE", "/v2/users/{name}", "Delete a user with their keys, sessions, SSH keys and memberships (admin); "
       "the models of their teams stay")
async def delete_user(request: web.Request) -> web.Response:
    _check_admin(request)
    actor = principal_of(request).name
    async with server_of(request).db.session() as s:
        user = await _user(s, request.match_info["name"])
        if user.username == actor:
            raise conflict("you cannot delete yourself; another admin can")
        for table in (tables.ApiKey, tables.SshKey, tables.TeamMember):  # not left to ON DELETE CASCADE:
            await s.execute(delete(table).where(table.user_id == user.id))  # SQLite enforces no foreign keys
        await s.delete(user)
        record_event(s, "users", user, "Deleted", f"user {user.username} deleted", actor)
        await s.commit()
    server_of(request).auth.invalidate()
    return web.json_response({"deleted": user.username})


# --- SSH keys ---------------------------------------------------------------------


@route("GET", "/v2/users/{name}/keys", "List a user's SSH public keys (admin or self)",
       response=schemas.SshKeyOut, response_list=True)
async def list_ssh_keys(request: web.Request) -> web.Response:
    username = request.match_info["name"]
    _check_self_or_admin(request, username)
    async with server_of(request).db.session() as s:
        user = await _user(s, username)
        rows = (await s.execute(select(tables.SshKey).where(tables.SshKey.user_id == user.id)
                                .order_by(tables.SshKey.id))).scalars()
        return json_out([schemas.SshKeyOut.model_validate(r) for r in rows])


@route("POST", "/v2/users/{name}/keys", "Register an SSH public key for a user (admin or self)",
       body=schemas.SshKeyCreate, response=schemas.SshKeyOut, status=201)
async def add_ssh_key(request: web.Request) -> web.Response:
    username = request.match_info["name"]
    _check_self_or_admin(request, username)
    body = await read_json(request, schemas.SshKeyCreate)
    line, fingerprint, comment = parse_public_key(body.public_key)
    async with server_of(request).db.session() as s:
        user = await _user(s, username)
        existing = (await s.execute(select(tables.SshKey).where(
            tables.SshKey.user_id == user.id, tables.SshKey.fingerprint == fingerprint))).scalar_one_or_none()
        if existing is not None:  # adding the same key twice changes nothing
            return json_out(schemas.SshKeyOut.model_validate(existing), status=200)
        key = tables.SshKey(user_id=user.id, name=body.name or comment or fingerprint, fingerprint=fingerprint,
                            public_key=line)
        s.add(key)
        await s.flush()
        record_event(s, "users", user, "SshKeyAdded", f"SSH key {fingerprint} ({key.name}) added",
                     principal_of(request).name)
        await s.commit()
        return json_out(schemas.SshKeyOut.model_validate(key), status=201)


@route("DELETE", "/v2/users/{name}/keys/{key}", "Remove an SSH key by fingerprint, name or id (admin or self)")
async def delete_ssh_key(request: web.Request) -> web.Response:
    username = request.match_info["name"]
    ref = request.match_info["key"]
    _check_self_or_admin(request, username)
    async with server_of(request).db.session() as s:
        user = await _user(s, username)
        keys = (await s.execute(select(tables.SshKey).where(tables.SshKey.user_id == user.id))).scalars().all()
        matches = [k for k in keys if ref in (k.fingerprint, k.name, str(k.id))]
        if not matches:
            raise not_found(f"SSH key {ref!r} of {username}")
        if len(matches) > 1:
            raise conflict(f"{ref!r} names several keys; give the fingerprint")
        await s.delete(matches[0])
        record_event(s, "users", user, "SshKeyRemoved", f"SSH key {matches[0].fingerprint} removed",
                     principal_of(request).name)
        await s.commit()
    return web.json_response({"deleted": matches[0].fingerprint})


# --- SSH sessions (for a front door running outside the server) ----------------------


@route("GET", "/v2/users/{name}/authorized-keys", "The public keys that may log in as a user (admin)")
async def get_authorized_keys(request: web.Request) -> web.Response:
    _check_admin(request)
    return web.json_response({"items": await ssh_sessions.authorized_keys(server_of(request).db,
                                                                      request.match_info["name"])})


@route("POST", "/v2/users/{name}/sessions", "Mint a session token for a user logging in over SSH (admin)",
       body=schemas.SshSessionCreate, response=schemas.SshSessionOut, status=201)
async def create_ssh_session(request: web.Request) -> web.Response:
    _check_admin(request)
    body = await read_json(request, schemas.SshSessionCreate)
    name = request.match_info["name"]
    try:
        out = await ssh_sessions.mint_ssh_session(server_of(request).db, name, body.fingerprint, body.peer,
                                                  body.ttl_seconds)
    except ssh_sessions.UnknownUser:
        raise not_found(f"user {name!r}") from None
    return json_out(out, status=201)


@route("DELETE", "/v2/users/{name}/sessions/{prefix}", "End an SSH session: revoke its token (admin)",
       query={"reason": Query("why, for the logout event", {"type": "string", "maxLength": 500})})
async def delete_ssh_session(request: web.Request) -> web.Response:
    _check_admin(request)
    name, prefix = request.match_info["name"], request.match_info["prefix"]
    try:
        ended = await ssh_sessions.end_ssh_session(server_of(request).db, name, prefix, request.query.get("reason", ""))
    except ssh_sessions.UnknownUser:
        raise not_found(f"user {name!r}") from None
    if not ended:
        raise not_found(f"session {prefix!r} of {name}")
    server_of(request).auth.invalidate()
    return web.json_response({"deleted": prefix})


__all__ = ["ApiError", "parse_public_key"]
