"""The wire contract of gateway limits: requests and tokens per minute, concurrent requests and token
budgets per day and month, set on an API key, a team or a model (server/gateway/limits.py enforces
them; server/services/limits.py says who may set which)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from server.schemas import Schema

LimitScope = Literal["key", "team", "model"]
LIMIT_FIELDS = ("rpm", "tpm", "max_concurrency", "budget_day", "budget_month")
_MAX = 10**15


class Limits(Schema):
    """Each limit is None (none) or a whole number; 0 refuses every request."""

    rpm: int | None = Field(default=None, ge=0, le=_MAX, description="requests per minute")
    tpm: int | None = Field(default=None, ge=0, le=_MAX, description=(
        "tokens per minute: prompt + completion, counted from the usage each answer reports (streams too)"))
    max_concurrency: int | None = Field(default=None, ge=0, le=_MAX, description="requests in flight at once")
    budget_day: int | None = Field(default=None, ge=0, le=_MAX, description="tokens per UTC day")
    budget_month: int | None = Field(default=None, ge=0, le=_MAX, description="tokens per UTC calendar month")

    def any(self) -> bool:
        return any(getattr(self, name) is not None for name in LIMIT_FIELDS)


class LimitsSet(Limits):
    """A change of limits: the fields given are set (null removes that limit), the others stay."""


class LimitsOut(Limits):
    """One row of limits, as published on the bus (kind `limits`, internal: the gateways follow it)."""

    id: int
    scope: LimitScope
    api_key_id: int | None = None
    team: str | None = None
    model: str | None = None


class LimitUsage(Schema):
    """What this server's limiter counts now: the current minute's requests and tokens (the cluster's,
    as of the last exchange between servers), requests in flight, and tokens used in the budget periods."""

    requests: int = 0
    tokens: int = 0
    in_flight: int = 0
    tokens_today: int = 0
    tokens_this_month: int = 0


class LimitsListed(LimitsOut):
    subject: str = Field(description="the key's name, the team or the model")
    owner: str | None = Field(default=None, description="a key's owner")
    usage: LimitUsage = Field(default_factory=LimitUsage)
