"""Workers: every GPU host with its state, memory, claims and load; cordon, drain, remove."""

from __future__ import annotations

from typing import Any, Iterable

from textual.binding import Binding

from maas_tui.render import workers as render
from maas_tui.tui.views.base import TableScreen
from maas_tui.tui.views.registry import view


@view("workers", "Workers", aliases=("worker", "wo", "nodes", "node", "no"))
class WorkersScreen(TableScreen):
    TITLE_TEXT = "Workers"
    KINDS = {"workers", "instances"}
    COLUMNS = render.COLUMNS
    WIDE_COLUMNS = render.WIDE_COLUMNS
    BINDINGS = [Binding("c", "cordon", "Cordon", tooltip="cordon (asks first) or uncordon"),
                Binding("d", "drain", "Drain", tooltip="drain: move its instances away (asks first)"),
                Binding("ctrl+d", "delete", "Remove", tooltip="remove the worker")]

    def rows(self) -> Iterable[tuple[str, tuple[Any, ...]]]:
        return render.rows(self.state, self.now, wide=self.wide)

    def describe(self, key: str) -> None:
        self.app.describe("worker", key)

    def action_delete(self) -> None:
        if (key := self.table.selected_key) is not None:
            self.app.remove_worker(key)

    def action_cordon(self) -> None:
        if (key := self.table.selected_key) is not None:
            self.app.cordon_worker(key)

    def action_drain(self) -> None:
        if (key := self.table.selected_key) is not None:
            self.app.drain_worker(key)
