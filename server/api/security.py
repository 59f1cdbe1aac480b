"""Secrets: password hashing, token minting and the credential check with its cache."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from sqlalchemy import select

from server.api.errors import parse_whole_number
from server.db import tables
from server.services import access
from server.db.database import Database

SESSION_LIFETIME = timedelta(days=7)


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)
    return f"scrypt${salt.hex()}${digest.hex()}"


# Checked against when the user does not exist, so a login takes the same time either way.
_NOBODY = f"scrypt${'00' * 16}${'00' * 64}"


def verify_password_or_nobody(password: str, stored: str | None) -> bool:
    valid = verify_password(password, stored or _NOBODY)
    return valid and stored is not None


class LoginThrottle:
    """Failed logins per user name and per client address in a sliding minute: past the limit, a
    429 with the seconds until the oldest failure leaves the window. In memory, per server: with N
    servers an attacker gets at most N times the limit."""

    WINDOW = 60.0

    def __init__(self, per_user: int = 5, per_address: int = 20, keep: int = 10_000):
        self.limits = {"user": per_user, "address": per_address}
        self.keep = keep
        self._failures: dict[tuple[str, str], list[float]] = {}

    def _recent(self, key: tuple[str, str], now: float) -> list[float]:
        times = [t for t in self._failures.get(key, ()) if now - t < self.WINDOW]
        if times:
            self._failures[key] = times
        else:
            self._failures.pop(key, None)
        return times

    def retry_after(self, username: str, address: str) -> float:
        """Seconds to wait before trying again (0: go ahead)."""
        now = time.monotonic()
        wait = 0.0
        for kind, value in (("user", username), ("address", address)):
            times = self._recent((kind, value), now)
            if len(times) >= self.limits[kind]:
                wait = max(wait, self.WINDOW - (now - times[0]))
        return wait

    def failed(self, username: str, address: str) -> None:
        if len(self._failures) > self.keep:
            self._failures.clear()  # a flood of names: forget rather than grow
        now = time.monotonic()
        for key in (("user", username), ("address", address)):
            self._failures.setdefault(key, []).append(now)

    def succeeded(self, username: str) -> None:
        self._failures.pop(("user", username), None)


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, salt_hex, digest_hex = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    try:
        salt = bytes.fromhex(salt_hex)
    except ValueError:
        return False
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)
    return hmac.compare_digest(digest.hex(), digest_hex)


def hash_secret(secret: str) -> str:
    """Tokens are long and random, so one SHA-256 is enough (and fast on the request path)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_user_token() -> tuple[str, str]:
    """(full token, prefix). Format `maas_<prefix>_<secret>`; the prefix finds the row."""
    prefix = secrets.token_hex(6)
    return f"maas_{prefix}_{secrets.token_urlsafe(32)}", prefix


def new_worker_token(worker_id: int) -> str:
    return f"maasw_{worker_id}_{secrets.token_urlsafe(32)}"


def new_cluster_token() -> str:
    return f"maasc_{secrets.token_urlsafe(32)}"


ALL_SCOPES = frozenset({"management", "inference"})
_NEGATIVE_SECONDS = 5.0  # unknown tokens are looked up again after this


@dataclass(frozen=True, slots=True)
class Principal:
    kind: Literal["user", "worker", "registrar"]
    name: str
    user_id: int | None = None
    worker_id: int | None = None
    role: str = "viewer"  # schemas.Role; server/services/access.py reads it
    teams: tuple[tuple[str, str], ...] = ()  # (team, role in it)
    scopes: frozenset[str] = ALL_SCOPES
    allowed_models: frozenset[str] = frozenset()  # empty: every model
    api_key_id: int | None = None
    api_key_name: str = ""
    expires_at: datetime | None = None

    @property
    def is_admin(self) -> bool:
        return self.kind == "user" and self.role == "admin"

    def team_role(self, team: str | None) -> str | None:
        return next((role for name, role in self.teams if name == team), None)

    def may_use_model(self, model: str, team: str | None) -> bool:
        """Through /v1: a model of one of the caller's teams (any, for admins and operators) that the
        key's allow-list names, when it has one."""
        if self.allowed_models and model not in self.allowed_models:
            return False
        return access.team_access(self, team) is not None


