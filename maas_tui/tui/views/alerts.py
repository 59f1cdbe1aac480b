"""Alerts: firing first (critical red, warning yellow, silenced dim), then the resolved ones, newest first.
Watched live (kind `alerts`) and read again over REST when shown or on ctrl+r; enter opens the object."""

from __future__ import annotations

from typing import Any, Iterable

import aiohttp
from textual.binding import Binding

from maas_tui.client import ApiClientError
from maas_tui.render import alerts as render
from maas_tui.tui.views.base import TableScreen
from maas_tui.tui.views.registry import view

_DESCRIBED = {"models": "model", "instances": "instance", "workers": "worker"}


@view("alerts", "Alerts", aliases=("alert", "al"))
class AlertsScreen(TableScreen):
    TITLE_TEXT = "Alerts"
    KINDS = {"alerts"}
    COLUMNS = render.COLUMNS
    WIDE_COLUMNS = render.WIDE_COLUMNS
    BINDINGS = [Binding("ctrl+r", "reload", "Reload", show=False, tooltip="read the alerts again")]

    # Textual also runs MaasScreen's handlers for these events (base-class handlers are not overridden).
    def on_screen_resume(self) -> None:
        self.action_reload()

    def on_mount(self) -> None:
        self.action_reload()

    def rows(self) -> Iterable[tuple[str, tuple[Any, ...]]]:
        return render.rows(self.state.alerts.values(), self.now)

    def title_extra(self) -> str:
        return f"{render.firing_count(self.state.alerts.values())} firing · enter: the object · ctrl+w: severity, team"

    def describe(self, key: str) -> None:
        alert = self.state.alerts.get(int(key)) if key.isdigit() else None
        if alert is not None and (kind := _DESCRIBED.get(alert.object_kind)):
            self.app.describe(kind, alert.object_name)

    def action_reload(self) -> None:
        app, state = self.app, self.state

        async def run() -> None:
            try:
                alerts = await app.client.list_alerts()
            except (ApiClientError, aiohttp.ClientError, OSError, TimeoutError):
                return  # the watch keeps what it has; the header says when the server is away
            state.alerts = {a.id: a for a in alerts}
            state.revision["alerts"] += 1
            app.mark_dirty({"alerts"})

        app.run_worker(run, group="alerts", exclusive=True)
