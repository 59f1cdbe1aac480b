"""Model files in the workers' caches: the table (`maas file list`, the TUI's Files view) and the describe page."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable

from rich.console import RenderableType
from rich.text import Text

from maas_tui.render import format as fmt
from maas_tui.render.common import Column, Row, grid
from server import schemas

KIND = "ModelFile"
COLUMNS: list[Column] = [("SOURCE", 40), ("WORKER", 14), ("STATE", 12), ("SIZE", None), ("USED", None)]
WIDE_COLUMNS: list[Column] = [("REVISION", 12), ("PATH", 60), ("MESSAGE", 60)]
_STYLES = {"ready": "green", "pulling": "cyan", "pending": "yellow", "error": "red", "removing": "magenta"}


def key_of(row: schemas.ModelFileOut) -> str:
    return str(row.id)


def state_text(row: schemas.ModelFileOut) -> Text:
    text = row.state + (f" {row.progress * 100:.0f}%" if row.state == "pulling" and row.progress is not None else "")
    return Text(text, style=_STYLES.get(row.state, ""))


def rows(files: Iterable[schemas.ModelFileOut], now: datetime) -> Iterable[Row]:
    for f in sorted(files, key=lambda f: (f.source, f.worker_name)):
        yield key_of(f), (Text(f.source), Text(f.worker_name), state_text(f),
                          fmt.human_bytes(f.size_bytes) if f.size_bytes else "-",
                          fmt.age(f.last_used_at, now) + " ago" if f.last_used_at else "-",
                          (f.revision or "-")[:12], Text(f.path or "-"), Text(f.message or "-"))


def line(row: schemas.ModelFileOut) -> str:
    """The line under the table about the highlighted row: what went wrong, or where the files are."""
    if row.state == "error":
        return f"{row.worker_name}: {row.message}"
    return f"{row.source} on {row.worker_name}: {row.path or row.message or row.state}"


def describe(row: schemas.ModelFileOut, *, now: datetime) -> RenderableType:
    fields = grid()
    fields.add_row("Source", Text(row.source))
    fields.add_row("Worker", Text(row.worker_name))
    fields.add_row("State", state_text(row))
    if row.message:
        fields.add_row("Message", Text(row.message))
    fields.add_row("Revision", Text(row.revision or "-"))
    fields.add_row("Path", Text(row.path or "-"))
    fields.add_row("Size", fmt.human_bytes(row.size_bytes))
    fields.add_row("Last used", fmt.age(row.last_used_at, now) + " ago" if row.last_used_at else "never")
    meta = row.metadata or {}
    read = [k for k in ("config", "shard_dtypes", "gguf") if meta.get(k)]
    fields.add_row("Metadata", Text(f"read by the agent: {', '.join(read)}" if read else "none read"))
    return fields


def document_of(row: schemas.ModelFileOut) -> dict[str, Any]:
    data = row.model_dump(mode="json")
    return {"kind": KIND, "metadata": {"name": f"{row.source}@{row.worker_name}", "id": row.id},
            "spec": {"source": row.source, "worker": row.worker_name},
            "status": {k: data[k] for k in ("state", "progress", "message", "revision", "path", "size_bytes",
                                            "last_used_at")}}
