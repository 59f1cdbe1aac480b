"""Engine, sessions, migrations, and the change log every committed change is written to."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from pydantic import BaseModel
from sqlalchemy import event, func, insert, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session

from server import schemas
from server.db import tables
from server.schemas.limits import LimitsOut
from server.schemas.alerts import AlertOut

log = logging.getLogger(__name__)

# Which rows are published, under which kind, in which wire shape.
PUBLISHED: dict[type, tuple[str, type[BaseModel]]] = {
    tables.Worker: ("workers", schemas.WorkerOut),
    tables.Model: ("models", schemas.ModelOut),
    tables.ModelInstance: ("instances", schemas.InstanceOut),
    tables.Event: ("events", schemas.EventOut),
    tables.ApiKey: ("api_keys", schemas.ApiKeyOut),  # internal: caches listen, the watch refuses it
    tables.User: ("users", schemas.UserOut),  # internal: a role or team change drops cached credentials
    tables.ModelFile: ("files", schemas.ModelFileOut),  # agents watch their own rows (pull, remove)
    tables.ModelRoute: ("routes", schemas.RouteOut),  # internal: the gateway's routes follow it
    tables.GatewayLimit: ("limits", LimitsOut),  # internal: the gateways' limiters follow it
    tables.Alert: ("alerts", AlertOut),  # firing and resolved alerts (server/alerts/)
}


def to_wire(obj: Any) -> dict[str, Any]:
    _, schema = PUBLISHED[type(obj)]
    return schema.model_validate(obj).model_dump(mode="json")


SCHEMES = "postgresql://, mysql://, mariadb:// or sqlite:///PATH"


def normalize_url(url: str) -> str:
    """Accept plain `postgresql://`, `mysql://`, `mariadb://` and `sqlite:///` URLs and pick the
    async drivers. MySQL and MariaDB both go through aiomysql (PyMySQL underneath: pure Python,
    so it installs everywhere) with the `mysql` dialect, which detects MariaDB by itself."""
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy.exc.ArgumentError and friends: say what was wrong
        raise ValueError(f"malformed database URL {_redacted(url)!r}: {exc}; use {SCHEMES}") from None
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        parsed = parsed.set(drivername="postgresql+asyncpg")
    elif backend == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    elif backend in ("mysql", "mariadb"):
        if not parsed.database:
            raise ValueError(f"the database URL {parsed.render_as_string()!r} names no database: "
                             "write mysql://USER:PASSWORD@HOST:PORT/DATABASE")
        query = dict(parsed.query)
        query.setdefault("charset", "utf8mb4")  # full Unicode; the tables' own collation is binary
        parsed = parsed.set(drivername="mysql+aiomysql", query=query)
    else:
        raise ValueError(f"unsupported database URL scheme {parsed.drivername!r}: use {SCHEMES}")
    return parsed.render_as_string(hide_password=False)


def _redacted(url: str) -> str:
    """A URL as it may be shown: no password."""
    head, at, tail = url.rpartition("@")
    if not at or "://" not in head:
        return url
    scheme, _, credentials = head.partition("://")
    return f"{scheme}://{credentials.partition(':')[0]}:***@{tail}"


CHANNEL = "maas_changes"


class TrackedSession(Session):
    """Writes every change of a published row to the change log, in the same transaction."""


def _ready_count(session: Session, model_id: int) -> int:
    """Running instances of a model, as flushed (the connection, not the session: no autoflush here)."""
    query = select(func.count()).select_from(tables.ModelInstance).where(
        tables.ModelInstance.model_id == model_id, tables.ModelInstance.state == "running")
    return session.connection().execute(query).scalar_one()


def _model_wire(session: Session, model: tables.Model) -> dict[str, Any]:
    """A model as REST shows it: with its ready count, which its row alone does not hold."""
    wire = to_wire(model)
    wire["ready_replicas"] = _ready_count(session, model.id)
    return wire


@event.listens_for(TrackedSession, "after_flush")
def _collect_changes(session: Session, _flush_context: Any) -> None:
    pending: list[tuple[str, str, dict[str, Any]]] = session.info.setdefault("pending_changes", [])
    published_models: set[int] = set()
    running_moved: set[int] = set()  # models whose count of running instances may have changed
    for action, objects in (("created", session.new), ("updated", session.dirty), ("deleted", session.deleted)):
        for obj in objects:
            if type(obj) not in PUBLISHED:
                continue
            if action == "updated" and not session.is_modified(obj, include_collections=False):
                continue
            if isinstance(obj, tables.Model) and action != "deleted":
                published_models.add(obj.id)
                pending.append(("models", action, _model_wire(session, obj)))
                continue
            if isinstance(obj, tables.ModelInstance):
                state = inspect(obj).attrs.state.history
                if "running" in (state.deleted or ()) or (
                        obj.state == "running" and (action != "updated" or "running" in (state.added or ()))):
                    # A running instance's other changes (a message, a re-report after an agent restart)
                    # leave the count as it was: no count query, no model line for them.
                    running_moved.add(obj.model_id)
            pending.append((PUBLISHED[type(obj)][0], action, to_wire(obj)))
    with session.no_autoflush:
        for model_id in running_moved - published_models:
            model = session.get(tables.Model, model_id)
            if model is not None and model not in session.deleted:
                pending.append(("models", "updated", _model_wire(session, model)))


@event.listens_for(TrackedSession, "after_flush_postexec")
def _log_changes(session: Session, _flush_context: Any) -> None:
    pending = session.info.pop("pending_changes", None)
    if not pending:
        return
    # Added here, these rows are flushed by the commit's next flush pass: same transaction.
    session.add_all(tables.ChangeLog(kind=kind, action=action, object=obj) for kind, action, obj in pending)
    session.info["changed"] = True
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"NOTIFY {CHANNEL}"))  # delivered at commit; duplicates fold into one


async def log_changes(session: AsyncSession, changes: list[dict[str, Any]]) -> None:
    """For writes that bypass the ORM (bulk statements): the change-log rows the session hook
    would write, the NOTIFY for other servers, and a wake-up for this one after the commit."""
    if not changes:
        return
    await session.execute(insert(tables.ChangeLog.__table__), changes)
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(text(f"NOTIFY {CHANNEL}"))
    session.sync_session.info["changed"] = True


@event.listens_for(TrackedSession, "after_commit")
def _wake_feed(session: Session) -> None:
    if session.info.pop("changed", False) and (feed := session.info.get("feed")) is not None:
        feed.wake()


@event.listens_for(TrackedSession, "after_rollback")
def _drop_changes(session: Session) -> None:
    session.info.pop("pending_changes", None)
    session.info.pop("changed", None)


class UnsupportedStore(ValueError):
    """The database server answers, but is a kind or version MaaS-Base cannot use."""


SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_SSL_KEYS = ("sslmode", "sslrootcert", "sslcert", "sslkey")


def postgres_ssl(query: dict[str, Any]) -> Any:
    """libpq's `sslmode`, `sslrootcert`, `sslcert` and `sslkey` URL options as asyncpg's `ssl`
    argument: an `ssl.SSLContext`, a mode name asyncpg handles itself, or None (no options).
    Raises ValueError with a message for the operator on a bad value or an unreadable file."""
    import ssl

    options = {k: query[k] for k in _SSL_KEYS if k in query}
    for key, value in options.items():
        if not isinstance(value, str) or not value:
            raise ValueError(f"the database URL's {key} option must be given once, with a value")
    unknown = sorted(k for k in query if k.startswith("ssl") and k not in _SSL_KEYS)
    if unknown:  # asyncpg would take them for its own arguments and fail with a TypeError
        raise ValueError(f"unsupported TLS option(s) in the database URL: {', '.join(unknown)}; "
                         f"use {', '.join(_SSL_KEYS)}")
    if not options:
        return None
    mode = options.get("sslmode", "prefer")
    if mode not in SSL_MODES:
        raise ValueError(f"sslmode={mode!r} in the database URL: use one of {', '.join(SSL_MODES)}")
    root, cert, key = options.get("sslrootcert"), options.get("sslcert"), options.get("sslkey")
    if mode == "disable":
        return False
    if mode in ("allow", "prefer") and not (root or cert or key):
        return mode  # asyncpg tries TLS and falls back without it, as libpq does
    if bool(cert) != bool(key):
        raise ValueError("the database URL gives " + ("sslcert without sslkey" if cert else "sslkey without sslcert")
                         + ": a client certificate needs both")
    for name, path in (("sslrootcert", root), ("sslcert", cert), ("sslkey", key)):
        if path and path != "system" and not Path(path).expanduser().is_file():
            raise ValueError(f"{name}={path!r} in the database URL: no such file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        if root and root != "system":  # as libpq: this file only, not the system's authorities too
            context.load_verify_locations(cafile=str(Path(root).expanduser()))
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if cert:
            context.load_cert_chain(str(Path(cert).expanduser()), str(Path(key).expanduser()))
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"cannot use the TLS files of the database URL: {exc}") from None
    # As libpq: `require` checks the server's certificate only when a root certificate is given,
    # `verify-ca` checks the chain, `verify-full` the chain and the host name.
    verify = mode in ("verify-ca", "verify-full") or (mode == "require" and root is not None)
    context.check_hostname = mode == "verify-full"
    context.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
    return context


class Database:
    def __init__(self, url: str):
        self.url = normalize_url(url)
        self._session_info: dict[str, Any] = {"feed": None}
        parsed = make_url(self.url)
        self.dialect = parsed.get_backend_name()  # postgresql | mysql | sqlite
        self.is_sqlite = self.dialect == "sqlite"
        # Several servers on one database need LISTEN/NOTIFY and advisory locks: PostgreSQL only.
        self.is_postgres = self.dialect == "postgresql"
        self.raw_connect_args: dict[str, Any] = {}  # for asyncpg.connect (LISTEN, leader lock)
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs.update(pool_size=10, max_overflow=20, pool_pre_ping=True)
        if self.is_postgres:
            ssl_arg = postgres_ssl(dict(parsed.query))
            parsed = parsed.difference_update_query(_SSL_KEYS)
            self.url = parsed.render_as_string(hide_password=False)
            if ssl_arg is not None:
                kwargs["connect_args"] = {"ssl": ssl_arg}
                self.raw_connect_args["ssl"] = ssl_arg
        if self.dialect == "mysql":
            # READ COMMITTED as on PostgreSQL (MySQL's REPEATABLE READ would let a long session
            # read stale rows and take gap locks); recycled before MySQL's idle timeout drops them.
            kwargs.update(isolation_level="READ COMMITTED", pool_recycle=3600)
        self.engine = create_async_engine(self.url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self._sessions = async_sessionmaker(
            self.engine, expire_on_commit=False, sync_session_class=TrackedSession, info=self._session_info
        )

    def set_feed(self, feed: Any) -> None:
        """Who to wake after a commit that changed published rows (the change feed)."""
        self._session_info["feed"] = feed

    @property
    def asyncpg_dsn(self) -> str:
        return make_url(self.url).set(drivername="postgresql").render_as_string(hide_password=False)

    async def connect_raw(self, timeout: float = 10) -> Any:
        """A connection of its own to PostgreSQL (outside the pool), with the URL's TLS settings."""
        import asyncpg

        return await asyncpg.connect(self.asyncpg_dsn, timeout=timeout, **self.raw_connect_args)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        async with self._sessions() as session:
            yield session

    async def migrate(self, revision: str = "head") -> None:
        """Upgrade the schema to `revision` (the newest by default)."""
        from alembic import command
        from alembic.config import Config

        migrations = Path(__file__).parent / "migrations"
        config = Config()
        config.set_main_option("script_location", str(migrations))

        def upgrade(connection: Any) -> None:
            config.attributes["connection"] = connection
            command.upgrade(config, revision)

        if not self.is_sqlite:
            async with self.engine.begin() as conn:
                if self.dialect == "mysql" and not conn.dialect.insert_returning:
                    version = ".".join(str(v) for v in conn.dialect.server_version_info or ())
                    raise UnsupportedStore(
                        f"{'MariaDB' if conn.dialect.is_mariadb else 'MySQL'} {version} lacks INSERT ... RETURNING, "
                        "which MaaS-Base needs: use MariaDB 10.5 or newer, PostgreSQL or SQLite")
                await conn.run_sync(upgrade)
            return
        # SQLite: Alembic's batch mode changes a table by copying it, dropping the original and
        # renaming the copy. With foreign keys enforced (as every connection here has them), that
        # DROP TABLE runs the children's ON DELETE actions: 0004's rebuild of `models` deleted
        # every instance and revision, its rebuild of `workers` unassigned every instance. So
        # enforcement is off while the schema changes (the pragma only works outside a
        # transaction), and the result is checked before it commits.
        async with self.engine.connect() as conn:
            await conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            await conn.commit()
            try:
                async with conn.begin():
                    await conn.run_sync(upgrade)
                    broken = (await conn.exec_driver_sql("PRAGMA foreign_key_check")).all()
                    if broken:
                        raise RuntimeError(f"the schema upgrade left rows with dangling references: {broken[:10]}")
            finally:
                await conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                await conn.commit()

    async def dispose(self) -> None:
        await self.engine.dispose()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
