"""The wire contract of alerts: the alerts themselves (firing, resolved), silences and webhooks.

The rules that raise alerts live in server/alerts/rules.py (server side); their names are here too, so the
CLI and the TUI can check a silence's rule before they send it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from server.schemas import Schema

Severity = Literal["critical", "warning"]
AlertState = Literal["firing", "resolved"]
ALERTS_KIND = "alerts"  # the watch kind and the events' kind

# The rules (server/alerts/rules.py holds what triggers each); a silence names one of these.
RULE_NAMES: tuple[str, ...] = ("InstanceFailing", "RolloutStalled", "WorkerNotReady", "MemoryDrift",
                               "GpuTemperature", "LimitNearlyReached")

SILENCE_LONGEST = 30 * 24 * 3600  # a silence ends within 30 days: a forgotten one must not hide alerts for ever


class AlertOut(Schema):
    id: int
    rule: str
    severity: Severity
    state: AlertState
    object_kind: str = Field(description="workers, models, instances, gpus, teams, ...")
    object_name: str
    team: str | None = None
    message: str = ""
    silenced: bool = Field(default=False, description="a silence matched when it fired: not sent to webhooks")
    started_at: datetime
    resolved_at: datetime | None = None
    updated_at: datetime


class SilenceCreate(Schema):
    rule: str = Field(description="a rule's name: " + ", ".join(RULE_NAMES))
    object_name: str | None = Field(default=None, min_length=1, max_length=140,
                                    description="only alerts about this object (default: every object)")
    duration_seconds: int = Field(ge=60, le=SILENCE_LONGEST, description="how long it lasts")
    comment: str = Field(default="", max_length=500)

    @field_validator("rule")
    @classmethod
    def _known_rule(cls, value: str) -> str:
        if value not in RULE_NAMES:
            raise ValueError(f"unknown rule {value!r}; the rules are {', '.join(RULE_NAMES)}")
        return value


class SilenceOut(Schema):
    id: int
    rule: str
    object_name: str | None = None
    comment: str = ""
    created_by: str
    created_at: datetime
    ends_at: datetime
    active: bool = False


class WebhookCreate(Schema):
    url: str = Field(min_length=8, max_length=2000)
    secret: str | None = Field(default=None, min_length=8, max_length=500,
                               description="signs each body (HMAC-SHA256, header X-MaaS-Signature); kept encrypted")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        problem = webhook_url_problem(value)
        if problem:
            raise ValueError(problem)
        return value


def webhook_url_problem(url: str) -> str:
    """Why `url` cannot be a webhook ("" when it can): http or https, a host, no credentials in it."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return f"not a URL: {exc}"
    if parts.scheme not in ("http", "https"):
        return "a webhook URL is http:// or https://"
    if not parts.hostname:
        return "a webhook URL names a host"
    if parts.username or parts.password:
        return "put no credentials in a webhook URL: give --secret to sign the bodies instead"
    if any(ch.isspace() or ord(ch) < 32 for ch in url):
        return "a webhook URL has no spaces or control characters"
    return ""


class WebhookOut(Schema):
    id: int
    url: str
    signed: bool = Field(description="whether a secret signs the bodies")
    created_by: str
    created_at: datetime
    last_status: str = Field(default="", description="how the last delivery ended")
    last_delivered_at: datetime | None = None


# The JSON body a webhook receives, one alert per request.
class AlertNotification(Schema):
    version: Literal[1] = 1
    status: AlertState
    alert: AlertOut
