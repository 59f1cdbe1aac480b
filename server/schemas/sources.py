"""Where a model comes from: what `spec.source` names. Re-exported by `server.schemas`.

`spec.source` is one of:
  /abs/path                            a local file or folder on the worker (the CLI makes relative paths absolute)
  hf://ORG/NAME[@REV][/FILE]           a Hugging Face repository, optionally one file of it (a .gguf for llama.cpp)
  ms://ORG/NAME[@REV][/FILE]           the same on ModelScope
  ORG/NAME                             short for hf://ORG/NAME (exactly two parts, not absolute, not a .gguf)
Anything else is taken as a local path and fails on the worker when it does not exist there.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel

_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_HUB_REF = re.compile(rf"^(?P<repo>{_REPO_PART}/{_REPO_PART})(?:@(?P<revision>[A-Za-z0-9][A-Za-z0-9._-]{{0,99}}))?"
                      r"(?:/(?P<file>[^\s@]+))?$")
_BARE_REPO = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")
HUBS = {"hf://": "huggingface", "ms://": "modelscope"}


class ModelSource(BaseModel):
    kind: Literal["local", "huggingface", "modelscope"]
    path: str | None = None  # local
    repo_id: str | None = None  # hubs
    revision: str | None = None
    filename: str | None = None  # one file of the repository (e.g. a GGUF)


class SourceError(ValueError):
    pass


def parse_model_source(source: str) -> ModelSource:
    """What `spec.source` names (see the table at the top). Raises SourceError for a malformed hub reference."""
    for prefix, kind in HUBS.items():
        if source.startswith(prefix):
            match = _HUB_REF.match(source[len(prefix):])
            if not match or ".." in (match["file"] or "").split("/"):
                raise SourceError(f"model source {source!r}: write {prefix}ORG/NAME, {prefix}ORG/NAME@REVISION "
                                  f"or {prefix}ORG/NAME/FILE")
            return ModelSource(kind=kind, repo_id=match["repo"], revision=match["revision"], filename=match["file"])
    if _BARE_REPO.match(source) and not source.startswith(".") and not source.lower().endswith(".gguf"):
        return ModelSource(kind="huggingface", repo_id=source)
    return ModelSource(kind="local", path=source)
