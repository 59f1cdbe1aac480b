"""Reading instance log files: the last N lines, and following new lines."""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path

_BLOCK = 64 * 1024


def tail_lines(path: Path, count: int, end: int | None = None) -> bytes:
    """The last `count` lines (all when count < 0) before byte `end` (default: the end of the
    file), read backwards: cheap on huge logs."""
    if not path.exists() or count == 0:
        return b""
    with open(path, "rb") as handle:
        position = handle.seek(0, os.SEEK_END) if end is None else end
        if count < 0:
            handle.seek(0)
            return handle.read(position)
        chunks: deque[bytes] = deque()
        newlines = 0
        while position > 0 and newlines <= count:
            step = min(_BLOCK, position)
            position -= step
            handle.seek(position)
            chunk = handle.read(step)
            chunks.appendleft(chunk)
            newlines += chunk.count(b"\n")
    data = b"".join(chunks)
    if not data:
        return b""
    # Lines end at \n only: progress bars use bare \r within one line.
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
        return b"\n".join(lines[-count:]) + b"\n"
    return b"\n".join(lines[-count:])


def tail_text(path: Path, count: int, limit: int = 4000) -> str:
    return tail_lines(path, count).decode("utf-8", "replace")[-limit:]
