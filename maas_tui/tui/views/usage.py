"""Usage: gateway requests and tokens per model over the last 24 hours, as sparklines by hour, and who
is close to a limit (read over REST on show and ctrl+r: GET /v2/usage?by=day,hour,model,route&since=24h
and GET /v2/limits, not watched)."""

from __future__ import annotations

from typing import Any, Iterable

from rich.text import Text
from textual.binding import Binding

from maas_tui.render import usage as render
from maas_tui.tui.views.base import DetailTableScreen
from maas_tui.tui.views.registry import view


@view("usage", "Usage", notes=("sparklines: requests and tokens per hour, the last 12 hours (wide: 24), each "
                               "scaled to its own busiest hour",))
class UsageScreen(DetailTableScreen):
    TITLE_TEXT = "Usage"
    KINDS = {"usage", "limits"}
    COLUMNS = render.COLUMNS
    WIDE_COLUMNS = render.WIDE_COLUMNS
    BINDINGS = [Binding("ctrl+r", "reload", "Reload", show=False, tooltip="read the usage again")]

    # Textual also runs MaasScreen's handlers for these events (base-class handlers are not overridden).
    def on_screen_resume(self) -> None:
        self.app.load_usage()

    def on_mount(self) -> None:
        self.app.load_usage()

    def rows(self) -> Iterable[tuple[str, tuple[Any, ...]]]:
        return render.rows(self.state.usage, self.now)

    def title_extra(self) -> str:
        return "last 24 h by hour · ctrl+w: all 24 h, routes"

    def row_detail(self) -> Text:
        key = self.table.selected_key
        width = max(10, self.size.width - 1)
        lines = [render.detail(self.state.usage, key) if key else Text(""), render.near_text(self.state.limits)]
        for line in lines:  # one line each: the space under the table holds two
            line.truncate(width, overflow="ellipsis")
        return Text("\n").join(line for line in lines if line)

    def describe(self, key: str) -> None:
        self.app.describe("model", key)

    def action_reload(self) -> None:
        self.app.load_usage()
