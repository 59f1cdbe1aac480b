"""Gateway usage: the table of `maas usage --by ...` (one column per grouping, then the sums) and the
TUI's Usage view (per model: requests and tokens of the last hours as sparklines)."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from typing import Callable, Iterable

from rich.text import Text

from maas_tui.render import format as fmt
from maas_tui.render.common import Column, Row
from server import schemas

GROUPS: dict[str, tuple[str, Callable[[schemas.UsageRow], object]]] = {
    "day": ("DAY", lambda r: r.day), "hour": ("HOUR", lambda r: None if r.hour is None else f"{r.hour:02d}:00"),
    "team": ("TEAM", lambda r: r.team or "-"), "model": ("MODEL", lambda r: r.model),
    "route": ("ROUTE", lambda r: r.route or "-"), "key": ("KEY", lambda r: r.api_key), "user": ("USER", lambda r: r.user),
}
SUMS: list[tuple[str, Callable[[schemas.UsageRow], object]]] = [
    ("REQUESTS", lambda r: r.requests), ("PROMPT TOKENS", lambda r: r.prompt_tokens),
    ("COMPLETION TOKENS", lambda r: r.completion_tokens)]


def table_columns(groups: list[str]) -> list[tuple[str, Callable[[schemas.UsageRow], object]]]:
    """The CLI's columns for `--by`: the groupings in the order given, then the sums."""
    return [GROUPS[g] for g in groups if g in GROUPS] + SUMS


# --- the TUI's Usage view: per model, the last HOURS hours ------------------------------------

HOURS = 24
SPARK_WIDTH = 12  # the last 12 hours on screen (80 columns); the wide mode has all 24
COLUMNS: list[Column] = [("MODEL", 18), ("REQ/24H", None), ("REQUESTS", None), ("TOKENS/24H", None),
                         ("TOKENS", None)]
WIDE_COLUMNS: list[Column] = [("REQUESTS 24H", None), ("TOKENS 24H", None), ("ROUTES", None)]


def _hour_index(row: schemas.UsageRow, start: datetime) -> int | None:
    if row.day is None or row.hour is None:
        return None
    moment = datetime(row.day.year, row.day.month, row.day.day, row.hour, tzinfo=start.tzinfo)
    index = int((moment - start) / timedelta(hours=1))
    return index if 0 <= index < HOURS else None


def hourly(rows: Iterable[schemas.UsageRow], now: datetime) -> dict[str, tuple[list[float], list[float], set[str]]]:
    """Per model: requests and tokens per hour over the last HOURS hours (oldest first), and the
    routes it served through. `rows` are GET /v2/usage?by=day,hour,model,route&since=24h."""
    start = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=HOURS - 1)
    series: dict[str, tuple[list[float], list[float], set[str]]] = defaultdict(
        lambda: ([0.0] * HOURS, [0.0] * HOURS, set()))
    for row in rows:
        index = _hour_index(row, start)
        if index is None or row.model is None:
            continue
        requests, tokens, routes = series[row.model]
        requests[index] += row.requests
        tokens[index] += row.prompt_tokens + row.completion_tokens
        if row.route:
            routes.add(row.route)
    return dict(series)


def _spark(values: list[float], width: int) -> Text:
    return Text(fmt.sparkline(values, width, high=max(values) or 1.0), style="cyan")


def _count(value: float) -> str:
    value = int(value)
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return str(value)


def rows(usage: Iterable[schemas.UsageRow], now: datetime) -> Iterable[Row]:
    """One row per model, the busiest first: sparklines of the last hours and the 24-hour sums."""
    series = hourly(usage, now)
    for model, (requests, tokens, routes) in sorted(series.items(), key=lambda item: (-sum(item[1][0]), item[0])):
        yield model, (Text(model), _spark(requests, SPARK_WIDTH), _count(sum(requests)), _spark(tokens, SPARK_WIDTH),
                      _count(sum(tokens)), _spark(requests, HOURS), _spark(tokens, HOURS),
                      ", ".join(sorted(routes)) or "-")


def detail(usage: Iterable[schemas.UsageRow], model: str) -> Text:
    """One line under the Usage view's table about one model: its 24-hour sums and the routes it served."""
    rows = [r for r in usage if r.model == model]
    if not rows:
        return Text("")
    requests = sum(r.requests for r in rows)
    prompt, completion = sum(r.prompt_tokens for r in rows), sum(r.completion_tokens for r in rows)
    routed = sum(r.requests for r in rows if r.route)
    text = Text(f"{model}: ", style="bold")
    text.append(f"{_count(requests)} req, {_count(prompt + completion)} tokens ({_count(prompt)} in + "
                f"{_count(completion)} out)")
    if routed:
        routes = ", ".join(sorted({r.route for r in rows if r.route}))
        text.append(f"; {_count(routed)} via {routes}", style="cyan")
    return text


# --- who is close to a limit (GET /v2/limits: each limit with what it uses now) --------------

NEAR = 0.8  # a share of a limit from which the Usage view names it
_USED = (("rpm", "requests", "requests this minute"), ("tpm", "tokens", "tokens this minute"),
         ("max_concurrency", "in_flight", "requests in flight"), ("budget_day", "tokens_today", "tokens today"),
         ("budget_month", "tokens_this_month", "tokens this month"))


def near_limits(limits: Iterable[object], near: float = NEAR) -> list[tuple[float, str]]:
    """(share, 'key app: 93% of budget_day (1.9M of 2.0M tokens today)') for each limit at `near` or more
    of its value, the closest first. `limits`: schemas.limits.LimitsListed."""
    found = []
    for row in limits:
        for field, used_field, what in _USED:
            limit = getattr(row, field, None)
            if not limit:
                continue
            used = getattr(row.usage, used_field, 0)  # type: ignore[attr-defined]
            share = used / limit
            if share >= near:
                found.append((share, f"{row.scope} {row.subject}: {share:.0%} of {field} "  # type: ignore[attr-defined]
                                     f"({_count(used)} of {_count(limit)} {what})"))
    return sorted(found, key=lambda item: -item[0])


def near_text(limits: Iterable[object]) -> Text:
    """The Usage view's line about limits: who is closest to one (yellow; red at 100%) and how many
    more are near, or nothing."""
    found = near_limits(limits)
    text = Text()
    if found:
        share, words = found[0]
        text.append("near a limit: ", style="bold")
        text.append(words, style="bold red" if share >= 1 else "yellow")
        if len(found) > 1:
            text.append(f" +{len(found) - 1} more (maas limits list)")
    return text
