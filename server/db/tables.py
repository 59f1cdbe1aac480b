"""SQLAlchemy 2 tables. Column names match the wire schemas so `XOut.model_validate(row)` works."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (JSON, BigInteger, Boolean, Date, DateTime, Float, ForeignKey, Integer, String, Text,
                        UniqueConstraint, false)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


@compiles(DateTime, "mysql")
def _mysql_datetime(_type: DateTime, _compiler: Any, **_kw: Any) -> str:
    # MySQL's DATETIME keeps whole seconds unless told otherwise; microseconds as elsewhere.
    # A DateTime in any migration (this module is loaded before they run) gets it too.
    return "DATETIME(6)"


@compiles(Float, "mysql")
def _mysql_float(type_: Float, compiler: Any, **kw: Any) -> str:
    # MySQL's FLOAT is single precision; PostgreSQL's and SQLite's are double. Same values everywhere.
    return "DOUBLE" if type_.precision is None else compiler.visit_float(type_, **kw)


class UtcDateTime(TypeDecorator):
    """A timestamp that comes back timezone-aware (UTC) from every store.

    PostgreSQL keeps the zone itself (timestamptz). SQLite and MySQL/MariaDB store a plain
    date and time: values are written converted to UTC and read back marked as UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None or dialect.name == "postgresql" or value.tzinfo is None:
            return value  # naive values are UTC already (as every writer here makes them)
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UtcDateTime()}


# SQLite would otherwise reuse the id of the newest deleted row; ids must never come back
# (agents, logs and events refer to instances by id). MySQL/MariaDB: utf8mb4 with the binary
# collation, so names are unique case-sensitively as on PostgreSQL (the migrations say the same).
MYSQL_TABLE = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}
NO_ID_REUSE = {"sqlite_autoincrement": True, **MYSQL_TABLE}


class Timestamps:
    # Python-side defaults: values are known after flush without a round trip,
    # which the commit hook needs to publish complete rows.
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class User(Base, Timestamps):
    __tablename__ = "users"
    __table_args__ = NO_ID_REUSE
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(100), unique=True)
    password_hash: Mapped[str] = mapped_column(String(300))
    role: Mapped[str] = mapped_column(String(16), default="member", server_default="member")  # schemas.Role
    disabled: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class Team(Base, Timestamps):
    """Teams own models; users belong to teams with a role in each (server/services/access.py)."""

    __tablename__ = "teams"
    __table_args__ = (UniqueConstraint("name", name="uq_teams_name"), NO_ID_REUSE)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    # Quotas (schemas.TeamQuota; None: unlimited), read by the scheduler (server/scheduler/service.py).
    quota_gpus: Mapped[int | None] = mapped_column(Integer, default=None)
    quota_vram_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    quota_ram_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    quota_replicas: Mapped[int | None] = mapped_column(Integer, default=None)


class Secret(Base, Timestamps):
    """A team's secret, encrypted with the servers' secrets key (server/services/secrets.py)."""

    __tablename__ = "secrets"
    __table_args__ = (UniqueConstraint("team", "name", name="uq_secrets_team_name"), NO_ID_REUSE)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    team: Mapped[str] = mapped_column(ForeignKey("teams.name", ondelete="CASCADE", name="fk_secrets_team"))
    name: Mapped[str] = mapped_column(String(100))
    ciphertext: Mapped[str] = mapped_column(Text)


class TeamMember(Base):
    __tablename__ = "team_members"
    __table_args__ = MYSQL_TABLE
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True)
    role: Mapped[str] = mapped_column(String(16), default="member")  # schemas.TeamRole
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base, Timestamps):
    __tablename__ = "api_keys"
    __table_args__ = (UniqueConstraint("user_id", "kind", "name", name="uq_api_keys_user_kind_name"), NO_ID_REUSE)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16), default="api")  # "api" or "session"
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    scopes: Mapped[list[Any]] = mapped_column(default=lambda: ["management", "inference"])
    allowed_models: Mapped[list[Any]] = mapped_column(default=list)  # empty: every model


class Worker(Base, Timestamps):
    __tablename__ = "workers"
    __table_args__ = NO_ID_REUSE
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    address: Mapped[str] = mapped_column(String(255))
    agent_port: Mapped[int] = mapped_column(Integer)
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(32), default="ready")
    state_message: Mapped[str] = mapped_column(Text, default="")
    cordoned: Mapped[bool] = mapped_column(Boolean, default=False)
    draining: Mapped[bool] = mapped_column(Boolean, default=False)  # cordoned, and its instances move away
    gpus: Mapped[list[Any]] = mapped_column(default=list)
    host: Mapped[dict[str, Any]] = mapped_column(default=dict)
    token_hash: Mapped[str] = mapped_column(String(128), default="")
    # What the server presents to the agent's own HTTP endpoint (logs); given to the agent at registration.
    agent_secret: Mapped[str] = mapped_column(String(128), default="")
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)


