"""Widgets: the cluster header, a flicker-free resource table, the prompt bar, the footer (the GPU heatmap
is in heatmap.py)."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from rich.cells import cell_len
from rich.console import Console
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.suggester import SuggestFromList
from textual.containers import HorizontalGroup
from textual.widgets import Footer, Input, Static

from maas_tui.render import format as fmt
from maas_tui.tui.state import ClusterState
from maas_tui.tui.views.registry import commands, navigable

_PLAIN = Style()

# --- header ------------------------------------------------------------------------------


def set_content(widget: Static, content: Text, layout: bool = False) -> bool:
    """Update a Static only when what it shows changed; without a layout pass unless asked."""
    key = (content.plain, tuple(content.spans), content.style)
    if getattr(widget, "_maas_key", None) == key:
        return False
    widget._maas_key = key  # type: ignore[attr-defined]
    widget.update(content, layout=layout)
    return True


class ClusterHeader(Static):
    """Two lines: where we are and whether the stream is live; then the cluster at a glance."""

    def __init__(self, view: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.view = view

    def show(self, state: ClusterState, server: str) -> None:
        set_content(self, self.render_text(state, server, self.view))

    @staticmethod
    def render_text(state: ClusterState, server: str, view: str) -> Text:
        s = state.summary()
        line = Text()
        line.append(" maas ", style="bold reverse")
        line.append(f" {fmt.truncate(view, 28)} ", style="bold")
        host = server.split("://", 1)[-1].rstrip("/")
        line.append(f" {fmt.middle_truncate(host, 24)} ", style="dim")
        if state.connected:
            line.append("● live", style="bold green")
        elif state.error and state.auth_failed:
            line.append("✖ refused — run maas login", style="bold red")
        elif state.error:
            line.append("✖ disconnected — reconnecting", style="bold red")
        else:
            line.append("… connecting", style="yellow")
        alerts: list[str] = [f"{s.alerts_firing} alerts"] if s.alerts_firing else []
        if s.instances_error:
            alerts.append(f"{s.instances_error} error")
        if s.instances_unreachable:
            alerts.append(f"{s.instances_unreachable} unreach")
        if s.workers_not_ready:
            alerts.append(f"{s.workers_not_ready} down")
        right = Text("⚠ " + " · ".join(alerts), style="bold red") if alerts else Text("✓ no alerts", style="green")
        line.append("  ")
        line.append_text(right)
        line.append("\n")
        line.append(" Workers ", style="bold")
        line.append(f"{s.workers_ready}/{s.workers_total}", style="green" if s.workers_ready == s.workers_total else "red")
        line.append(" ready │ ", style="dim")
        line.append("GPUs ", style="bold")
        line.append(f"{s.gpus_claimed}/{s.gpus_total}")
        line.append(" claimed", style="dim")
        if s.gpus_simulated:
            line.append(f" ({s.gpus_simulated} sim)", style="italic yellow")
        line.append(" │ ", style="dim")
        line.append("Models ", style="bold")
        line.append(f"{s.models_ready}/{s.models_total}", style="green" if s.models_ready == s.models_total else "yellow")
        line.append(" · replicas ", style="dim")
        line.append(f"{s.replicas_ready}/{s.replicas_desired}",
                    style="green" if s.replicas_ready >= s.replicas_desired else "yellow")
        line.no_wrap = True
        line.overflow = "ellipsis"
        return line


# --- resource table ----------------------------------------------------------------------


# Row cursor keys shared by the tables and the heatmap (each implements move, page, jump, select).
CURSOR_BINDINGS = [
    Binding("up,k", "move(-1)", "Up", show=False),
    Binding("down,j", "move(1)", "Down", show=False),
    Binding("pageup", "page(-1)", show=False),
    Binding("pagedown", "page(1)", show=False),
    Binding("home,g", "jump(0)", show=False),
    Binding("end,G", "jump(-1)", show=False),
    Binding("enter", "select", "Describe"),
]


class ResourceTable(ScrollView, can_focus=True):
    """A line-virtualised table synced with a list of keyed rows.

    Only visible rows are rendered, and each rendered row is cached by its cells: an update that
    changes 1,000 rows re-renders only the twenty on screen. A sync keeps the cursor on the row
    with the same key (rows may come and go around it) and paints once, so nothing flickers.
    """

    COMPONENT_CLASSES = {"resource-table--header", "resource-table--cursor"}
    DEFAULT_CSS = """
    ResourceTable > .resource-table--header { text-style: bold; color: $text-accent; }
    ResourceTable > .resource-table--cursor { background: $block-cursor-background; color: $block-cursor-foreground;
                                              text-style: bold; }
    ResourceTable:blur > .resource-table--cursor { background: $block-cursor-blurred-background; text-style: bold; }
    """
    BINDINGS = [
        *CURSOR_BINDINGS,
        Binding("left", "scroll_x_by(-8)", show=False),
        Binding("right", "scroll_x_by(8)", show=False),
    ]

    cursor_row = reactive(0, repaint=False, init=False)

    class RowHighlighted(Message):
        def __init__(self, key: str | None) -> None:
            super().__init__()
            self.key = key

    class RowSelected(Message):
        def __init__(self, key: str) -> None:
            super().__init__()
            self.key = key

    def __init__(self, columns: Sequence[tuple[str, int | None]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._column_spec = list(columns)
        self._labels = [label for label, _ in self._column_spec]
        self._widths = [len(label) for label in self._labels]
        self._keys: list[str] = []
        self._cells: dict[str, tuple[Any, ...]] = {}
        self._strips: dict[str, tuple[tuple, Strip]] = {}
        self._table_style_cache: tuple | None = None

    # --- data --------------------------------------------------------------------------------

    def set_columns(self, columns: Sequence[tuple[str, int | None]]) -> None:
        """Change the columns (wide mode, the sort marker); the next `sync` brings rows to match."""
        columns = list(columns)
        if columns == self._column_spec:
            return
        self._column_spec = columns
        self._labels = [label for label, _ in columns]
        self._widths = [len(label) for label in self._labels]
        self._strips.clear()
        self.refresh()

    @property
    def row_count(self) -> int:
        return len(self._keys)

    @property
    def selected_key(self) -> str | None:
        if not self._keys or not 0 <= self.cursor_row < len(self._keys):
            return None
        return self._keys[self.cursor_row]

    def get_cell(self, key: str, column: str) -> Any:
        labels = [label.rstrip("↑↓") for label in self._labels]
        return self._cells[key][labels.index(column)]

    def get_row(self, key: str) -> tuple[Any, ...]:
        return self._cells[key]

    def sync(self, rows: Iterable[tuple[str, tuple[Any, ...]]]) -> None:
        rows = list(rows)
        keys = [key for key, _ in rows]
        selected = self.selected_key
        widths = [len(label) for label in self._labels]
        for _, cells in rows:
            for index, value in enumerate(cells):
                length = _cell_width(value)
                if length > widths[index]:
                    widths[index] = length
        for index, (_, cap) in enumerate(self._column_spec):
            if cap is not None:
                widths[index] = min(widths[index], cap)
        if widths != self._widths:
            self._widths = widths
            self._strips.clear()
        self._cells = dict(rows)
        if keys != self._keys:
            self._keys = keys
            live = set(keys)
            for key in [k for k in self._strips if k not in live]:
                del self._strips[key]
            if keys:
                target = keys.index(selected) if selected in keys else min(max(self.cursor_row, 0), len(keys) - 1)
            else:
                target = 0
            if target != self.cursor_row:
                self.set_reactive(ResourceTable.cursor_row, target)
                self._scroll_cursor_into_view()
            if self.selected_key != selected:
                self.post_message(self.RowHighlighted(self.selected_key))
        size = Size(sum(widths) + 2 * len(widths), len(keys) + 1)
        if size != self.virtual_size:
            self.virtual_size = size
        self.refresh()

    # --- rendering ---------------------------------------------------------------------------

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._table_style_cache = None
        self._strips.clear()

    def _table_styles(self) -> tuple[Style, Style]:
        if self._table_style_cache is None:
            self._table_style_cache = (self.get_component_rich_style("resource-table--header"),
                                self.get_component_rich_style("resource-table--cursor"))
        return self._table_style_cache  # type: ignore[return-value]

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        scroll_x, scroll_y = self.scroll_offset
        base = self.rich_style
        header_style, cursor_style = self._table_styles()
        if y == 0:
            segments = []
            for label, column_width in zip(self._labels, self._widths):
                segments.append(Segment(" " + label.ljust(column_width) + " ", header_style))
            strip = Strip(segments)
        else:
            index = scroll_y + y - 1
            if index >= len(self._keys):
                return Strip.blank(width, base)
            key = self._keys[index]
            cells = self._cells[key]
            selected = index == self.cursor_row
            signature = (cells, selected, self.has_focus)
            cached = self._strips.get(key)
            if cached is not None and cached[0] == signature:
                strip = cached[1]
            else:
                segments = []
                for value, column_width in zip(cells, self._widths):
                    segments.append(Segment(" ", _PLAIN))
                    segments.extend(Segment.adjust_line_length(_cell_segments(value), column_width, _PLAIN))
                    segments.append(Segment(" ", _PLAIN))
                if selected:
                    segments = list(Segment.apply_style(segments, post_style=cursor_style))
                strip = Strip(segments)
                self._strips[key] = (signature, strip)
        return strip.crop_extend(scroll_x, scroll_x + width, base).apply_style(base)

    # --- cursor ------------------------------------------------------------------------------

    def move_cursor(self, row: int, **_: Any) -> None:
        if self._keys:
            self.cursor_row = max(0, min(len(self._keys) - 1, row))

    def watch_cursor_row(self, old: int, new: int) -> None:
        self._scroll_cursor_into_view()
        self.refresh()
        self.post_message(self.RowHighlighted(self.selected_key))

    def _scroll_cursor_into_view(self) -> None:
        visible = max(1, self.scrollable_content_region.height - 1)
        top = self.scroll_offset.y
        if self.cursor_row < top:
            self.scroll_to(y=self.cursor_row, animate=False, immediate=True)
        elif self.cursor_row >= top + visible:
            self.scroll_to(y=self.cursor_row - visible + 1, animate=False, immediate=True)

    def action_move(self, delta: int) -> None:
        self.move_cursor(self.cursor_row + delta)

    def action_page(self, direction: int) -> None:
        self.action_move(direction * max(1, self.scrollable_content_region.height - 2))

    def action_jump(self, where: int) -> None:
        self.move_cursor(0 if where == 0 else len(self._keys) - 1)

    def action_scroll_x_by(self, delta: int) -> None:
        self.scroll_to(x=max(0, self.scroll_offset.x + delta), animate=False, immediate=True)

    def action_select(self) -> None:
        if (key := self.selected_key) is not None:
            self.post_message(self.RowSelected(key))

    def on_click(self, event: Any) -> None:
        index = self.scroll_offset.y + event.y - 1
        if event.y >= 1 and 0 <= index < len(self._keys):
            self.move_cursor(index)
            if event.chain >= 2:
                self.action_select()

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()


def _cell_width(value: Any) -> int:
    text = value.plain if isinstance(value, Text) else value if isinstance(value, str) else str(value)
    return len(text) if text.isascii() else cell_len(text)


def _cell_segments(value: Any) -> list[Segment]:
    if isinstance(value, Text):
        if not value.spans:
            style = value.style
            if isinstance(style, str):
                style = _parse_style(style)
            return [Segment(value.plain, style or _PLAIN)]
        return list(value.render(_TEXT_CONSOLE, end=""))
    return [Segment(str(value), _PLAIN)]


_STYLE_CACHE: dict[str, Style] = {}


def _parse_style(name: str) -> Style:
    style = _STYLE_CACHE.get(name)
    if style is None:
        style = _STYLE_CACHE[name] = Style.parse(name) if name else _PLAIN
    return style


_TEXT_CONSOLE = Console(width=1000, color_system=None, legacy_windows=False, force_terminal=False)


# --- prompt bar --------------------------------------------------------------------------

class PromptBar(Input):
    """The `:` command line and the `/` filter, one line above the footer; hidden until asked for."""

    BINDINGS = [Binding("tab", "complete", "Complete", show=False, priority=True)]

    mode = reactive("command")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(compact=True, suggester=SuggestFromList(list(commands()) + ["dashboard"],
                                                                 case_sensitive=False), **kwargs)

    def open(self, mode: str, value: str = "") -> None:
        self.mode = mode
        if self.parent is not None:
            self.parent.display = True
            label = {"command": ":", "filter": "/", "search": "search /"}.get(mode, ">")
            self.parent.query_one("#prompt-label", Static).update(label)
            hint = {"command": "tab completes · enter · esc", "filter": "!x negates · enter · esc clears",
                    "search": "enter jumps · n/N · esc"}.get(mode, "")
            self.parent.query_one("#prompt-hint", Static).update(hint)
        self.suggester = (SuggestFromList([n for names in commands().values() for n in names if len(n) > 2],
                                          case_sensitive=False) if mode == "command" else None)
        self.placeholder = (f"resource: {' '.join(navigable())} (Tab completes)"
                            if mode == "command" else "filter: text, or !text to hide matches")
        self.value = value
        self.cursor_position = len(value)
        self.display = True
        self.focus()

    def close(self) -> None:
        if self.parent is not None:
            self.parent.display = False

    @property
    def is_open(self) -> bool:
        return self.parent is not None and bool(self.parent.display)

    def action_complete(self) -> None:
        suggestion = getattr(self, "_suggestion", "")
        if suggestion and suggestion != self.value:
            self.value = suggestion
            self.cursor_position = len(suggestion)


# --- footer ------------------------------------------------------------------------------


class KeyFooter(Footer):
    """Textual's footer, wrapped onto a second line when the keys do not fit (80 columns and many actions)."""

    DEFAULT_CSS = """
    KeyFooter { layout: vertical; height: auto; max-height: 2; }
    KeyFooter > HorizontalGroup.footer-row { height: 1; width: 1fr; }
    """

    def compose(self) -> Any:
        keys = list(super().compose())
        width = (self.size.width or self.app.size.width or 80) - 1
        rows: list[list[Any]] = [[]]
        used = 0
        for key in keys:
            need = cell_len(getattr(key, "key_display", "") or "") + cell_len(getattr(key, "description", "") or "") + 2
            if rows[-1] and used + need > width:
                rows.append([])
                used = 0
            rows[-1].append(key)
            used += need
        for row in rows[:2]:
            yield HorizontalGroup(*row, classes="footer-row")

    def on_resize(self, event: Any) -> None:
        if self._bindings_ready and event.size.width != getattr(self, "_laid_width", None):
            self._laid_width = event.size.width
            self.call_after_refresh(self.recompose)
