"""Events: the cluster's event stream, newest first, live."""

from __future__ import annotations

from typing import Any, Iterable

from maas_tui.render import events as render
from maas_tui.tui.views.base import TableScreen
from maas_tui.tui.views.registry import view


@view("events", "Events", aliases=("event", "ev"))
class EventsScreen(TableScreen):
    TITLE_TEXT = "Events"
    KINDS = {"events"}
    COLUMNS = render.COLUMNS
    SHOWN = 500

    def rows(self) -> Iterable[tuple[str, tuple[Any, ...]]]:
        return render.rows(reversed(list(self.state.events)[-self.SHOWN:]), self.now)

    def title_extra(self) -> str:
        return "newest first · live"

    def describe(self, key: str) -> None:
        event = next((e for e in self.state.events if str(e.id) == key), None)
        if event is None:
            return
        kind = {"models": "model", "instances": "instance", "workers": "worker"}.get(event.kind)
        if kind:
            self.app.describe(kind, event.object_name)
