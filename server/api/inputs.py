"""What a request may carry, checked once for every route before any handler sees it.

- Size: one body limit per route class (anonymous, `/v2`, `/v1`, `/v1` uploads). A declared
  Content-Length over it is refused before a byte of the body is read; a chunked body is
  cut off while it is read (aiohttp's `client_max_size`, set per request here).
- Text: path parameters, query keys and values, and every string and key of a JSON body
  must be UTF-8 without NUL characters (PostgreSQL cannot store NUL; invalid UTF-8 is
  nobody's data). Anything else is a 400 `invalid_text` naming the field.
- JSON: UTF-8 only, integers of at most MAX_INT_DIGITS digits (Python refuses to convert
  more than 4300 and would raise deep in a handler), nesting at most MAX_DEPTH, no NaN or
  Infinity, no repeated keys; bodies over OFF_LOOP_BYTES are decoded on a thread of their
  own so a big one never stalls the event loop.
- Types: request models are validated in pydantic's strict mode from the JSON text, so
  `"2"` or `true` is not an integer (datetimes and enums still parse from their JSON strings).
  Query parameters must fit the schema their route declares (routing.Query): what
  /openapi.json promises is what is enforced.
"""

from __future__ import annotations

import asyncio
import json
import re
from datetime import date
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any, Awaitable, Callable, TypeVar
from urllib.parse import unquote_to_bytes

from aiohttp import HttpVersion11, web
from pydantic import BaseModel

from server.api.errors import ApiError, bad_request, error_response, parse_whole_number
from server.api.routing import Query, Route

KIB, MIB = 1024, 1024**2
ANONYMOUS_MAX_BODY = 16 * KIB  # login and the other routes without credentials
MANAGEMENT_MAX_BODY = 1 * MIB  # /v2 (a model spec is capped far below this by its schema)
MAX_DEPTH = 64
MAX_INT_DIGITS = 100  # far above any integer a field accepts (IDs fit in 19 digits)
OFF_LOOP_BYTES = 64 * KIB
UPLOAD_PATHS = frozenset({"/v1/audio/transcriptions"})  # multipart bodies, limited on their own

M = TypeVar("M", bound=BaseModel)


# --- body size ------------------------------------------------------------------------


@dataclass(frozen=True)
class BodyLimits:
    """The largest body, in bytes, of each route class."""

    anonymous: int = ANONYMOUS_MAX_BODY
    management: int = MANAGEMENT_MAX_BODY
    gateway: int = 64 * MIB
    upload: int = 64 * MIB

    def largest(self) -> int:
        return max(self.anonymous, self.management, self.gateway, self.upload)

    def of(self, request: web.Request) -> tuple[int, str]:
        """The limit that applies to this request and what its class is called (for the message)."""
        if getattr(request.match_info.handler, "__maas_auth__", "none") == "none":
            return self.anonymous, "a route without credentials"
        if request.path in UPLOAD_PATHS:
            return self.upload, "an upload"
        if request.path.startswith("/v1/"):
            return self.gateway, "/v1"
        return self.management, "/v2"


def too_large(size: int | None, limit: int, what: str) -> ApiError:
    told = f"is {size} bytes" if size is not None else "is longer than that"
    return ApiError(413, "too_large", f"the request body {told}; {what} takes at most {limit} bytes",
                    {"limit": limit})


# --- text ------------------------------------------------------------------------------


def invalid_text(field: str, problem: str) -> ApiError:
    return ApiError(400, "invalid_text", f"{field} {problem}", {"field": field})


def text_problem(value: str) -> str | None:
    """Why `value` cannot be stored as text, or None when it can."""
    if "\x00" in value:
        return "contains a NUL character"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "is not valid UTF-8 (it has a lone surrogate)"
    return None


def _shown(name: str) -> str:
    """A name fit for an error message: printable, short (it may be what was wrong)."""
    shown = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in name[:80])
    return shown if len(name) <= 80 else shown + "..."


