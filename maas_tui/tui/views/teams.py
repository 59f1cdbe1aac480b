"""Teams: members, and what each team's instances claim against its quota (read over REST, not watched)."""

from __future__ import annotations

from typing import Any, Iterable

from textual.binding import Binding

from maas_tui.render import teams as render
from maas_tui.tui.views.base import TableScreen
from maas_tui.tui.views.registry import view


@view("teams", "Teams", aliases=("team",), notes=("a used/limit in yellow: the quota is used up; the team's next "
                                                  "instance waits (quota_exceeded)",))
class TeamsScreen(TableScreen):
    TITLE_TEXT = "Teams"
    KINDS = {"teams"}
    COLUMNS = render.COLUMNS
    WIDE_COLUMNS = render.WIDE_COLUMNS
    BINDINGS = [Binding("ctrl+r", "reload", "Reload", show=False, tooltip="reload the list")]

    # Textual also runs MaasScreen's handlers for these events (base-class handlers are not overridden).
    def on_screen_resume(self) -> None:
        self.app.load_teams()

    def on_mount(self) -> None:
        self.app.load_teams()

    def rows(self) -> Iterable[tuple[str, tuple[Any, ...]]]:
        return render.rows(self.state.teams, self.now)

    def title_extra(self) -> str:
        return "used/limit · enter: quota left"

    def describe(self, key: str) -> None:
        self.app.describe("team", key)

    def action_reload(self) -> None:
        self.app.load_teams()
