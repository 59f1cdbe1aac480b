"""JSON errors for /v2 (`{"error": {...}}`) and /v1 (OpenAI's shape), and the middleware that makes them."""

from __future__ import annotations

import json
import logging
from typing import Any, Awaitable, Callable

from aiohttp import web
from pydantic import BaseModel, ValidationError

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: Any = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


def bad_request(message: str, details: Any = None) -> ApiError:
    return ApiError(400, "bad_request", message, details)


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


def conflict(message: str) -> ApiError:
    return ApiError(409, "conflict", message)


def unauthorized(message: str = "missing or invalid credentials") -> ApiError:
    return ApiError(401, "unauthorized", message)


def forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", message)


_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 413: "invalid_request_error", 503: "service_unavailable", 502: "api_error"}


def error_response(request: web.Request, status: int, code: str, message: str, details: Any = None) -> web.Response:
    if request.path.startswith("/v1/"):
        body: dict[str, Any] = {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "api_error"),
                                          "code": code, "param": None}}
    else:
        body = {"error": {"code": code, "message": message, "details": details}}
    return web.json_response(body, status=status)


def _validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    return [{"field": ".".join(str(p) for p in err["loc"]), "message": err["msg"]} for err in exc.errors()]


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(request, exc.status, exc.code, exc.message, exc.details)
    except ValidationError as exc:
        details = _validation_details(exc)
        summary = "; ".join(f"{d['field'] or 'body'}: {d['message']}" for d in details)
        return error_response(request, 422, "invalid", f"invalid request: {summary}", details)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status, "http_error")
        return error_response(request, exc.status, code, exc.reason or "error")
    except Exception as exc:  # a 5xx is a bug: log it whole, tell the client little
        if database_unavailable(exc):
            log.warning("database unavailable in %s %s: %s", request.method, request.path,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return error_response(request, 503, "database_unavailable",
                                  "the database is unavailable; try again shortly (the server reconnects by itself)")
        if database_contention(exc):
            log.warning("database contention in %s %s: %s", request.method, request.path,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return error_response(request, 503, "database_busy",
                                  "the database gave up this change to let a concurrent one through (a deadlock or "
                                  "a lock wait timeout); nothing was written: try again")
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(request, 500, "internal", "internal server error (see the server log)")


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


MAX_ID = 2**63 - 1


def parse_json_object(raw: bytes, expected: str = "a JSON object") -> dict[str, Any]:
    """A request body as a JSON object; anything else is a 400 that says what is wrong."""
    if not raw:
        raise bad_request(f"request body is empty; send {expected}")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise bad_request("malformed JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise bad_request(f"the body must be {expected}")
    return data


def parse_whole_number(text: str | None, low: int = 0, high: int = MAX_ID) -> int | None:
    """ASCII digits (optionally signed) within [low, high], else None. Never raises."""
    if text is None or not 0 < len(text) <= 20:
        return None
    digits = text[1:] if text[0] in "+-" else text
    if not (digits.isascii() and digits.isdigit()):
        return None
    value = int(text)
    return value if low <= value <= high else None


async def read_json(request: web.Request, model: type[BaseModel]) -> Any:
    """Parse and validate a JSON body into `model`; malformed JSON is a 400, invalid fields a 422."""
    return model.model_validate(parse_json_object(await request.read()))
