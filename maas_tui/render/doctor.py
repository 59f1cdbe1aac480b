"""`maas doctor`: each worker's checks (agent/doctor.py) as a table: status, check, what was found, the fix."""

from __future__ import annotations

from typing import Iterable

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from server.schemas.telemetry import DoctorReport

STATUS_STYLES = {"ok": "bold green", "warn": "bold yellow", "fail": "bold red", "skip": "dim"}


def worst(report: DoctorReport) -> str:
    if report.error:
        return "fail"
    statuses = {c.status for c in report.checks}
    return next((s for s in ("fail", "warn") if s in statuses), "ok")


def summary(reports: Iterable[DoctorReport]) -> Text:
    reports = list(reports)
    counts = {s: sum(1 for r in reports for c in r.checks if c.status == s) for s in ("ok", "warn", "fail", "skip")}
    unreachable = sum(1 for r in reports if r.error)
    text = Text(f"{len(reports)} worker(s): ")
    for status in ("ok", "warn", "fail", "skip"):
        text.append(f"{counts[status]} {status}", style=STATUS_STYLES[status])
        text.append("  ")
    if unreachable:
        text.append(f"{unreachable} not answering", style=STATUS_STYLES["fail"])
    return text


def report_table(report: DoctorReport) -> RenderableType:
    title = Text(f"worker {report.worker}  ", style="bold")
    title.append(worst(report), style=STATUS_STYLES[worst(report)])
    if report.error:
        return Group(title, Text(f"  {report.error}", style="red"),
                     Text("  fix: check that the agent runs and that the server reaches its port", style="dim"))
    table = Table(box=None, padding=(0, 1), header_style="bold", show_edge=False)
    table.add_column("STATUS", no_wrap=True)
    table.add_column("CHECK", no_wrap=True)
    table.add_column("DETAIL", overflow="fold")
    table.add_column("FIX", overflow="fold")
    for c in report.checks:
        table.add_row(Text(c.status.upper(), style=STATUS_STYLES.get(c.status, "")), Text(c.name), Text(c.detail),
                      Text(c.fix, style="dim"))
    return Group(title, table)


def render(reports: Iterable[DoctorReport]) -> RenderableType:
    reports = list(reports)
    parts: list[RenderableType] = []
    for report in reports:
        parts += [report_table(report), Text("")]
    return Group(*parts, summary(reports))
