"""Small pure formatting helpers shared by the TUI and the CLI renderers (no Textual imports)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from rich.style import Style
from rich.text import Text

GB = 1000**3
SPARK = "▁▂▃▄▅▆▇█"
BAR_FULL, BAR_EMPTY = "█", "░"

# Instance and worker states: a colour, and the word itself so NO_COLOR still reads.
STATE_STYLES: dict[str, str] = {
    "running": "bold green",
    "ready": "bold green",
    "downloading": "cyan",
    "starting": "cyan",
    "scheduled": "blue",
    "pending": "yellow",
    "terminating": "magenta",
    "deleting": "magenta",
    "error": "bold red",
    "unreachable": "bold red",
    "not_ready": "bold red",
    "active": "green",
}


def state_text(state: str) -> Text:
    return Text(str(state), style=STATE_STYLES.get(str(state), ""))


def instance_state(state: str, download_progress: float | None = None) -> str:
    """`downloading 42%` while a download reports progress, else the state itself."""
    if str(state) == "downloading" and download_progress is not None:
        return f"downloading {min(max(download_progress, 0.0), 1.0) * 100:.0f}%"
    return str(state)


def instance_state_text(inst: Any) -> Text:
    return Text(instance_state(inst.state, inst.download_progress), style=STATE_STYLES.get(str(inst.state), ""))


def gb(value: int | float | None, digits: int = 0) -> str:
    if not value:
        return "0"
    number = value / GB
    if number >= 100 or digits == 0:
        return f"{number:.0f}"
    return f"{number:.{digits}f}".rstrip("0").rstrip(".")


def human_bytes(value: int | float | None) -> str:
    value = float(value or 0)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1000 or unit == "T":
            return f"{value:.0f}{unit}" if unit in ("B", "K") or value >= 10 else f"{value:.1f}{unit}"
        value /= 1000
    return f"{value:.0f}T"  # pragma: no cover


def aware(value: datetime) -> datetime:
    """The server sends UTC; SQLite drops the zone on the way."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def age(then: datetime | None, now: datetime) -> str:
    if then is None:
        return "-"
    then, now = aware(then), aware(now)
    seconds = max(0, int((now - then).total_seconds()))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def percent_color(value: float) -> str:
    """A background colour for 0..100 (heatmap cells, bars). Six steps read well in 256 colours."""
    if value < 10:
        return "#30363d"
    if value < 30:
        return "#1f6f43"
    if value < 50:
        return "#6a9a23"
    if value < 70:
        return "#b58900"
    if value < 85:
        return "#cb6c1d"
    return "#c0262d"


def cell_style(value: float) -> Style:
    return _CELL_STYLES[_bucket(value)]


def _bucket(value: float) -> int:
    for index, limit in enumerate((10, 30, 50, 70, 85)):
        if value < limit:
            return index
    return 5


_CELL_STYLES = [Style(color="#f0f0f0", bgcolor=percent_color(v), bold=True) for v in (0, 20, 40, 60, 80, 90)]


def bar(value: float, width: int) -> Text:
    """A horizontal bar for 0..100 that reads without colour: filled blocks then light shade."""
    value = max(0.0, min(100.0, value))
    filled = round(value / 100 * width)
    text = Text()
    text.append(BAR_FULL * filled, style=Style(color=percent_color(value)))
    text.append(BAR_EMPTY * (width - filled), style="grey42")
    return text


def sparkline(values: list[float], width: int, high: float = 100.0) -> str:
    """The last `width` samples as block characters (0..high); padded on the left with spaces."""
    samples = values[-width:] if width > 0 else []
    chars = []
    for value in samples:
        level = 0 if high <= 0 else int(max(0.0, min(1.0, value / high)) * (len(SPARK) - 1) + 0.5)
        chars.append(SPARK[level])
    return " " * (width - len(chars)) + "".join(chars)


def matches(filter_text: str, haystack: str) -> bool:
    """k9s-style filter: a case-insensitive substring; a leading `!` negates it."""
    needle = filter_text.strip()
    if not needle:
        return True
    negate = needle.startswith("!")
    if negate:
        needle = needle[1:]
        if not needle:
            return True
    found = needle.lower() in haystack.lower()
    return not found if negate else found


def truncate(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def middle_truncate(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    keep = width - 1
    return text[: keep // 3] + "…" + text[len(text) - (keep - keep // 3):]


_NUMBER = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*([a-zA-Z%°]*)")
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def sort_key(value: Any) -> tuple:
    """A table cell as a sort key: numbers (and ages like 5m, 2h) by value, the rest as text."""
    text = value.plain if hasattr(value, "plain") else str(value)
    match = _NUMBER.match(text)
    if match:
        number = float(match.group(1)) * _AGE_UNITS.get(match.group(2), 1)
        return (0, number, text.lower())
    if text.strip() in ("-", ""):
        return (2, 0.0, "")
    return (1, 0.0, text.lower())


def rollout_bar(ready: int, updated: int, desired: int, width: int = 6) -> Text:
    """New-generation progress: █ ready, ▒ started but not ready, ░ still to come; readable without colour."""
    desired = max(desired, 1)
    full = min(width, round(width * min(ready, desired) / desired))
    started = min(width - full, round(width * max(0, min(updated, desired) - ready) / desired))
    bar = Text()
    bar.append("█" * full, style="green")
    bar.append("▒" * started, style="yellow")
    bar.append("░" * (width - full - started), style="grey42")
    return bar


def iec_bytes(value: int | None) -> str:
    """Bytes in binary units for describe and estimates: `12.0 GiB` (empty for None)."""
    if value is None:
        return ""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(value)  # pragma: no cover