class Model(Base, Timestamps):
    __tablename__ = "models"
    __table_args__ = NO_ID_REUSE
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    spec: Mapped[dict[str, Any]] = mapped_column()
    replicas: Mapped[int] = mapped_column(Integer, default=1)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(String(32), default="active")
    paused: Mapped[bool] = mapped_column(Boolean, default=False)  # rollout paused
    max_surge: Mapped[int] = mapped_column(Integer, default=1)
    max_unavailable: Mapped[int] = mapped_column(Integer, default=0)
    rollout_message: Mapped[str] = mapped_column(Text, default="")  # why a rollout is stuck, when it is
    # The owning team, by name (teams are not renamed): the wire keeps it without a join.
    team: Mapped[str | None] = mapped_column(ForeignKey("teams.name", name="fk_models_team"), index=True, default=None)
    # The rollout bench gate (schemas.BenchGateSet as a dict; None: none) and the newest generation it judged:
    # while a newer one waits for its verdict, the rollout holds after its first replica (controllers/rollout.py).
    bench_gate: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), default=None)  # None: SQL NULL
    bench_gate_generation: Mapped[int] = mapped_column(Integer, default=0)
    # Autoscaling (server/controllers/autoscale.py): on when max_replicas is set; `replicas` is then the autoscaler's.
    min_replicas: Mapped[int | None] = mapped_column(Integer, default=None)
    max_replicas: Mapped[int | None] = mapped_column(Integer, default=None)
    target_concurrency: Mapped[int] = mapped_column(Integer, default=8, server_default="8")
    scale_down_delay: Mapped[float] = mapped_column(Float, default=60.0, server_default="60")
    idle_timeout: Mapped[float] = mapped_column(Float, default=900.0, server_default="900")
    cold_start_timeout: Mapped[float] = mapped_column(Float, default=120.0, server_default="120")
    priority: Mapped[str] = mapped_column(String(40), default="normal", server_default="normal")
    scale_reason: Mapped[str] = mapped_column(Text, default="")  # the autoscaler's last decision and why
    scaled_at: Mapped[datetime | None] = mapped_column(default=None)


class GatewayLoad(Base):
    """Each server's gateway load per model ({model: [in flight, held, requests]}), rewritten every second or
    two by that server; the leader's autoscaler sums the fresh rows. Not published on the bus: it changes
    too often to be a watched change."""

    __tablename__ = "gateway_loads"
    __table_args__ = MYSQL_TABLE
    server_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    loads: Mapped[dict[str, Any]] = mapped_column(default=dict)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelRevision(Base):
    """Each spec a model has had, by the generation that introduced it (for history and undo)."""

    __tablename__ = "model_revisions"
    __table_args__ = (UniqueConstraint("model_id", "revision", name="uq_model_revisions_model_revision"), NO_ID_REUSE)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    spec: Mapped[dict[str, Any]] = mapped_column()
    change: Mapped[str] = mapped_column(Text, default="")  # what made it: created, spec change, restart, undo
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelInstance(Base, Timestamps):
    __tablename__ = "model_instances"
    __table_args__ = NO_ID_REUSE
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(140), unique=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    model_name: Mapped[str] = mapped_column(String(100))
    team: Mapped[str | None] = mapped_column(String(100), index=True, default=None)  # its model's
    generation: Mapped[int] = mapped_column(Integer)
    spec: Mapped[dict[str, Any]] = mapped_column()
    state: Mapped[str] = mapped_column(String(32), default="pending", index=True)
    state_message: Mapped[str] = mapped_column(Text, default="")
    worker_id: Mapped[int | None] = mapped_column(ForeignKey("workers.id", ondelete="SET NULL"), index=True, default=None)
    worker_name: Mapped[str | None] = mapped_column(String(100), default=None)
    address: Mapped[str | None] = mapped_column(String(255), default=None)
    port: Mapped[int | None] = mapped_column(Integer, default=None)
    pid: Mapped[int | None] = mapped_column(Integer, default=None)
    claim: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    schedule_reasons: Mapped[list[Any]] = mapped_column(default=list)
    restart_count: Mapped[int] = mapped_column(Integer, default=0)
    download_progress: Mapped[float | None] = mapped_column(Float, default=None)  # 0..1 while downloading


