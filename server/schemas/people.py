"""The wire contract of people and what they own apart from models: users, teams (members, quotas),
team secrets, the audit log and SSH sessions. Re-exported by `server.schemas`."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from server.schemas import DEFAULT_TEAM, TEAM_NAME_PATTERN, Role, Schema, TeamRole


class UserCreate(Schema):
    username: str = Field(pattern=r"^[a-z_][a-z0-9_.-]{0,99}$")
    password: str = Field(min_length=8, max_length=1000)
    role: Role = "member"
    teams: list[str] = Field(default_factory=lambda: [DEFAULT_TEAM], max_length=100, description=(
        "teams the user joins with the role member (viewer for the role viewer); admins and operators need none"))


class UserOut(Schema):
    id: int
    username: str
    role: Role
    disabled: bool = False
    created_at: datetime

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class UserUpdate(Schema):
    role: Role | None = None
    disabled: bool | None = Field(default=None, description="a disabled user's keys and sessions stop at once")


class SecretSet(Schema):
    value: str = Field(min_length=1, max_length=16 * 1024)


class SecretOut(Schema):
    """A secret's name and owner; its value is never read back through the API."""

    name: str
    team: str
    created_at: datetime
    updated_at: datetime


class InstanceSecrets(Schema):
    """For the agent that runs an instance: the values of the secrets its env names."""

    env: dict[str, str]


class AuditEntryOut(Schema):
    id: int
    at: datetime
    actor: str
    address: str = ""
    method: str
    path: str
    status: int
    summary: str = ""


class TeamCreate(Schema):
    name: str = Field(pattern=TEAM_NAME_PATTERN)


class TeamMemberSet(Schema):
    role: TeamRole = "member"


class TeamMemberOut(Schema):
    username: str
    role: TeamRole


_MAX_COUNT = 1_000_000
_MAX_BYTES = 2**62


class TeamQuota(Schema):
    """What a team's instances may claim together (None: unlimited). The scheduler keeps an instance
    `pending` (reason quota_exceeded) while placing it would take its team over any of these."""

    gpus: int | None = Field(default=None, ge=0, le=_MAX_COUNT, description=(
        "GPUs claimed: each GPU an instance claims (even a part of it) counts once per instance"))
    vram_bytes: int | None = Field(default=None, ge=0, le=_MAX_BYTES, description="GPU memory claimed")
    ram_bytes: int | None = Field(default=None, ge=0, le=_MAX_BYTES, description="host RAM claimed")
    replicas: int | None = Field(default=None, ge=0, le=_MAX_COUNT, description="instances that hold a claim")


class TeamUsage(Schema):
    """What a team's instances that hold a claim (scheduled, downloading, starting, running...) claim now."""

    gpus: int = 0
    vram_bytes: int = 0
    ram_bytes: int = 0
    replicas: int = 0


class TeamOut(Schema):
    id: int
    name: str
    members: list[TeamMemberOut] = Field(default_factory=list)
    quota: TeamQuota = Field(default_factory=TeamQuota)
    usage: TeamUsage = Field(default_factory=TeamUsage)
    created_at: datetime


class SshKeyCreate(Schema):
    public_key: str = Field(description="One OpenSSH public key line, e.g. the content of ~/.ssh/id_ed25519.pub")
    name: str = Field("", max_length=200, description="Defaults to the key's comment")


class SshKeyOut(Schema):
    id: int
    name: str
    fingerprint: str
    public_key: str
    created_at: datetime
    last_used_at: datetime | None = None


class SshSessionCreate(Schema):
    """Asked by the SSH front door (admin only) once a user's key is accepted."""

    fingerprint: str = ""
    peer: str = Field("", max_length=200)
    ttl_seconds: int = Field(12 * 3600, ge=60, le=7 * 24 * 3600)


class SshSessionOut(Schema):
    token: str = Field(description="A session token for that user; revoke it with DELETE /v2/users/{name}/sessions/{prefix}")
    prefix: str
    username: str
    expires_at: datetime