def check_request_text(request: web.Request) -> None:
    """Path parameters and query keys and values: UTF-8 without NUL, else a 400 naming the field."""
    if not request.match_info and "%" not in request.raw_path and "?" not in request.raw_path:
        return  # nothing to check (the gateway's plain paths): no walk
    for name, value in request.match_info.items():
        if problem := text_problem(value):
            raise invalid_text(f"path parameter {name!r}", problem)
    # aiohttp keeps an undecodable %XX in the path as it is, and turns one in the query into U+FFFD:
    # both are found only in the raw form.
    for index, segment in enumerate(request.raw_path.split("?", 1)[0].split("/")):
        if "%" in segment and _undecodable(segment):
            raise invalid_text(f"path segment {index}", "is not valid UTF-8 once %-decoded")
    raw_query = request.rel_url.raw_query_string
    if raw_query:
        for pair in raw_query.split("&"):
            key, _, value = pair.partition("=")
            shown = _shown(unquote_to_bytes(key.replace("+", " ")).decode("utf-8", "replace"))
            if "%" in key and _undecodable(key):
                raise invalid_text(f"a query parameter name ('{shown}')", "is not valid UTF-8 once %-decoded")
            if "%" in value and _undecodable(value):
                raise invalid_text(f"query parameter '{shown}'", "is not valid UTF-8 once %-decoded")
    for key, value in request.query.items():
        if problem := text_problem(key):
            raise invalid_text(f"a query parameter name ('{_shown(key)}')", problem)
        if problem := text_problem(value):
            raise invalid_text(f"query parameter '{_shown(key)}'", problem)


def _undecodable(raw: str) -> bool:
    try:
        unquote_to_bytes(raw.replace("+", " ")).decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def check_json_text(data: Any) -> None:
    """Every string and key in a decoded JSON document, and its depth; a 400 naming the first bad field."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise bad_request(f"malformed JSON: nested deeper than {MAX_DEPTH} levels", {"field": path or "body"})
        if isinstance(value, str):
            if problem := text_problem(value):
                raise invalid_text(_shown(path) if path else "the body", problem)
        elif isinstance(value, dict):
            for key, item in value.items():
                if problem := text_problem(key):
                    raise invalid_text(f"a key in {_shown(path) if path else 'the body'} ('{_shown(key)}')", problem)
                stack.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))


def check_json_depth(data: Any) -> None:
    """Only the depth (bodies whose text is passed through, not stored: /v1)."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise bad_request(f"malformed JSON: nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)


def check_query(request: web.Request, declared: dict[str, str | Query]) -> None:
    """Declared query parameters against their schemas (integer ranges, enums, patterns, dates, lengths)."""
    for name, spec in declared.items():
        value = request.query.get(name)
        if value is None or not isinstance(spec, Query):
            continue
        if problem := _schema_problem(value, spec.schema):
            raise ApiError(400, "bad_request", f"query parameter {name!r} ('{_shown(value)}') {problem}", {"field": name})


def _schema_problem(value: str, schema: dict[str, Any]) -> str | None:
    if schema.get("type") == "integer":
        low, high = schema.get("minimum", -(2**63)), schema.get("maximum", 2**63 - 1)
        if parse_whole_number(value, low=low, high=high) is None:
            return f"must be a whole number from {low} to {high}"
        return None
    if "enum" in schema and value not in schema["enum"]:
        return "must be one of " + ", ".join(schema["enum"])
    if "pattern" in schema and not re.search(schema["pattern"], value):
        return f"must match {schema['pattern']}"
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        return f"must be at most {schema['maxLength']} characters"
    if schema.get("format") == "date":
        try:
            date.fromisoformat(value)
        except ValueError:
            return "must be a date like 2026-01-31"
    return None


# --- JSON --------------------------------------------------------------------------------


class _Refused(ValueError):
    """Raised from inside json.loads by the hooks below."""


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _Refused(f"the key '{_shown(repeated)}' appears twice in one object")
    return out


# Made once: json.loads with hooks builds a decoder (and its scanner) on every call.
_DECODER = json.JSONDecoder(parse_int=_bounded_int, parse_constant=_no_constant)
_STORED_DECODER = json.JSONDecoder(parse_int=_bounded_int, parse_constant=_no_constant, object_pairs_hook=_unique_keys)


