"""Model files as a resource (`/v2/files`): which model source is in which worker's cache.

A row is one source on one worker. Operators ask for a pull (`pending`), the worker's agent downloads
(`pulling`, with `progress`), and reports `ready` or `error` (with a message; pulling again retries).
`rm` marks a row `removing`; the agent deletes the files and the row goes. The agent also reports what
instance launches downloaded and the local sources they used, with what it read of them (`metadata`:
config.json, safetensors dtypes per shard, the GGUF header's shape), so the server can estimate a
model whose hub it cannot reach.

`file_key` gives every form of a source one key (`org/name` and `hf://org/name@main` are the same
files); placement and `rm` match instances to rows by it.
"""

from __future__ import annotations

import posixpath
from datetime import datetime
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from server.schemas import Schema, SourceError, parse_model_source

FileState = Literal["pending", "pulling", "ready", "error", "removing"]
FILE_STATES: tuple[str, ...] = ("pending", "pulling", "ready", "error", "removing")
DEFAULT_REVISION = {"huggingface": "main", "modelscope": "master"}
MAX_SOURCE = 500


def file_key(source: str) -> str:
    """One key per set of files: `hf://ORG/NAME@REV[/FILE]` (the default revision written out), or the
    normalized local path. Raises SourceError for a malformed hub reference."""
    parsed = parse_model_source(source)
    if parsed.kind == "local":
        path = parsed.path or source
        return posixpath.normpath(path) if path.startswith("/") else path
    prefix = "hf://" if parsed.kind == "huggingface" else "ms://"
    revision = parsed.revision or DEFAULT_REVISION[parsed.kind]
    return f"{prefix}{parsed.repo_id}@{revision}" + (f"/{parsed.filename}" if parsed.filename else "")


def key_or_none(source: str) -> str | None:
    try:
        return file_key(source)
    except SourceError:
        return None


class ModelFileOut(Schema):
    id: int
    worker_id: int
    worker_name: str
    source: str = Field(description="the source's key (file_key): hf://ORG/NAME@REV[/FILE], ms://..., or a path")
    revision: str | None = Field(default=None, description="the commit the files are at (hubs)")
    path: str = Field(default="", description="where the files lie on the worker")
    size_bytes: int = 0
    state: FileState
    progress: float | None = Field(default=None, ge=0, le=1, description="while pulling: the fraction fetched")
    message: str = ""
    last_used_at: datetime | None = None
    metadata: dict[str, Any] | None = Field(default=None, description=(
        "what the agent read of the files (AgentFileEntry.metadata)"))
    created_at: datetime
    updated_at: datetime

    @model_validator(mode="before")
    @classmethod
    def _from_row(cls, value: Any) -> Any:
        # A model_files row keeps it as `file_metadata`: an ORM object's own `metadata` is SQLAlchemy's MetaData.
        if hasattr(value, "file_metadata"):
            return {name: getattr(value, name) for name in cls.model_fields if name != "metadata"} | {
                "metadata": value.file_metadata}
        return value


class FilePull(Schema):
    """`POST /v2/files`: pre-fetch a source into the caches of the chosen workers."""

    source: str = Field(min_length=1, max_length=MAX_SOURCE)
    workers: list[str] = Field(default_factory=list, max_length=10_000,
                               description="worker names; empty: every worker matching `labels` (or all)")
    labels: dict[str, str] = Field(default_factory=dict, max_length=50, description="key=value labels to match")

    @field_validator("source")
    @classmethod
    def _known_form(cls, value: str) -> str:
        file_key(value)  # SourceError is a ValueError: a 422 naming the field
        return value


class AgentFileEntry(Schema):
    """One source in an agent's cache, as the agent sees it."""

    source: str = Field(min_length=1, max_length=MAX_SOURCE)
    revision: str | None = Field(default=None, max_length=100)
    path: str = Field(default="", max_length=4096)
    size_bytes: int = Field(default=0, ge=0)
    state: Literal["pulling", "ready", "error"]
    progress: float | None = Field(default=None, ge=0, le=1)
    message: str = Field(default="", max_length=4000)
    last_used_at: float | None = Field(default=None, ge=0, le=1e11, description="unix seconds of the last use")
    metadata: dict[str, Any] | None = Field(default=None, description=(
        "what the agent read of the files, sent once per reading (null: unchanged): sha, files {name: size}, config (config.json), index (its metadata), "
        "shard_dtypes {shard: {dtype: bytes}}, gguf {n_layers, n_embd, n_head, n_head_kv, n_vocab, layer_bytes}"))


class AgentFileInventory(Schema):
    """`PUT /v2/agent/files`: the whole cache of the calling worker; rows it no longer lists go."""

    files: list[AgentFileEntry] = Field(default_factory=list, max_length=5000)
