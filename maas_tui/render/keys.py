"""API keys: the table columns (never a secret: only the prefix) and the describe page."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable

from rich.console import RenderableType
from rich.text import Text

from maas_tui.render import format as fmt
from maas_tui.render import limits as limit_text
from maas_tui.render.common import Column, Row, document, grid
from server import schemas

KIND = "ApiKey"
COLUMNS: list[Column] = [("NAME", None), ("PREFIX", None), ("CREATED", None), ("EXPIRES", None), ("LAST USED", None)]
WIDE_COLUMNS: list[Column] = [("SCOPES", None), ("MODELS", 40)]
# `maas key list` adds it after COLUMNS (rows(..., limits=...)); the TUI's table leaves it out.
LIMITS_COLUMN: Column = ("LIMITS", 48)


def expires(key: schemas.ApiKeyOut, now: datetime) -> str:
    if key.expires_at is None:
        return "never"
    return "expired" if fmt.aware(key.expires_at) <= fmt.aware(now) else "in " + fmt.age(now, key.expires_at)


def rows(keys: Iterable[schemas.ApiKeyOut], now: datetime, limits: dict[int, Any] | None = None) -> Iterable[Row]:
    """`limits` (key id -> LimitsListed): with it, a LIMITS cell after the COLUMNS cells."""
    for k in sorted(keys, key=lambda k: k.name):
        cells = (k.name, k.prefix + "…", fmt.age(k.created_at, now) + " ago", expires(k, now),
                 fmt.age(k.last_used_at, now) + " ago" if k.last_used_at else "never")
        if limits is not None:
            cells += (limit_text.summary(limits.get(k.id)),)
        yield k.name, cells + (",".join(k.scopes), ",".join(k.allowed_models) or "all")


def describe(key: schemas.ApiKeyOut, *, now: datetime, limits: Any | None = None) -> RenderableType:
    """`limits`: the key's LimitsListed (`maas key describe` passes it; then Limits and Used lines)."""
    fields = grid()
    fields.add_row("Name", Text(key.name))
    fields.add_row("Prefix", Text(key.prefix + "…  (the secret was shown once, at creation)"))
    fields.add_row("Scopes", Text(", ".join(key.scopes)))
    fields.add_row("Models", Text(", ".join(key.allowed_models) or "all"))
    fields.add_row("Created", fmt.age(key.created_at, now) + " ago")
    fields.add_row("Expires", expires(key, now))
    fields.add_row("Last used", fmt.age(key.last_used_at, now) + " ago" if key.last_used_at else "never")
    if limits is not None:
        fields.add_row("Limits", Text(limit_text.summary(limits)))
        fields.add_row("Used", Text(limit_text.used(limits)))
    return fields


def document_of(key: schemas.ApiKeyOut) -> dict[str, Any]:
    data = key.model_dump(mode="json")
    return document(KIND, key, {"scopes": data["scopes"], "allowed_models": data["allowed_models"],
                                "expires_at": data["expires_at"]},
                    {"prefix": data["prefix"], "last_used_at": data["last_used_at"]}, ("id", "created_at"))
