"""Engine, sessions, migrations, and the change log every committed change is written to."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from pydantic import BaseModel
from sqlalchemy import event, insert, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session

from server import schemas
from server.db import tables

log = logging.getLogger(__name__)

# Which rows are published, under which kind, in which wire shape.
PUBLISHED: dict[type, tuple[str, type[BaseModel]]] = {
    tables.Worker: ("workers", schemas.WorkerOut),
    tables.Model: ("models", schemas.ModelOut),
    tables.ModelInstance: ("instances", schemas.InstanceOut),
    tables.Event: ("events", schemas.EventOut),
    tables.ApiKey: ("api_keys", schemas.ApiKeyOut),  # internal: caches listen, the watch refuses it
}


def to_wire(obj: Any) -> dict[str, Any]:
    _, schema = PUBLISHED[type(obj)]
    return schema.model_validate(obj).model_dump(mode="json")


def normalize_url(url: str) -> str:
    """Accept plain `postgresql://` and `sqlite:///` URLs and pick the async drivers."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        parsed = parsed.set(drivername="postgresql+asyncpg")
    elif backend == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    else:
        raise ValueError(f"unsupported database URL scheme {parsed.drivername!r}: use postgresql:// or sqlite:///PATH")
    return parsed.render_as_string(hide_password=False)


CHANNEL = "maas_changes"


class TrackedSession(Session):
    """Writes every change of a published row to the change log, in the same transaction."""


@event.listens_for(TrackedSession, "after_flush")
def _collect_changes(session: Session, _flush_context: Any) -> None:
    pending: list[tuple[str, str, dict[str, Any]]] = session.info.setdefault("pending_changes", [])
    for action, objects in (("created", session.new), ("updated", session.dirty), ("deleted", session.deleted)):
        for obj in objects:
            if type(obj) not in PUBLISHED:
                continue
            if action == "updated" and not session.is_modified(obj, include_collections=False):
                continue
            pending.append((PUBLISHED[type(obj)][0], action, to_wire(obj)))


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


class Database:
    def __init__(self, url: str):
        self.url = normalize_url(url)
        self._session_info: dict[str, Any] = {"feed": None}
        self.is_sqlite = self.url.startswith("sqlite")
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs.update(pool_size=10, max_overflow=20, pool_pre_ping=True)
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
