"""JSON errors for /v2 (`{"error": {...}}`) and /v1 (OpenAI's shape), and the middleware that makes them."""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import BaseModel, ValidationError

# What a failure of the store means lives with the store; re-exported for the callers here.
from server.db.errors import database_contention, database_unavailable, first_line  # noqa: F401

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}  # e.g. Retry-After on a 429


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
        response = error_response(request, exc.status, exc.code, exc.message, exc.details)
        response.headers.update(exc.headers)
        return response
    except ValidationError as exc:
        details = _validation_details(exc)
        summary = "; ".join(f"{d['field'] or 'body'}: {d['message']}" for d in details)
        return error_response(request, 422, "invalid", f"invalid request: {summary}", details)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status, "http_error")
        # The 413 of a chunked body cut off while read: aiohttp's text gives the limit.
        message = exc.text if exc.status == 413 and exc.text else exc.reason or "error"
        if exc.status == 405:
            message = f"{request.method} is not allowed on {request.path}; it takes {exc.headers.get('Allow', '')}"
        response = error_response(request, exc.status, code, message)
        if "Allow" in exc.headers:  # a 405 says what the path takes
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except (web.RequestPayloadError, HttpProcessingError) as exc:  # a body that breaks while read (bad gzip, chunks)
        return error_response(request, 400, "bad_body", f"the request body could not be read ({type(exc).__name__})")
    except Exception as exc:  # a 5xx is a bug: log it whole, tell the client little
        if database_unavailable(exc):
            log.warning("database unavailable in %s %s: %s", request.method, request.path,
                        first_line(exc))
            return error_response(request, 503, "database_unavailable",
                                  "the database is unavailable; try again shortly (the server reconnects by itself)")
        if database_contention(exc):
            log.warning("database contention in %s %s: %s", request.method, request.path,
                        first_line(exc))
            return error_response(request, 503, "database_busy",
                                  "the database gave up this change to let a concurrent one through (a deadlock or "
                                  "a lock wait timeout); nothing was written: try again")
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(request, 500, "internal", "internal server error (see the server log)")


MAX_ID = 2**63 - 1


def parse_json_object(raw: bytes, expected: str = "a JSON object") -> dict[str, Any]:
    """A request body as a JSON object, bounded (see server/api/inputs.py); anything else is a 400."""
    from server.api.inputs import parse_json_object as parse  # inputs builds on this module's errors

    return parse(raw, expected)


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
    """Parse and validate a JSON body into `model` (strict types); malformed JSON or text is a 400,
    invalid fields a 422. The rules live in server/api/inputs.py."""
    from server.api.inputs import read_model

    return await read_model(request, model)
