"""Reading the server's JSON-line streams (`/v2/watch`, SSE from the gateway) without a line limit.

aiohttp's `StreamReader` refuses lines over its buffer limit (512 KiB by default) with an error
that used to kill the agent and the TUI. These readers split chunks on newlines themselves, with
an upper bound far above what the server sends (`MAX_LINE`): a longer line is a broken stream
(`LineTooLong`, a ValueError), which callers treat as any other stream error: reconnect.

The watch sends a large snapshot as several `snapshot` lines with `"more": true` and a last one
without it (server/api/watch.py); `watch_messages` joins them, so callers see one snapshot.
Standard library only: the agent and the TUI import this.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

MAX_LINE = 64 * 1024 * 1024


class LineTooLong(ValueError):
    """A stream line longer than MAX_LINE: the stream is broken, reconnect."""


async def json_lines(chunks: AsyncIterator[bytes], max_line: int = MAX_LINE) -> AsyncIterator[bytes]:
    """The non-blank lines (without their newline) of a byte stream given in chunks of any size.

    A last line without its newline is a stream cut short and is dropped.
    """
    partial = bytearray()
    async for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            if partial:
                partial += chunk[start:end]
                line = bytes(partial)
                partial.clear()
            else:
                line = chunk[start:end]
            if line.strip():
                yield line
            start = end + 1
        partial += chunk[start:]
        if len(partial) > max_line:
            raise LineTooLong(f"a stream line is longer than {max_line} bytes")


async def watch_messages(chunks: AsyncIterator[bytes], max_line: int = MAX_LINE) -> AsyncIterator[dict[str, Any]]:
    """Watch messages as dicts, the pages of a snapshot joined into one `snapshot` message."""
    pending: dict[str, Any] | None = None
    async for line in json_lines(chunks, max_line):
        message = json.loads(line)
        if not isinstance(message, dict):
            raise ValueError("the watch sent a line that is not a JSON object")
        if message.get("type") == "snapshot":
            if pending is None:
                pending = {"type": "snapshot", "version": message.get("version"), "items": {}}
            for kind, objects in (message.get("items") or {}).items():
                pending["items"].setdefault(kind, []).extend(objects)
            if message.get("more"):
                continue
            message, pending = pending, None
        elif pending is not None:
            raise ValueError(f"the watch sent a {message.get('type')!r} line inside a snapshot")
        yield message
