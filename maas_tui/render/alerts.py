"""Alerts: the table columns (firing first, newest first), one alert's describe page, silences and webhooks,
for `maas alert ...` and the TUI's Alerts view and header count."""

from __future__ import annotations

from datetime import datetime
from typing import Iterable

from rich.console import RenderableType
from rich.text import Text

from maas_tui.render import format as fmt
from maas_tui.render.common import Column, Row, grid
from server.schemas.alerts import AlertOut, SilenceOut, WebhookOut

# The severity shows in the state's colour (critical red, warning yellow): 80 columns keep room for the message.
COLUMNS: list[Column] = [("STATE", None), ("RULE", None), ("OBJECT", 22), ("AGE", None), ("MESSAGE", None)]
WIDE_COLUMNS: list[Column] = [("SEVERITY", None), ("TEAM", None), ("RESOLVED", None)]
SILENCE_COLUMNS: list[Column] = [("ID", None), ("RULE", None), ("OBJECT", None), ("ENDS", None), ("ACTIVE", None),
                                 ("BY", None), ("COMMENT", None)]
WEBHOOK_COLUMNS: list[Column] = [("ID", None), ("URL", None), ("SIGNED", None), ("BY", None), ("LAST DELIVERY", None)]


def ordered(alerts: Iterable[AlertOut]) -> list[AlertOut]:
    """Firing before resolved, newest first within each."""
    return sorted(alerts, key=lambda a: (a.state != "firing", -a.id))


def firing_count(alerts: Iterable[AlertOut]) -> int:
    """What the header counts: firing alerts no silence covers."""
    return sum(1 for a in alerts if a.state == "firing" and not a.silenced)


def state_text(alert: AlertOut) -> Text:
    if alert.state == "resolved":
        return Text("resolved", style="green")
    if alert.silenced:
        return Text("silenced", style="dim")
    return Text("firing", style="bold red" if alert.severity == "critical" else "bold yellow")


def severity_text(severity: str) -> Text:
    return Text(severity, style="red" if severity == "critical" else "yellow")


def rows(alerts: Iterable[AlertOut], now: datetime, truncate: bool = True) -> Iterable[Row]:
    cut = fmt.truncate if truncate else (lambda text, _width: text)
    for a in ordered(alerts):
        resolved = fmt.age(a.resolved_at, now) + " ago" if a.resolved_at else "-"
        yield str(a.id), (state_text(a), a.rule, cut(f"{a.object_kind.rstrip('s')}/{a.object_name}", 22),
                          fmt.age(a.started_at, now), cut(" ".join(a.message.split()), 160),
                          severity_text(a.severity), a.team or "-", resolved)


def describe(alert: AlertOut, now: datetime) -> RenderableType:
    fields = grid()
    fields.add_row("Rule", Text(alert.rule))
    fields.add_row("State", state_text(alert))
    fields.add_row("Severity", severity_text(alert.severity))
    fields.add_row("Object", Text(f"{alert.object_kind} {alert.object_name}"))
    fields.add_row("Team", Text(alert.team or "-"))
    fields.add_row("Started", f"{fmt.aware(alert.started_at):%Y-%m-%d %H:%M:%S} UTC ({fmt.age(alert.started_at, now)} ago)")
    if alert.resolved_at:
        fields.add_row("Resolved", f"{fmt.aware(alert.resolved_at):%Y-%m-%d %H:%M:%S} UTC")
    fields.add_row("Message", Text(alert.message or "-", overflow="fold"))
    if alert.silenced:
        fields.add_row("Silenced", "yes: not sent to webhooks")
    return fields


def silence_rows(silences: Iterable[SilenceOut], now: datetime) -> Iterable[Row]:
    for s in silences:
        ends = f"in {fmt.age(now, s.ends_at)}" if s.active else f"{fmt.age(s.ends_at, now)} ago"
        yield str(s.id), (str(s.id), s.rule, s.object_name or "(all)", ends, "yes" if s.active else "no",
                          s.created_by, s.comment or "-")


def webhook_rows(hooks: Iterable[WebhookOut], now: datetime) -> Iterable[Row]:
    for h in hooks:
        last = f"{h.last_status} ({fmt.age(h.last_delivered_at, now)} ago)" if h.last_delivered_at else "-"
        yield str(h.id), (str(h.id), h.url, "yes" if h.signed else "no", h.created_by, last)
