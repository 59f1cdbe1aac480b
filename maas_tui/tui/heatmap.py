"""The dashboard's GPU heatmap: one row per worker, one coloured cell per GPU, host CPU/RAM bars."""

from __future__ import annotations

from typing import Any

from rich.segment import Segment
from rich.style import Style
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from maas_tui.render import format as fmt
from maas_tui.tui.state import ClusterState
from maas_tui.tui.widgets import CURSOR_BINDINGS
from server import schemas

_PLAIN = Style()


METRICS = {"util": "utilisation %", "mem": "memory used %", "claim": "memory claimed %"}
SHORT_METRICS = {"util": "util %", "mem": "mem used %", "claim": "claimed %"}


class GpuHeatmap(ScrollView, can_focus=True):
    """One row per worker, one cell per GPU, coloured by the chosen metric with the number printed.

    Line-virtualised: only the visible rows are rendered, so thousands of GPUs scroll without lag.
    """

    BINDINGS = CURSOR_BINDINGS

    cursor = reactive(0, repaint=False, init=False)

    class Highlighted(Message):
        def __init__(self, worker: schemas.WorkerOut | None) -> None:
            super().__init__()
            self.worker = worker

    class Selected(Message):
        def __init__(self, worker: schemas.WorkerOut) -> None:
            super().__init__()
            self.worker = worker

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rows: list[schemas.WorkerOut] = []
        self.metric = "util"
        self.state: ClusterState | None = None
        self._max_gpus = 0
        self._name_width = 12
        self._strip_cache: dict[int, tuple[tuple, Strip]] = {}
        self._dim = Style(dim=True)
        self._bold = Style(bold=True)
        self._cursor_style = Style(reverse=True, bold=True)

    # data
    def set_rows(self, state: ClusterState, rows: list[schemas.WorkerOut], metric: str) -> None:
        previous = self.rows[self.cursor].id if self.rows and 0 <= self.cursor < len(self.rows) else None
        self.state = state
        self.rows = rows
        self.metric = metric
        self._max_gpus = max((len(w.gpus) for w in rows), default=0)
        self._name_width = max(8, min(20, max((len(w.name) for w in rows), default=8)))
        if previous is not None:
            index = next((i for i, w in enumerate(rows) if w.id == previous), None)
            if index is not None and index != self.cursor:
                self.set_reactive(GpuHeatmap.cursor, index)
        if self.cursor >= len(rows):
            self.set_reactive(GpuHeatmap.cursor, max(0, len(rows) - 1))
        size = Size(self._row_width(), len(rows) + 1)
        if size != self.virtual_size:
            self.virtual_size = size
        self.refresh()

    @property
    def current(self) -> schemas.WorkerOut | None:
        return self.rows[self.cursor] if 0 <= self.cursor < len(self.rows) else None

    def _cells_width(self) -> int:
        return 4 * max(self._max_gpus, 3)

    def _bar_width(self) -> int:
        fixed = 1 + self._name_width + 3 + self._cells_width() + 14
        return max(3, min(12, (max(self.size.width, 60) - fixed) // 2))

    def _row_width(self) -> int:
        return 1 + self._name_width + 3 + self._cells_width() + 14 + 2 * self._bar_width()

    # rendering
    def value(self, worker: schemas.WorkerOut, gpu: schemas.GPUDevice) -> float:
        if self.metric == "mem":
            return 100.0 * gpu.memory_used / gpu.memory_total if gpu.memory_total else 0.0
        if self.metric == "claim":
            claimed = self.state.claimed_bytes(worker.id, gpu.index) if self.state else 0
            return min(100.0, 100.0 * claimed / gpu.memory_total) if gpu.memory_total else 0.0
        return gpu.utilization

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        scroll_x, scroll_y = self.scroll_offset
        if y == 0:
            strip = self._header_strip()
        else:
            index = scroll_y + y - 1
            if index >= len(self.rows):
                return Strip.blank(width, self.rich_style)
            strip = self._row_strip(index)
        return strip.crop_extend(scroll_x, scroll_x + width, self.rich_style)

    def _header_strip(self) -> Strip:
        bar = self._bar_width()
        cells = self._cells_width()
        gpu_title = fmt.truncate(f"GPU {SHORT_METRICS[self.metric]}", cells - 1)
        text = (" " + "WORKER".ljust(self._name_width) + "   "
                + gpu_title.ljust(cells) + "  " + "CPU %".ljust(bar + 7) + "RAM %")
        return Strip([Segment(text, self._bold)])

    def _row_strip(self, index: int) -> Strip:
        worker = self.rows[index]
        selected = index == self.cursor
        values = tuple(round(self.value(worker, g)) for g in worker.gpus)
        key = (worker.id, worker.name, worker.state, values, round(worker.host.cpu_percent),
               worker.host.memory_used, worker.host.memory_total, selected, self.metric, self.size.width)
        cached = self._strip_cache.get(index)
        if cached is not None and cached[0] == key:
            return cached[1]
        segments: list[Segment] = []
        name = fmt.truncate(worker.name, self._name_width).ljust(self._name_width)
        segments.append(Segment("▶" if selected else " ", self._bold))
        segments.append(Segment(name, self._cursor_style if selected else self._bold))
        ready = worker.state == "ready"
        segments.append(Segment(" ● " if ready else " ✖ ", Style(color="green" if ready else "red", bold=True)))
        if worker.gpus:
            for value in values:
                segments.append(Segment(f"{value:>3}", fmt.cell_style(value)))
                segments.append(Segment(" ", _PLAIN))
            pad = self._cells_width() - 4 * len(values)
        else:
            label = "(no GPU)"
            segments.append(Segment(label, self._dim))
            pad = self._cells_width() - len(label)
        segments.append(Segment(" " * max(0, pad), _PLAIN))
        bar = self._bar_width()
        cpu = worker.host.cpu_percent
        ram = 100.0 * worker.host.memory_used / worker.host.memory_total if worker.host.memory_total else 0.0
        for value in (cpu, ram):
            segments.append(Segment("  ", _PLAIN))
            filled = round(max(0.0, min(100.0, value)) / 100 * bar)
            segments.append(Segment(fmt.BAR_FULL * filled, _fg(fmt.percent_color(value))))
            segments.append(Segment(fmt.BAR_EMPTY * (bar - filled), _fg("grey42")))
            segments.append(Segment(f"{round(value):>4}%", _PLAIN))
        strip = Strip(segments)
        self._strip_cache[index] = (key, strip)
        return strip

    # cursor
    def watch_cursor(self, old: int, new: int) -> None:
        self._strip_cache.pop(old, None)
        self._strip_cache.pop(new, None)
        self._scroll_cursor_into_view()
        self.refresh()
        self.post_message(self.Highlighted(self.current))

    def _scroll_cursor_into_view(self) -> None:
        visible = max(1, self.size.height - 1)
        top = self.scroll_offset.y
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False, immediate=True)
        elif self.cursor >= top + visible:
            self.scroll_to(y=self.cursor - visible + 1, animate=False, immediate=True)

    def action_move(self, delta: int) -> None:
        if self.rows:
            self.cursor = max(0, min(len(self.rows) - 1, self.cursor + delta))

    def action_page(self, direction: int) -> None:
        self.action_move(direction * max(1, self.size.height - 2))

    def action_jump(self, where: int) -> None:
        if self.rows:
            self.cursor = 0 if where == 0 else len(self.rows) - 1

    def action_select(self) -> None:
        if self.current is not None:
            self.post_message(self.Selected(self.current))

    def on_resize(self) -> None:
        self._strip_cache.clear()
        self.virtual_size = Size(self._row_width(), len(self.rows) + 1)


_FG: dict[str, Style] = {}


def _fg(color: str) -> Style:
    style = _FG.get(color)
    if style is None:
        style = _FG[color] = Style(color=color)
    return style


