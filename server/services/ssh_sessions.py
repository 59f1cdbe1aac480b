"""The SSH front door's side of users: which keys may log in, and the short-lived session tokens it mints.

`maas start --ssh-port` runs the front door inside the server process, where it calls these through
`InProcessSshBackend`; on its own (`maas ssh serve --server URL`) it reaches the same functions through
the `/v2/users/{name}/ssh-...` routes (server/api/users.py).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from server import schemas
from server.api.security import hash_secret, new_user_token
from server.db import tables
from server.db.database import Database
from server.events import record_event


class UnknownUser(LookupError):
    """No user of that name (the handlers answer 404)."""


async def _user(session: Any, username: str) -> tables.User:
    user = (await session.execute(select(tables.User).where(tables.User.username == username))).scalar_one_or_none()
    if user is None:
        raise UnknownUser(username)
    return user


async def authorized_keys(db: Database, username: str) -> list[str]:
    """The public keys that may log in as `username` (empty for an unknown user)."""
    async with db.session() as s:
        rows = (await s.execute(select(tables.SshKey.public_key).join(tables.User).where(
            tables.User.username == username).order_by(tables.SshKey.id))).scalars()
        return list(rows)


async def mint_ssh_session(db: Database, username: str, fingerprint: str = "", peer: str = "",
                           ttl_seconds: int = 12 * 3600) -> schemas.SshSessionOut:
    """A session token for `username`, recorded as an SSH login event."""
    token, prefix = new_user_token()
    expires = datetime.now(UTC) + timedelta(seconds=ttl_seconds)
    async with db.session() as s:
        user = await _user(s, username)
        s.add(tables.ApiKey(user_id=user.id, kind="session", name=f"ssh-{prefix}", prefix=prefix,
                            secret_hash=hash_secret(token), expires_at=expires))
        if fingerprint:
            key = (await s.execute(select(tables.SshKey).where(
                tables.SshKey.user_id == user.id, tables.SshKey.fingerprint == fingerprint))).scalar_one_or_none()
            if key is not None:
                key.last_used_at = datetime.now(UTC)
        record_event(s, "users", user, "SshLogin",
                     f"{username} logged in over SSH" + (f" from {peer}" if peer else "")
                     + (f" with key {fingerprint}" if fingerprint else ""), username)
        await s.commit()
    return schemas.SshSessionOut(token=token, prefix=prefix, username=username, expires_at=expires)


async def end_ssh_session(db: Database, username: str, prefix: str, reason: str = "") -> bool:
    """Revoke the session token minted for one SSH session and record the logout."""
    async with db.session() as s:
        user = await _user(s, username)
        key = (await s.execute(select(tables.ApiKey).where(
            tables.ApiKey.user_id == user.id, tables.ApiKey.kind == "session",
            tables.ApiKey.prefix == prefix))).scalar_one_or_none()
        if key is None:
            return False
        await s.delete(key)
        record_event(s, "users", user, "SshLogout", f"{username} left the SSH session" + (f": {reason}" if reason else ""),
                     username)
        await s.commit()
    return True


class InProcessSshBackend:
    """The front door's backend (maas_tui/ssh/server.py `Backend`) inside the server process: these
    functions on the server's own database, and its credential cache dropped when a session ends."""

    def __init__(self, server: Any):
        self.server = server
        self.server_url = server.url

    async def authorized_keys(self, username: str) -> list[str]:
        return await authorized_keys(self.server.db, username)

    async def open_session(self, username: str, fingerprint: str, peer: str) -> tuple[str, str]:
        out = await mint_ssh_session(self.server.db, username, fingerprint, peer)
        return out.token, out.prefix

    async def close_session(self, username: str, prefix: str, reason: str) -> None:
        await end_ssh_session(self.server.db, username, prefix, reason)
        self.server.auth.invalidate()
