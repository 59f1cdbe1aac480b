"""Several servers on one PostgreSQL hold each limit together (server/gateway/limits.py admits): each
server admits within its *part* of each rpm, tpm and max_concurrency, and the parts follow demand.

Every `sync_seconds` (1 s) each server takes a PostgreSQL advisory lock that the servers take in turn,
reads the live peers' rows of `gateway_limit_counters` (their counts, parts and demand: the requests
that asked them since their last exchange, admitted or refused), sets its own parts (`new_part`) and
writes its rows. A part's target is the limit weighted by the servers' demand (an even split while no
server is asked, so that a burst that starts on all of them finds each with its share). A part above
its target shrinks at once, but never below what this server already used in the window (else another
could take it and the cluster pass the limit); a part below its target grows only into what no server
holds. So the parts add up to at most the limit however stale a server's view of the others' counts,
and they reach the demand-weighted split within about two exchanges (one to shrink, one to grow).

Worst case: the cluster admits at most the limit in a window, and holds at most `max_concurrency` in
flight, while every server sees the others; `tpm` can be passed by the tokens of the requests in
flight when it is reached, on each server. While a server does not know of another (in the first
`sync_seconds` after a rule or a server appears, or once a server's rows are older than 10 s because it
cannot reach the store) each holds the whole limit alone: up to servers x sync interval x the rate each
admits over. SQLite and MySQL/MariaDB serve one server (server/leader.py): no exchange, exact counts.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select, text

if TYPE_CHECKING:
    from server.gateway.limits import GatewayLimits

log = logging.getLogger(__name__)

EXCHANGE_LOCK = 0x6D616173_6C696D  # pg_advisory_xact_lock key of the exchange ("maaslim")
LIVE_SECONDS = 10  # a server whose rows are older is gone: its parts are free again
Peer = tuple[str, int, int]  # a live peer's (server id, part, demand) of one limit


def fair_part(limit: int, me: str, demand: int, theirs: list[Peer]) -> int:
    """This server's share of `limit` weighted by demand (every server's the same while none is asked). The
    units that the division leaves go one each to the largest remainders, ties by server id: every server
    that sees the same demand computes the same split, and a small limit (max_concurrency 1) is not lost."""
    weights = {me: demand, **{server: their_demand for server, _, their_demand in theirs}}
    if not any(weights.values()):
        weights = dict.fromkeys(weights, 1)
    total = sum(weights.values())
    left = limit - sum(limit * weight // total for weight in weights.values())
    extra = sorted(weights, key=lambda server: (-(limit * weights[server] % total), server))[:left]
    return limit * weights[me] // total + (1 if me in extra else 0)


def new_part(limit: int | None, used: int, part: int, demand: int, me: str, theirs: list[Peer]) -> int:
    """This server's new part of a limit (module docstring). `used`: what it used of its part (requests or
    tokens this window, requests in flight now); `demand`: requests that asked it since its last exchange;
    `theirs`: every live peer's (id, part, demand), (id, 0, 0) for one that has no row for the subject.
    Alone: all of it. Once the parts add up to at most the limit, they stay so."""
    if limit is None:
        return 0
    if not theirs:
        return limit
    target = fair_part(limit, me, demand, theirs)
    if part > target:
        return max(target, min(part, used))
    unclaimed = limit - part - sum(their_part for _, their_part, _ in theirs)
    return part + max(0, min(target - part, unclaimed))


async def exchange_loop(limits: GatewayLimits) -> None:
    cleaned = 0.0
    while True:
        await asyncio.sleep(limits.sync_seconds)
        try:
            await exchange(limits)
            if limits.clock() - cleaned > 600:
                cleaned = limits.clock()
                async with limits.db.session() as s:  # rows of servers long gone
                    await s.execute(delete(_counters()).where(
                        _counters().updated_at < datetime.now(UTC) - timedelta(hours=1)))
                    await s.commit()
        except Exception as exc:  # the store is away: each server goes on with its last view
            log.warning("could not exchange limit counters with the other servers: %s", exc)


async def exchange(limits: GatewayLimits) -> None:
    """Under a lock all servers take in turn: read the live peers' rows, set this server's parts of each
    limit (new_part), write its rows with its counts and the demand since the last exchange."""
    from sqlalchemy.dialects.postgresql import insert

    counters = _counters()
    window = int(limits.clock() // limits.window)
    rated = [rule for rule in limits.rules.values() if rule.rated]
    if not rated:  # nothing to hold together (a server without rows is not counted as a peer)
        return
    me = limits.server_id
    async with limits.db.session() as s:
        await s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": EXCHANGE_LOCK})
        stamp = datetime.now(UTC)
        others = (await s.execute(select(counters).where(
            counters.server_id != me, counters.updated_at >= stamp - timedelta(seconds=LIVE_SECONDS)))).scalars().all()
        live = sorted({row.server_id for row in others if row.scope == "server"})
        by_subject: dict[tuple[str, str], dict[str, Any]] = {}
        for row in others:
            if row.scope != "server":
                by_subject.setdefault((row.scope, row.subject), {})[row.server_id] = row
        rows = [{"server_id": me, "scope": "server", "subject": "", "window_index": window, "requests": 0,
                 "tokens": 0, "in_flight": 0, "cap_requests": 0, "cap_tokens": 0, "cap_in_flight": 0, "demand": 0,
                 "updated_at": stamp}]
        for rule in rated:
            rule.roll(window)
            found = by_subject.get((rule.scope, str(rule.subject)), {})
            theirs = [found[server] for server in live if server in found]
            current = [row for row in theirs if row.window_index == window]
            rule.peers = len(live)
            rule.remote_window = window
            rule.remote_requests = sum(row.requests for row in current)
            rule.remote_tokens = sum(row.tokens for row in current)
            rule.remote_in_flight = sum(row.in_flight for row in theirs)
            demand, rule.attempts = rule.attempts, 0
            rule.cap_requests = new_part(rule.rpm, rule.requests, rule.cap_requests, demand, me,
                                         _peers(live, found, "cap_requests"))
            rule.cap_tokens = new_part(rule.tpm, rule.tokens, rule.cap_tokens, demand, me,
                                       _peers(live, found, "cap_tokens"))
            rule.cap_in_flight = new_part(rule.max_concurrency, rule.in_flight, rule.cap_in_flight, demand, me,
                                          _peers(live, found, "cap_in_flight"))
            rows.append({"server_id": me, "scope": rule.scope, "subject": str(rule.subject), "window_index": window,
                         "requests": rule.requests, "tokens": rule.tokens, "in_flight": rule.in_flight,
                         "cap_requests": rule.cap_requests, "cap_tokens": rule.cap_tokens,
                         "cap_in_flight": rule.cap_in_flight, "demand": demand, "updated_at": stamp})
        statement = insert(counters).values(rows)
        await s.execute(statement.on_conflict_do_update(
            index_elements=["server_id", "scope", "subject"],
            set_={name: statement.excluded[name] for name in rows[0] if name not in ("server_id", "scope", "subject")}))
        await s.commit()


def _peers(live: list[str], rows: dict[str, Any], part: str) -> list[Peer]:
    """Every live peer's (id, part, demand) of one limit; (id, 0, 0) for one without a row for the subject."""
    return [(server, getattr(rows[server], part), rows[server].demand) if server in rows else (server, 0, 0)
            for server in live]


async def forget(limits: GatewayLimits) -> None:
    """This server stops: its rows go, its parts are free at once (else they age out in LIVE_SECONDS)."""
    try:
        async with limits.db.session() as s:
            await s.execute(delete(_counters()).where(_counters().server_id == limits.server_id))
            await s.commit()
    except Exception as exc:  # the rows age out anyway
        log.debug("could not remove this server's limit counters: %s", exc)


def _counters() -> Any:
    from server.db import tables

    return tables.GatewayLimitCounter