def decode_json(raw: bytes, expected: str = "a JSON object", *, stored: bool = True) -> tuple[dict[str, Any], str]:
    """`raw` as a JSON object, and its text. `stored`: its strings reach the database, so they are checked too.
    Anything wrong is a 400 that says what."""
    if not raw:
        raise bad_request(f"request body is empty; send {expected}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid_text("the body", f"is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = (_STORED_DECODER if stored else _DECODER).decode(text)
    except _Refused as exc:
        raise bad_request(f"malformed JSON: {exc}") from None
    except json.JSONDecodeError as exc:
        raise bad_request(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise bad_request("malformed JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise bad_request(f"the body must be {expected}")
    if stored:
        check_json_text(data)
    elif raw.count(b"{") + raw.count(b"[") > MAX_DEPTH:  # fewer brackets than that cannot nest deeper: no walk
        check_json_depth(data)
    return data, text


def parse_json_object(raw: bytes, expected: str = "a JSON object") -> dict[str, Any]:
    """A request body whose text is not stored (the /v1 proxy reads its 'model'), bounded like any other."""
    return decode_json(raw, expected, stored=False)[0]


def _parse_model(raw: bytes, model: type[M]) -> M:
    _, text = decode_json(raw)
    # Strict, from the JSON text: no "2" or true for an integer, while datetimes and enums parse from strings.
    return model.model_validate_json(text, strict=True)


_executor: ThreadPoolExecutor | None = None


async def off_loop(function: Callable[..., Any], *args: Any) -> Any:
    """Run a CPU-bound parse on the parsing threads (their own: never queued behind other blocking work)."""
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="maas-json")
    return await asyncio.get_running_loop().run_in_executor(_executor, function, *args)


async def parse_json_body(raw: bytes, expected: str = "a JSON object") -> dict[str, Any]:
    """parse_json_object, on a parsing thread when the body is large."""
    if len(raw) > OFF_LOOP_BYTES:
        return await off_loop(parse_json_object, raw, expected)
    return parse_json_object(raw, expected)


async def read_model(request: web.Request, model: type[M]) -> M:
    """The request body as `model`: malformed JSON or text is a 400, invalid fields a 422."""
    raw = await request.read()
    if len(raw) > OFF_LOOP_BYTES:
        return await off_loop(_parse_model, raw, model)
    return _parse_model(raw, model)


# --- multipart ----------------------------------------------------------------------------------


def _form_field(body: bytes, content_type: str, name: str) -> str | None:
    """The text of form field `name` in a multipart/form-data body, or None when there is none.
    Any part may be hostile: an unknown charset, a nested multipart or undecodable bytes is no field."""
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
                                                  + body)
    if not message.is_multipart():
        return None
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") != name or part.is_multipart():
            continue
        if part.get_content_maintype() != "text":
            return None
        raw = part.get_payload(decode=True)
        if not isinstance(raw, bytes):
            return None
        try:
            text = raw.decode(part.get_content_charset() or "utf-8")
        except (LookupError, UnicodeDecodeError):
            raise invalid_text(f"form field {name!r}", "is not text in a known encoding") from None
        if problem := text_problem(text):
            raise invalid_text(f"form field {name!r}", problem)
        return text.strip()
    return None


async def form_field(body: bytes, content_type: str, name: str) -> str | None:
    """_form_field, on a parsing thread when the body is large (an upload of megabytes)."""
    if len(body) > OFF_LOOP_BYTES:
        return await off_loop(_form_field, body, content_type, name)
    return _form_field(body, content_type, name)


# --- the middleware ------------------------------------------------------------------------


def expect_handler(limits: BodyLimits) -> Callable[[web.Request], Awaitable[web.StreamResponse | None]]:
    """`Expect: 100-continue` is answered before any middleware runs: a body over the limit gets its 413
    instead of the invitation to send it."""
    async def handler(request: web.Request) -> web.StreamResponse | None:
        limit, what = limits.of(request)
        if request.content_length is not None and request.content_length > limit:
            error = too_large(request.content_length, limit, what)
            response = error_response(request, error.status, error.code, error.message, error.details)
            response.force_close()
            return response
        if request.version == HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # type: ignore[attr-defined]  # as aiohttp's own handler does
        return None

    return handler


def input_middleware(limits: BodyLimits, routes: list[Route]) -> Callable[..., Awaitable[web.StreamResponse]]:
    queries = {(r.method, r.path): r.query for r in routes if r.query}

    @web.middleware
    async def middleware(request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        limit, what = limits.of(request)
        if request.content_length is not None and request.content_length > limit:
            raise too_large(request.content_length, limit, what)
        check_request_text(request)
        resource = request.match_info.route.resource
        if resource is not None and (declared := queries.get((request.method, resource.canonical))):
            check_query(request, declared)
        # A body of a known length is bounded above; a chunked or compressed one is cut off at the limit as
        # it is read (the clone's client_max_size; a clone costs as much as the rest of this middleware).
        if request.body_exists and (request.content_length is None or "Content-Encoding" in request.headers):
            request = request.clone(client_max_size=limit)
        return await handler(request)

    return middleware