class Event(Base):
    __tablename__ = "events"
    __table_args__ = NO_ID_REUSE
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    object_id: Mapped[int | None] = mapped_column(Integer, default=None)
    object_name: Mapped[str] = mapped_column(String(140))
    reason: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text, default="")
    actor: Mapped[str] = mapped_column(String(140), default="")
    team: Mapped[str | None] = mapped_column(String(100), default=None)  # the object's team, if it has one
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class AuditEntry(Base):
    """One change made through /v2: who, from where, what (the request, secrets left out), how it ended."""

    __tablename__ = "audit_log"
    __table_args__ = NO_ID_REUSE
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(140), index=True)
    address: Mapped[str] = mapped_column(String(100), default="")
    method: Mapped[str] = mapped_column(String(10))
    path: Mapped[str] = mapped_column(String(500))
    status: Mapped[int] = mapped_column(Integer)
    summary: Mapped[str] = mapped_column(Text, default="")


class Setting(Base, Timestamps):
    """Cluster-wide values that must live in the database (several servers may share it)."""

    __tablename__ = "settings"
    __table_args__ = MYSQL_TABLE
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Usage(Base):
    """Gateway usage per hour, API key, model and route. Rows are upserted in batches by the gateway."""

    __tablename__ = "usage"
    __table_args__ = (UniqueConstraint("day", "hour", "api_key_id", "model_name", "route",
                                       name="uq_usage_hour_key_model_route"), NO_ID_REUSE)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    day: Mapped[date] = mapped_column(Date, index=True)
    hour: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # 0-23, UTC
    # Kept when the key is revoked: the name and owner stay readable for billing.
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"), default=None)
    api_key_name: Mapped[str] = mapped_column(String(100))
    user_id: Mapped[int | None] = mapped_column(Integer, default=None, index=True)
    model_name: Mapped[str] = mapped_column(String(100))  # the model that served (a route's target)
    route: Mapped[str] = mapped_column(String(100), default="", server_default="")  # the route called, "" for none
    team: Mapped[str] = mapped_column(String(100), default="", server_default="")  # the model's team then
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)


class ChangeLog(Base):
    """Every committed row change, in commit order: the event bus's durable side.

    Written in the same transaction as the change; each server follows it (woken by
    NOTIFY on PostgreSQL) and publishes the rows to its local subscribers. Its id is the
    resource version the watch stream hands out, the same on every server.
    """

    __tablename__ = "change_log"
    __table_args__ = NO_ID_REUSE
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(16))
    object: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class SshKey(Base):
    """A public key that lets its user into the TUI over SSH (`maas user add-key`)."""

    __tablename__ = "ssh_keys"
    __table_args__ = (UniqueConstraint("user_id", "fingerprint", name="uq_ssh_keys_user_fingerprint"), NO_ID_REUSE)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))  # the key's comment, or what the operator named it
    fingerprint: Mapped[str] = mapped_column(String(100))  # SHA256:...
    public_key: Mapped[str] = mapped_column(Text)  # one authorized_keys line, without options
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)


class ModelRoute(Base, Timestamps):
    """An alias clients call like a model: weighted between target models, with fallbacks (server/services/routes.py)."""

    __tablename__ = "model_routes"
    __table_args__ = (UniqueConstraint("name", name="uq_model_routes_name"), NO_ID_REUSE)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    team: Mapped[str | None] = mapped_column(String(100), index=True, default=None)  # its targets' team
    targets: Mapped[list[Any]] = mapped_column(default=list)  # [{"model": NAME, "weight": N}], weights > 0
    fallbacks: Mapped[list[Any]] = mapped_column(default=list)  # model names tried after every target


class ModelFile(Base, Timestamps):
    """A model source in one worker's cache (issue 19; server/services/files.py): pulled on request or by a
    launch, reported by the worker's agent with what it read of the files (for estimates without the hub)."""

    __tablename__ = "model_files"
    __table_args__ = (UniqueConstraint("worker_id", "source", name="uq_model_files_worker_source"), NO_ID_REUSE)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    worker_id: Mapped[int] = mapped_column(ForeignKey("workers.id", ondelete="CASCADE", name="fk_model_files_worker"))
    worker_name: Mapped[str] = mapped_column(String(100))
    source: Mapped[str] = mapped_column(String(500), index=True)  # schemas.file_key of the source
    revision: Mapped[str | None] = mapped_column(String(100), default=None)
    path: Mapped[str] = mapped_column(Text, default="")
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[str] = mapped_column(String(16), default="pending")  # schemas.FileState
    progress: Mapped[float | None] = mapped_column(Float, default=None)
    message: Mapped[str] = mapped_column(Text, default="")
    file_metadata: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)  # the agent's reading
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)


