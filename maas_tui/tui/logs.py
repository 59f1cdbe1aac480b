"""A line-virtualised log view: holds up to `max_lines` lines, renders only the visible ones.

Appending is O(new lines); rendering is O(visible lines), so 100,000 lines scroll and follow
without freezing. Wrap mode keeps a (line, offset) index of visual rows, extended as lines
arrive and rebuilt only when the width changes. Search matches are highlighted as they render.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from rich.segment import Segment
from rich.style import Style
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

_PLAIN = Style()
BACKLOG = "·" * 8  # the time of a line fetched with the tail is unknown: it arrived before we looked
STAMP_WIDTH = 9
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_CONTROL = str.maketrans({c: None for c in map(chr, list(range(0, 9)) + list(range(11, 32)) + [127])})


def clean_line(line: str) -> str:
    if "\x1b" in line:
        line = _ANSI.sub("", line)
    line = line.translate(_CONTROL)
    return line.expandtabs(4) if "\t" in line else line


class LogView(ScrollView, can_focus=True):
    BINDINGS = [
        Binding("up,k", "scroll_by(-1)", show=False),
        Binding("down,j", "scroll_by(1)", show=False),
        Binding("pageup", "page(-1)", show=False),
        Binding("pagedown,space", "page(1)", show=False),
        Binding("home,g", "top", "Top", show=False),
        Binding("end,G", "bottom", "Bottom", show=False),
        Binding("left", "scroll_x_by(-8)", show=False),
        Binding("right", "scroll_x_by(8)", show=False),
    ]

    class FollowChanged(Message):
        def __init__(self, follow: bool) -> None:
            super().__init__()
            self.follow = follow

    def __init__(self, max_lines: int = 200_000, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_lines = max_lines
        self.lines: list[str] = []
        # When each line arrived (HH:MM:SS), parallel to `lines`; BACKLOG for lines fetched as the tail.
        self.stamps: list[str] = []
        self.timestamps = False
        self.follow = True
        self.wrap = False
        self.search = ""
        self._search_lower = ""
        self._width = 0  # the longest line, for horizontal scrolling when not wrapping
        self._rows: list[tuple[int, int]] = []  # wrap mode: (line index, start offset) per visual row
        self._rows_width = 0
        self._hl = Style(bgcolor="yellow", color="black", bold=True)
        self._stamp_style = Style(dim=True)

    # --- content ---------------------------------------------------------------------------

    @property
    def line_count(self) -> int:
        return len(self.lines)

    def clear(self) -> None:
        self.replace([])

    def replace(self, lines: Iterable[str], stamp: str = "") -> None:
        self.lines = [clean_line(line) for line in lines][-self.max_lines:]
        self.stamps = [stamp or BACKLOG] * len(self.lines)
        self._width = max((len(line) for line in self.lines), default=0)
        self._rows = []
        self._rows_width = 0
        self._update_size()

    def append(self, lines: Iterable[str], stamp: str = "") -> None:
        new = [clean_line(line) for line in lines]
        if not new:
            return
        self.lines.extend(new)
        self.stamps.extend([stamp or BACKLOG] * len(new))
        self._width = max(self._width, max(len(line) for line in new))
        overflow = len(self.lines) - self.max_lines
        if overflow > 0:
            # Drop the oldest in one slice (amortised: at least a tenth of the cap at a time).
            overflow = max(overflow, self.max_lines // 10)
            del self.lines[:overflow]
            del self.stamps[:overflow]
            self._rows = []
            self._rows_width = 0
        elif self.wrap and self._rows_width:
            self._extend_rows(len(self.lines) - len(new))
        self._update_size()

    def _wrap_width(self) -> int:
        width = self.scrollable_content_region.width or self.size.width or 80
        return max(10, width - (STAMP_WIDTH if self.timestamps else 0))

    def _extend_rows(self, start: int) -> None:
        width = self._rows_width
        rows = self._rows
        for index in range(start, len(self.lines)):
            length = len(self.lines[index])
            if length <= width:
                rows.append((index, 0))
            else:
                rows.extend((index, offset) for offset in range(0, length, width))

    def _ensure_rows(self) -> None:
        width = self._wrap_width()
        if self._rows_width != width:
            self._rows = []
            self._rows_width = width
            self._extend_rows(0)

    def _update_size(self) -> None:
        if self.wrap:
            self._ensure_rows()
            self.virtual_size = Size(self._rows_width, len(self._rows))
        else:
            self.virtual_size = Size(self._width + 1 + (STAMP_WIDTH if self.timestamps else 0), len(self.lines))
        if self.follow:
            self._scroll_end()
            self.call_after_refresh(self._scroll_end)
        self.refresh()

    def _scroll_end(self) -> None:
        if self.follow:
            self.scroll_to(y=max(0, self.virtual_size.height - self.scrollable_content_region.height),
                           animate=False, immediate=True)

    # --- options ---------------------------------------------------------------------------

    def set_wrap(self, wrap: bool) -> None:
        top = self._top_line()
        self.wrap = wrap
        self._rows = []
        self._rows_width = 0
        self._update_size()
        if not self.follow:
            self.scroll_to_line(top)

    def set_timestamps(self, on: bool) -> None:
        """Prefix each line with the time it arrived (the agent's log lines carry none of their own)."""
        top = self._top_line()
        self.timestamps = on
        self._rows = []
        self._rows_width = 0
        self._update_size()
        if not self.follow:
            self.scroll_to_line(top)
        self.refresh()

    def set_follow(self, follow: bool) -> None:
        if follow != self.follow:
            self.follow = follow
            self.post_message(self.FollowChanged(follow))
        if follow:
            self._update_size()

    def set_search(self, text: str) -> None:
        self.search = text
        self._search_lower = text.lower()
        self.refresh()

    def matches(self) -> list[int]:
        needle = self._search_lower
        if not needle:
            return []
        return [i for i, line in enumerate(self.lines) if needle in line.lower()]

    def find(self, forward: bool = True) -> int | None:
        """Scroll to the next (or previous) line matching the search; returns its index."""
        needle = self._search_lower
        if not needle or not self.lines:
            return None
        start = self._top_line()
        count = len(self.lines)
        order = (range(start + 1, start + 1 + count) if forward else range(start - 1, start - 1 - count, -1))
        for step in order:
            index = step % count
            if needle in self.lines[index].lower():
                self.set_follow(False)
                self.scroll_to_line(index)
                return index
        return None

    def _top_line(self) -> int:
        y = int(self.scroll_offset.y)
        if self.wrap and self._rows:
            return self._rows[min(y, len(self._rows) - 1)][0]
        return y

    def scroll_to_line(self, index: int) -> None:
        if self.wrap:
            self._ensure_rows()
            row = next((r for r, (line, _) in enumerate(self._rows) if line >= index), 0)
        else:
            row = index
        self.scroll_to(y=row, animate=False, immediate=True)
        self.refresh()

    # --- rendering -------------------------------------------------------------------------

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.size.width
        style = self.rich_style
        row = scroll_y + y
        if self.wrap:
            if row >= len(self._rows):
                return Strip.blank(width, style)
            index, offset = self._rows[row]
            text = self.lines[index][offset: offset + self._rows_width]
            strip = self._strip(text)
            if self.timestamps:
                strip = self._stamped(strip, self.stamps[index] if offset == 0 else "")
            return strip.crop_extend(0, width, style)
        if row >= len(self.lines):
            return Strip.blank(width, style)
        strip = self._strip(self.lines[row])
        if self.timestamps:
            strip = self._stamped(strip, self.stamps[row])
        return strip.crop_extend(scroll_x, scroll_x + width, style)

    def _stamped(self, strip: Strip, stamp: str) -> Strip:
        return Strip([Segment(stamp.ljust(STAMP_WIDTH), self._stamp_style), *strip])

    def _strip(self, text: str) -> Strip:
        needle = self._search_lower
        if not needle or needle not in text.lower():
            return Strip([Segment(text, _PLAIN)])
        segments: list[Segment] = []
        lower = text.lower()
        position = 0
        while True:
            found = lower.find(needle, position)
            if found < 0:
                break
            if found > position:
                segments.append(Segment(text[position:found], _PLAIN))
            segments.append(Segment(text[found: found + len(needle)], self._hl))
            position = found + len(needle)
        if position < len(text):
            segments.append(Segment(text[position:], _PLAIN))
        return Strip(segments)

    # --- scrolling -------------------------------------------------------------------------

    def on_resize(self) -> None:
        if self.wrap or self.follow:
            self._update_size()

    def action_scroll_by(self, delta: int) -> None:
        if delta < 0:
            self.set_follow(False)
        self.scroll_to(y=self.scroll_offset.y + delta, animate=False, immediate=True)
        if delta > 0 and self.scroll_offset.y >= self.max_scroll_y:
            self.set_follow(True)

    def action_page(self, direction: int) -> None:
        self.action_scroll_by(direction * max(1, self.size.height - 1))

    def action_top(self) -> None:
        self.set_follow(False)
        self.scroll_to(y=0, animate=False, immediate=True)

    def action_bottom(self) -> None:
        self.set_follow(True)

    def action_scroll_x_by(self, delta: int) -> None:
        if not self.wrap:
            self.scroll_to(x=max(0, self.scroll_offset.x + delta), animate=False, immediate=True)

    def _on_mouse_scroll_up(self, event: Any) -> None:
        self.set_follow(False)
        super()._on_mouse_scroll_up(event)
