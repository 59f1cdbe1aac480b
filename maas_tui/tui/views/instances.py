"""Instances: where each replica runs or why it waits; logs, restart, delete."""

from __future__ import annotations

from typing import Any, Iterable

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Static

from maas_tui.render import instances as render
from maas_tui.tui.views.base import TableScreen
from maas_tui.tui.views.registry import view
from maas_tui.tui.widgets import ResourceTable, set_content


@view("instances", "Instances", aliases=("instance", "inst", "in", "pods", "po"))
class InstancesScreen(TableScreen):
    TITLE_TEXT = "Instances"
    KINDS = {"instances"}
    COLUMNS = render.COLUMNS
    WIDE_COLUMNS = render.WIDE_COLUMNS
    BINDINGS = [Binding("l", "logs", "Logs", tooltip="the log"), Binding("r", "restart", "Restart", tooltip="restart (asks first)"),
                Binding("ctrl+d", "delete", "Delete", tooltip="delete (it is replaced)")]

    def compose_body(self) -> ComposeResult:
        yield from super().compose_body()
        yield Static(id="row-detail")

    def rows(self) -> Iterable[tuple[str, tuple[Any, ...]]]:
        return render.rows(self.state, self.now)

    def refresh_body(self, kinds: set[str] | None = None) -> None:
        super().refresh_body(kinds)
        self.update_row_detail()

    @on(ResourceTable.RowHighlighted)
    def update_row_detail(self) -> None:
        """The highlighted instance's reason, in full, under the table (the describe pane has the rest)."""
        key = self.table.selected_key
        inst = self.state.instance_by_name(key) if key else None
        text = render.reason_line(inst) if inst is not None else Text()
        set_content(self.query_one("#row-detail", Static), text, layout=True)

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