class Authenticator:
    """Turns a bearer token into a Principal without database work on the request path:
    a verified token stays cached until a key or worker change on the bus invalidates
    it, and expiry is checked on every use. Unknown tokens are cached for a few seconds.
    Requests that bring a token not cached yet share one lookup (a new key's first burst of
    clients costs one query, not one per client)."""

    def __init__(self, db: Database):
        self.db = db
        self._known: dict[str, Principal] = {}
        self._unknown: dict[str, float] = {}
        self._lookups: dict[str, asyncio.Future[Principal | None]] = {}
        self._generation = 0  # moves on each invalidation: what a lookup begun before one found is not cached
        self.cluster_token_hash: str | None = None

    def invalidate(self, worker_id: int | None = None) -> None:
        """Forget cached credentials: those of one worker, or all of them."""
        self._generation += 1
        self._lookups.clear()
        self._unknown.clear()
        if worker_id is None:
            self._known.clear()
            return
        for key, principal in list(self._known.items()):
            if principal.worker_id == worker_id:
                self._known.pop(key, None)

    async def authenticate(self, token: str) -> Principal | None:
        key = hash_secret(token)
        principal = self._known.get(key)
        if principal is None:
            now = time.monotonic()
            if self._unknown.get(key, 0.0) > now:
                return None
            generation = self._generation
            lookup = self._lookups.get(key)
            if lookup is None:
                lookup = self._lookups[key] = asyncio.ensure_future(self._lookup(token, key))
                lookup.add_done_callback(lambda done: self._lookup_done(key, done))
            principal = await asyncio.shield(lookup)  # a client that leaves does not cancel the others' lookup
            current = generation == self._generation  # else credentials changed meanwhile: not cached
            if principal is None:
                if len(self._unknown) > 100_000:
                    self._unknown.clear()
                if current:
                    self._unknown[key] = now + _NEGATIVE_SECONDS
                return None
            if current:
                self._known[key] = principal
        if principal.expires_at is not None and principal.expires_at <= datetime.now(UTC):
            return None
        return principal

    def _lookup_done(self, key: str, done: asyncio.Future[Principal | None]) -> None:
        if self._lookups.get(key) is done:
            del self._lookups[key]
        if not done.cancelled():
            done.exception()  # retrieved: every waiter may have left

    async def _lookup(self, token: str, token_hash: str) -> Principal | None:
        if token.startswith("maasc_"):
            if self.cluster_token_hash and hmac.compare_digest(token_hash, self.cluster_token_hash):
                return Principal(kind="registrar", name="registrar", scopes=frozenset())
            return None
        parts = token.split("_", 2)
        if len(parts) != 3:
            return None
        worker_id = parse_whole_number(parts[1], low=1) if parts[0] == "maasw" else None
        if worker_id is not None:
            async with self.db.session() as s:
                worker = await s.get(tables.Worker, worker_id)
            if worker and worker.token_hash and hmac.compare_digest(worker.token_hash, token_hash):
                return Principal(kind="worker", name=worker.name, worker_id=worker.id, scopes=frozenset())
            return None
        if parts[0] == "maas":
            async with self.db.session() as s:
                row = (await s.execute(
                    select(tables.ApiKey, tables.User).join(tables.User).where(tables.ApiKey.prefix == parts[1])
                )).first()
            if row is None:
                return None
            api_key, user = row
            if not hmac.compare_digest(api_key.secret_hash, token_hash) or user.disabled:
                return None
            async with self.db.session() as s:
                teams = tuple((t, r) for t, r in (await s.execute(
                    select(tables.Team.name, tables.TeamMember.role).join(tables.TeamMember)
                    .where(tables.TeamMember.user_id == user.id).order_by(tables.Team.name))).all())
            return Principal(kind="user", name=user.username, user_id=user.id, role=user.role, teams=teams,
                             scopes=frozenset(api_key.scopes), allowed_models=frozenset(api_key.allowed_models),
                             api_key_id=api_key.id, api_key_name=api_key.name,
                             expires_at=_aware(api_key.expires_at) if api_key.expires_at else None)
        return None


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything we store is UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
