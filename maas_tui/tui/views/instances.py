"""Instances: where each replica runs or why it waits; logs, restart, delete."""

from __future__ import annotations

from typing import Any, Iterable

from rich.text import Text
from textual.binding import Binding

from maas_tui.render import instances as render
from maas_tui.tui.views.base import DetailTableScreen
from maas_tui.tui.views.registry import view


@view("instances", "Instances", aliases=("instance", "inst", "in", "pods", "po"))
class InstancesScreen(DetailTableScreen):
    TITLE_TEXT = "Instances"
    KINDS = {"instances"}
    COLUMNS = render.COLUMNS
    WIDE_COLUMNS = render.WIDE_COLUMNS
    BINDINGS = [Binding("l", "logs", "Logs", tooltip="the log"), Binding("r", "restart", "Restart", tooltip="restart (asks first)"),
                Binding("ctrl+d", "delete", "Delete", tooltip="delete (it is replaced)")]

    def rows(self) -> Iterable[tuple[str, tuple[Any, ...]]]:
        return render.rows(self.state, self.now)

    def row_detail(self) -> Text:
        """The highlighted instance's reason, in full, under the table (the describe pane has the rest)."""
        key = self.table.selected_key
        inst = self.state.instance_by_name(key) if key else None
        return render.reason_line(inst) if inst is not None else Text()

    def describe(self, key: str) -> None:
        self.app.describe("instance", key)

    def action_logs(self) -> None:
        if (key := self.table.selected_key) is not None:
            self.app.show_logs(key)

    def action_delete(self) -> None:
        if (key := self.table.selected_key) is not None:
            self.app.delete_instance(key)

    def action_restart(self) -> None:
        if (key := self.table.selected_key) is not None:
            self.app.restart_instance(key)
