"""What a failure of the database means: unreachable (a 503, reconnect and retry) or contention
(the statement lost a race: send it again). Used by the API's error middleware, the stale-read
cache, the change feed and the leader election; imports the drivers only when asked."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for a log line."""
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def database_unavailable(exc: BaseException) -> bool:
    """True when `exc` (or what caused it) says the database cannot be reached right now: a lost
    or refused connection, a server shutting down, an exhausted pool. Not for errors in the
    statement itself (an integrity error stays a bug)."""
    import asyncpg
    from sqlalchemy import exc as sa

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, sa.DBAPIError) and (
                exc.connection_invalidated or isinstance(exc, (sa.OperationalError, sa.InterfaceError))):
            # MySQL reports a deadlock or a lock wait timeout as an OperationalError too: the
            # statement lost a race, the database is there.
            return _mysql_errno(exc.orig) not in _MYSQL_CONTENTION
        if isinstance(exc, (sa.TimeoutError, sa.DisconnectionError)):  # pool exhausted / disconnect
            return True
        if isinstance(exc, (asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                            asyncpg.exceptions.AdminShutdownError, asyncpg.exceptions.CannotConnectNowError,
                            asyncpg.exceptions.ConnectionDoesNotExistError)):
            return True
        # A refused or dropped TCP connection while the pool connects comes out raw (not wrapped
        # by SQLAlchemy): recognised by having been raised inside the driver or the pool.
        if isinstance(exc, (OSError, TimeoutError)) and _raised_in(exc, ("asyncpg", "aiomysql", "pymysql",
                                                                         "sqlalchemy.pool")):
            return True
        if _mysql_errno(exc) in _MYSQL_GONE:  # PyMySQL's own, when not wrapped by SQLAlchemy
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# MySQL/MariaDB error numbers: can't connect, server gone away, lost connection, too many
# connections, shutting down, connection killed; and those of contention between statements.
_MYSQL_GONE = {2002, 2003, 2005, 2006, 2013, 2055, 1040, 1053, 1927, 4031}
_MYSQL_CONTENTION = {1205, 1213}


def _mysql_errno(exc: BaseException | None) -> int | None:
    try:
        import pymysql
    except ImportError:  # pragma: no cover - installed with the server
        return None
    if isinstance(exc, pymysql.err.MySQLError) and exc.args and isinstance(exc.args[0], int):
        return exc.args[0]
    return None


def database_contention(exc: BaseException) -> bool:
    """True when the database rolled the statement back because it lost a race with another
    transaction (deadlock, lock wait timeout, serialization failure): safe to send again."""
    import asyncpg

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if _mysql_errno(exc) in _MYSQL_CONTENTION:
            return True
        if isinstance(exc, (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError,
                            asyncpg.exceptions.LockNotAvailableError)):
            return True
        exc = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
    return False


def _raised_in(exc: BaseException, packages: tuple[str, ...]) -> bool:
    """Whether a frame of `exc`'s traceback belongs to one of `packages`."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__", "").startswith(packages):
            return True
        tb = tb.tb_next
    return False
