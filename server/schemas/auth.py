"""The wire contract of signing in: logins, API keys, sessions, and the gateway usage the keys run up.
Re-exported by `server.schemas`."""

from __future__ import annotations

from datetime import date, datetime
from typing import Literal

from pydantic import Field

from server.schemas import Schema


class LoginRequest(Schema):
    username: str = Field(min_length=1, max_length=100)
    password: str = Field(min_length=1, max_length=1000)


class LoginResponse(Schema):
    token: str
    username: str
    expires_at: datetime


Scope = Literal["management", "inference"]
SCOPES: tuple[str, ...] = ("management", "inference")


class ApiKeyCreate(Schema):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    expires_in_days: int | None = Field(default=None, ge=1, le=3650)
    scopes: list[Scope] = Field(default_factory=lambda: ["inference"], min_length=1, description=(
        "management: the /v2 API; inference: the /v1 gateway (the default: a key for an application)"))
    allowed_models: list[str] = Field(default_factory=list, max_length=1000,
                                      description="models this key may call through /v1; empty: all")


class ApiKeyOut(Schema):
    id: int
    name: str
    prefix: str
    scopes: list[Scope] = Field(default_factory=lambda: list(SCOPES))
    allowed_models: list[str] = Field(default_factory=list)
    created_at: datetime
    expires_at: datetime | None = None
    last_used_at: datetime | None = None


class ApiKeyListed(ApiKeyOut):
    owner: str = Field(description="the user the key belongs to")


class SessionOut(Schema):
    """A login session (from `maas login` or the SSH front door): revocable, never readable again."""

    prefix: str
    username: str
    kind: Literal["login", "ssh"]
    created_at: datetime
    expires_at: datetime | None = None
    last_used_at: datetime | None = None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="The secret. Shown once; only its hash is stored.")


class UsageRow(Schema):
    """Gateway usage summed over whatever the query grouped by; absent groupings are None."""

    day: date | None = None
    hour: int | None = None  # 0-23 UTC, with by=hour
    api_key: str | None = None
    model: str | None = None  # the model that served (a route's target)
    route: str | None = None  # the route called ("" for the model called by its own name)
    team: str | None = None
    user: str | None = None
    requests: int
    prompt_tokens: int
    completion_tokens: int
