"""The audit log: every change made through the API, newest first (admins only; read over REST, not watched)."""

from __future__ import annotations

from typing import Any, Iterable

from rich.markup import escape
from textual.binding import Binding

from maas_tui.render import audit as render
from maas_tui.tui.views.base import TableScreen
from maas_tui.tui.views.registry import view


@view("audit", "Audit log", aliases=("au",))
class AuditScreen(TableScreen):
    TITLE_TEXT = "Audit log"
    KINDS = {"audit"}
    COLUMNS = render.COLUMNS
    WIDE_COLUMNS = render.WIDE_COLUMNS
    BINDINGS = [Binding("ctrl+r", "reload", "Reload", show=False, tooltip="reload the log")]

    # Textual also runs MaasScreen's handlers for these events (base-class handlers are not overridden).
    def on_screen_resume(self) -> None:
        self.app.load_audit()

    def on_mount(self) -> None:
        self.app.load_audit()

    def rows(self) -> Iterable[tuple[str, tuple[Any, ...]]]:
        return render.rows(self.state.audit)

    def title_extra(self) -> str:
        if self.state.audit_error:
            return f"[b red]{escape(self.state.audit_error)}[/]"
        return "newest first · enter: the whole entry · ctrl+w: WHAT"

    def describe(self, key: str) -> None:
        self.app.describe("audit", key)

    def action_reload(self) -> None:
        self.app.load_audit()
