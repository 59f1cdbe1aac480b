"""API keys: name, prefix, expiry, last use; create (the secret is shown once) and revoke."""

from __future__ import annotations

from typing import Any, Iterable

from textual.binding import Binding

from maas_tui.render import keys as render
from maas_tui.tui.views.base import TableScreen
from maas_tui.tui.views.registry import view


@view("keys", "Keys", aliases=("key", "apikeys"))
class KeysScreen(TableScreen):
    TITLE_TEXT = "API keys"
    KINDS = {"keys"}
    COLUMNS = render.COLUMNS
    WIDE_COLUMNS = render.WIDE_COLUMNS
    BINDINGS = [Binding("n", "create", "Create", tooltip="create a key (its secret is shown once)"),
                Binding("ctrl+d", "revoke", "Revoke", tooltip="revoke (asks first)"),
                Binding("ctrl+r", "reload", "Reload", show=False, tooltip="reload the list")]

    # Textual also runs MaasScreen's handlers for these events (base-class handlers are not overridden).
    def on_screen_resume(self) -> None:
        self.app.load_keys()

    def on_mount(self) -> None:
        self.app.load_keys()

    def rows(self) -> Iterable[tuple[str, tuple[Any, ...]]]:
        return render.rows(self.state.keys, self.now)

    def title_extra(self) -> str:
        return "secrets are shown once, at creation"

    def describe(self, key: str) -> None:
        self.app.describe("key", key)

    def action_create(self) -> None:
        self.app.create_key()

    def action_revoke(self) -> None:
        if (key := self.table.selected_key) is not None:
            self.app.revoke_key(key)

    def action_reload(self) -> None:
        self.app.load_keys()