class Alert(Base):
    """An alert raised by a rule (server/alerts/rules.py) about one object; firing until its condition ends."""

    __tablename__ = "alerts"
    __table_args__ = NO_ID_REUSE
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rule: Mapped[str] = mapped_column(String(64))
    severity: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), index=True)  # firing | resolved
    object_kind: Mapped[str] = mapped_column(String(32))
    object_name: Mapped[str] = mapped_column(String(140))
    team: Mapped[str | None] = mapped_column(String(100), default=None)  # the object's, for who may read it
    message: Mapped[str] = mapped_column(Text, default="")
    silenced: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class AlertSilence(Base):
    """While it lasts, alerts of its rule (about its object, or any) are not sent to webhooks."""

    __tablename__ = "alert_silences"
    __table_args__ = NO_ID_REUSE
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rule: Mapped[str] = mapped_column(String(64))
    object_name: Mapped[str | None] = mapped_column(String(140), default=None)
    comment: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(140))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    ends_at: Mapped[datetime] = mapped_column(index=True)


class AlertWebhook(Base):
    """Where alerts are POSTed; the signing secret encrypted like team secrets (server/services/secrets.py)."""

    __tablename__ = "alert_webhooks"
    __table_args__ = NO_ID_REUSE
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    secret_ciphertext: Mapped[str | None] = mapped_column(Text, default=None)
    created_by: Mapped[str] = mapped_column(String(140))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_status: Mapped[str] = mapped_column(String(300), default="")
    last_delivered_at: Mapped[datetime | None] = mapped_column(default=None)


class BenchResult(Base):
    """One benchmark of a model's generation: by `maas bench` (through the gateway) or by the rollout gate."""

    __tablename__ = "bench_results"
    __table_args__ = NO_ID_REUSE
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    model_name: Mapped[str] = mapped_column(String(100))
    generation: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(16))  # cli | gate
    instance: Mapped[str | None] = mapped_column(String(140), default=None)
    created_by: Mapped[str] = mapped_column(String(140))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    max_tokens: Mapped[int] = mapped_column(Integer)
    levels: Mapped[list[Any]] = mapped_column()  # schemas.bench.BenchLevel dicts


class GatewayLimit(Base, Timestamps):
    """Limits on an API key, a team or a model (schemas.Limits; server/gateway/limits.py enforces them).
    Exactly one of api_key_id, team, model is set, as `scope` says; each goes with what it limits."""

    __tablename__ = "gateway_limits"
    __table_args__ = (UniqueConstraint("api_key_id", name="uq_gateway_limits_api_key_id"),
                      UniqueConstraint("team", name="uq_gateway_limits_team"),
                      UniqueConstraint("model", name="uq_gateway_limits_model"), NO_ID_REUSE)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scope: Mapped[str] = mapped_column(String(16))  # schemas.LimitScope
    api_key_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_keys.id", ondelete="CASCADE", name="fk_gateway_limits_api_key"), default=None)
    team: Mapped[str | None] = mapped_column(
        ForeignKey("teams.name", ondelete="CASCADE", name="fk_gateway_limits_team"), default=None)
    model: Mapped[str | None] = mapped_column(
        ForeignKey("models.name", ondelete="CASCADE", name="fk_gateway_limits_model"), default=None)
    rpm: Mapped[int | None] = mapped_column(BigInteger, default=None)
    tpm: Mapped[int | None] = mapped_column(BigInteger, default=None)
    max_concurrency: Mapped[int | None] = mapped_column(BigInteger, default=None)
    budget_day: Mapped[int | None] = mapped_column(BigInteger, default=None)
    budget_month: Mapped[int | None] = mapped_column(BigInteger, default=None)


class GatewayLimitCounter(Base):
    """One server's count for one limited key, team or model in the current minute window, and its requests
    in flight: how the servers sharing a PostgreSQL see the cluster's total (server/gateway/limit_exchange.py)."""

    __tablename__ = "gateway_limit_counters"
    __table_args__ = MYSQL_TABLE
    server_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    scope: Mapped[str] = mapped_column(String(16), primary_key=True)
    subject: Mapped[str] = mapped_column(String(100), primary_key=True)
    window_index: Mapped[int] = mapped_column(BigInteger)  # the window's index: seconds since the epoch // its length
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    in_flight: Mapped[int] = mapped_column(Integer, default=0)
    # Its parts of the limits (what it may admit while it has peers), and its demand: the requests that asked
    # since its last exchange, admitted or refused (the parts follow it: server/gateway/limit_exchange.py).
    cap_requests: Mapped[int] = mapped_column(BigInteger, default=0)
    cap_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cap_in_flight: Mapped[int] = mapped_column(BigInteger, default=0)
    demand: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
