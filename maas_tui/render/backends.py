"""Backends: the table columns, the describe page and the document (`maas backend get NAME -o yaml`, which
`maas backend add -f` takes back)."""

from __future__ import annotations

from typing import Any, Iterable

from rich.console import RenderableType
from rich.text import Text

from maas_tui.render.common import Column, Row, grid
from server import schemas

KIND = "Backend"
COLUMNS: list[Column] = [("NAME", None), ("KIND", None), ("HEALTH", None), ("DESCRIPTION", 60)]
WIDE_COLUMNS: list[Column] = [("COMMAND", 60), ("IMAGE", None), ("ALLOWED ENV", None), ("ALLOWED ARGS", None)]
# What `maas backend add` sends: the definition, without what the server adds.
DEFINITION_FIELDS = tuple(schemas.BackendDefinition.model_fields)


def reference(backend: schemas.BackendOut) -> str:
    """What `--backend` takes: the name of a built-in one, custom:NAME for the others."""
    return backend.name if backend.builtin else f"{schemas.CUSTOM_BACKEND_PREFIX}{backend.name}"


def rows(backends: Iterable[schemas.BackendOut]) -> Iterable[Row]:
    for b in backends:
        yield reference(b), (reference(b), "built-in" if b.builtin else "custom", b.health_path, b.description,
                             " ".join(b.command), b.image or "", " ".join(b.allowed_env), " ".join(b.allowed_args))


def describe(backend: schemas.BackendOut) -> RenderableType:
    fields = grid()
    fields.add_row("Name", Text(reference(backend)))
    fields.add_row("Kind", "built-in" if backend.builtin else "custom (maas backend add)")
    if backend.description:
        fields.add_row("Description", Text(backend.description))
    fields.add_row("Command", Text(" ".join(backend.command) or "-"))
    if backend.image:
        fields.add_row("Image", Text(backend.image))
    if backend.env:
        fields.add_row("Env", Text(" ".join(f"{k}={v}" for k, v in sorted(backend.env.items()))))
    fields.add_row("Health", Text(backend.health_path))
    fields.add_row("Metrics", Text(f"{backend.metrics_path or '-'}"
                                   + (f" ({', '.join(f'{k} → {v}' for k, v in backend.metrics.items())})"
                                      if backend.metrics else "")))
    fields.add_row("Allowed env", Text(" ".join(backend.allowed_env) or "-"))
    fields.add_row("Allowed args", Text(" ".join(backend.allowed_args) or "-"))
    return fields


def document_of(backend: schemas.BackendOut) -> dict[str, Any]:
    data = backend.model_dump(mode="json")
    spec = {k: data[k] for k in DEFINITION_FIELDS if k != "name"}
    status = {"builtin": data["builtin"], "allowed_env": data["allowed_env"], "allowed_args": data["allowed_args"]}
    return {"kind": KIND, "metadata": {"name": data["name"], "created_at": data["created_at"],
                                       "updated_at": data["updated_at"]}, "spec": spec, "status": status}


def definition_of(document: dict[str, Any]) -> dict[str, Any]:
    """A definition from what `backend add -f` read: a plain definition, or a document as `get` prints it."""
    if isinstance(document.get("metadata"), dict) or isinstance(document.get("spec"), dict):
        return dict(document.get("spec") or {}) | {"name": (document.get("metadata") or {}).get("name")}
    return {k: v for k, v in document.items() if k not in ("kind", "apiVersion", "status")}
