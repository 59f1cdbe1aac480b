"""Gateway limits (rpm, tpm, concurrency, token budgets): one line per key, team or model, and the table
of `maas limits list`. What a limit means: server/schemas/limits.py."""

from __future__ import annotations

from typing import Any, Iterable

from maas_tui.render.common import Column, Row

COLUMNS: list[Column] = [("SCOPE", None), ("NAME", None), ("RPM", None), ("TPM", None), ("CONCURRENCY", None),
                         ("BUDGET/DAY", None), ("BUDGET/MONTH", None)]
WIDE_COLUMNS: list[Column] = [("OWNER", None), ("THIS MINUTE", None), ("IN FLIGHT", None), ("TODAY", None),
                              ("THIS MONTH", None)]


def count(value: int | None) -> str:
    """12, 4.5k, 1.2M; '-' for no limit."""
    if value is None:
        return "-"
    for size, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if value >= size:
            return f"{value / size:.3g}{suffix}"
    return str(value)


def summary(limits: Any | None) -> str:
    """One line: 'rpm 60, tpm 10k, 4 at once, 100k/day, 1M/month', or 'none'."""
    if limits is None:
        return "none"
    parts = [f"rpm {count(limits.rpm)}" if limits.rpm is not None else "",
             f"tpm {count(limits.tpm)}" if limits.tpm is not None else "",
             f"{count(limits.max_concurrency)} at once" if limits.max_concurrency is not None else "",
             f"{count(limits.budget_day)}/day" if limits.budget_day is not None else "",
             f"{count(limits.budget_month)}/month" if limits.budget_month is not None else ""]
    return ", ".join(part for part in parts if part) or "none"


def used(limits: Any) -> str:
    """What a limit uses now (this server's view: the cluster's count as of the last exchange)."""
    usage = limits.usage
    parts = []
    if limits.rpm is not None:
        parts.append(f"{usage.requests}/{count(limits.rpm)} requests this minute")
    if limits.tpm is not None:
        parts.append(f"{count(usage.tokens)}/{count(limits.tpm)} tokens this minute")
    if limits.max_concurrency is not None:
        parts.append(f"{usage.in_flight}/{count(limits.max_concurrency)} in flight")
    if limits.budget_day is not None:
        parts.append(f"{count(usage.tokens_today)}/{count(limits.budget_day)} tokens today")
    if limits.budget_month is not None:
        parts.append(f"{count(usage.tokens_this_month)}/{count(limits.budget_month)} tokens this month")
    return ", ".join(parts) or "-"


def rows(items: Iterable[Any]) -> Iterable[Row]:
    for item in items:
        usage = item.usage
        yield f"{item.scope}/{item.owner or ''}/{item.subject}", (
            item.scope, item.subject, count(item.rpm), count(item.tpm), count(item.max_concurrency),
            count(item.budget_day), count(item.budget_month), item.owner or "",
            f"{usage.requests} req, {count(usage.tokens)} tok", str(usage.in_flight), count(usage.tokens_today),
            count(usage.tokens_this_month))
