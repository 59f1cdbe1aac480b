"""Gateway limits: requests and tokens per minute, requests in flight and token budgets per day and
month, on an API key, a team and a model (schemas.Limits; rows in `gateway_limits`).

A request passes every limit that applies to it: its key's, the team's that owns the model, and
the model's. Everything on the request path is in memory: the rules follow the bus (kind `limits`,
and deletions of models, keys, teams and users), the counts are kept here. Over a limit: 429
`rate_limit_exceeded` (or `budget_exceeded`) naming the limit, with Retry-After; answers under a limit,
errors included, carry OpenAI's `x-ratelimit-*` headers (of the tightest limit), streamed ones in their head.

Windows. A minute is a fixed window aligned to the epoch (`window` seconds, 60; tests scale it
down with the limits): at most `rpm` requests and `tpm` tokens start in each window (a client can
use a window's allowance at its end and the next one's at its start). Tokens are known once an
answer is complete, so the admission looks at the tokens counted so far: `tpm` can be passed by the
tokens of the requests in flight when it is reached. Budgets are per UTC day and calendar month.

Several servers (PostgreSQL). Each server admits on its own counts, within its part of each limit
(rpm, tpm, max_concurrency); every second the servers exchange counts and demand, and the parts move to
a demand-weighted split within about two exchanges, always adding up to at most the limit: the cluster
admits at most the limit in a window while the servers see each other (server/gateway/limit_exchange.py
states the worst case: while a server does not yet know of another, each may admit all of it). Budgets
are summed from the usage table (which every server writes every 2 s) every `budget_seconds` (5 s): they
can be passed by what the other servers served in between (servers x 7 s x token rate). SQLite and
MySQL/MariaDB serve one server (server/leader.py), whose counts are exact.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from types import SimpleNamespace
from typing import Any, Iterable

from sqlalchemy import case, func, select

from server.api.errors import ApiError
from server.gateway.limit_exchange import exchange, exchange_loop, forget
from server.schemas.limits import LIMIT_FIELDS, LimitsOut, LimitUsage

log = logging.getLogger(__name__)

# What the limiter follows on the bus: the limits, and deletions of what they are on (their rows go by ON
# DELETE CASCADE, unannounced; a deleted user's keys are deleted in bulk, unannounced too).
_FOLLOWED = ("limits", "models", "api_keys", "teams", "users")
_DELETED = {"models": ("model", "name"), "api_keys": ("key", "id"), "teams": ("team", "name")}
NEARLY_REACHED = 0.9  # a budget this far used records LimitNearlyReached, once per period
_SCOPE_WORDS = {"key": "API key", "team": "team", "model": "model"}


class Rule:
    """One limited key, team or model: its limits, and what it used."""

    __slots__ = ("scope", "subject", "rpm", "tpm", "max_concurrency", "budget_day", "budget_month",
                 "window", "requests", "tokens", "in_flight", "published",
                 "remote_window", "remote_requests", "remote_tokens", "remote_in_flight", "peers",
                 "cap_requests", "cap_tokens", "cap_in_flight", "attempts",
                 "day_base", "day_since", "month_base", "month_since", "notified")

    def __init__(self, scope: str, subject: Any):
        self.scope, self.subject = scope, subject
        self.rpm = self.tpm = self.max_concurrency = self.budget_day = self.budget_month = None
        self.window = -1
        self.requests = self.tokens = self.in_flight = 0
        self.published = False  # a counter row of ours exists for it
        # The other servers', as of the last exchange (server/gateway/limit_exchange.py).
        self.remote_window = -1
        self.remote_requests = self.remote_tokens = self.remote_in_flight = 0
        self.peers = 0
        # This server's part of each limit while it has peers, and the requests that asked for this key,
        # team or model since the last exchange, admitted or refused (its demand: the parts follow it).
        self.cap_requests = self.cap_tokens = self.cap_in_flight = 0
        self.attempts = 0
        self.day_base = self.day_since = self.month_base = self.month_since = 0
        self.notified: set[tuple[str, date]] = set()

    def set_limits(self, row: dict[str, Any]) -> None:
        for name in LIMIT_FIELDS:
            setattr(self, name, row.get(name))

    @property
    def rated(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.max_concurrency is not None

    @property
    def budgeted(self) -> bool:
        return self.budget_day is not None or self.budget_month is not None

    def roll(self, window: int) -> None:
        if window != self.window:
            self.window = window
            self.requests = self.tokens = 0  # the caps hold from window to window

    def cluster_requests(self) -> int:
        return self.requests + (self.remote_requests if self.remote_window == self.window else 0)

    def cluster_tokens(self) -> int:
        return self.tokens + (self.remote_tokens if self.remote_window == self.window else 0)

    def used_day(self) -> int:
        return self.day_base + self.day_since

    def used_month(self) -> int:
        return self.month_base + self.month_since

    def named(self, key_name: str) -> str:
        name = key_name if self.scope == "key" else self.subject
        return f"{_SCOPE_WORDS[self.scope]} {name!r}"


class Ticket:
    """What an admitted request holds: the rules it counts against, and the tokens its answer used."""

    __slots__ = ("rules", "tokens")

    def __init__(self, rules: list[Rule]):
        self.rules = rules
        self.tokens = 0


# The request being answered, for the usage meter's report of its tokens (same task, same context).
_CURRENT: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar("maas_gateway_limit_ticket", default=None)


def _duration(seconds: float) -> str:
    """As OpenAI writes its reset headers: 20ms, 1s, 6m0s."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    return f"{whole // 60}m{whole % 60}s" if whole >= 60 else f"{whole}s"


class GatewayLimits:
    def __init__(self, window: float = 60.0, sync_seconds: float = 1.0, budget_seconds: float = 5.0):
        self.window = window
        self.sync_seconds = sync_seconds
        self.budget_seconds = budget_seconds
        self.clock = time.time
        self.server_id = uuid.uuid4().hex
        self.rules: dict[tuple[str, Any], Rule] = {}
        self.db: Any = None
        self.usage: Any = None
        self.cluster = False  # several servers may share the store (PostgreSQL)
        self._day_ends = 0.0
        self._month_ends = 0.0
        self._day = self._month_start = date.min
        self._budgets_changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # --- lifecycle -------------------------------------------------------------

    async def start(self, db: Any, bus: Any, usage: Any) -> None:
        self.db, self.usage = db, usage
        self.cluster = db.engine.dialect.name == "postgresql"
        usage.tokens_listener = self.tokens_metered
        subscription = bus.subscribe(_FOLLOWED)  # before the load: nothing lost
        await self.load()
        await self.refresh_budgets()
        self._tasks = [asyncio.create_task(self._follow(bus, subscription), name="limits-follower"),
                       asyncio.create_task(self._budget_loop(), name="limits-budgets")]
        if self.cluster:
            await exchange(self)
            self._tasks.append(asyncio.create_task(exchange_loop(self), name="limits-exchange"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.cluster:
            await forget(self)

    async def load(self) -> None:
        from server.db import tables
        from server.db.database import to_wire

        async with self.db.session() as s:
            rows = [to_wire(row) for row in (await s.execute(select(tables.GatewayLimit))).scalars()]
        seen = set()
        for row in rows:
            seen.add(self.apply("created", row))
        for key in set(self.rules) - seen:
            del self.rules[key]

    def apply(self, action: str, row: dict[str, Any]) -> tuple[str, Any]:
        limits = LimitsOut.model_validate(row)
        subject = {"key": limits.api_key_id, "team": limits.team, "model": limits.model}[limits.scope]
        key = (limits.scope, subject)
        if action == "deleted" or not limits.any():
            self.rules.pop(key, None)
            return key
        rule = self.rules.get(key)
        if rule is None:
            rule = self.rules[key] = Rule(limits.scope, subject)
        had_budget = (rule.budget_day, rule.budget_month)
        rule.set_limits(row)
        if (rule.budget_day, rule.budget_month) != had_budget:
            self._budgets_changed.set()  # its usage so far is read at once
        return key

    async def _follow(self, bus: Any, subscription: Any) -> None:
        try:
            while True:
                event = await subscription.get()
                if event is None:  # fell behind: read everything again
                    subscription = bus.subscribe(_FOLLOWED)
                    await self.load()
                elif event.kind == "limits":
                    self.apply(event.action, event.object)
                elif event.action != "deleted":
                    continue
                elif event.kind == "users":  # its keys went with it, unannounced: what is left is read again
                    await self.load()
                else:  # a model, key or team deleted: its limits went with it (ON DELETE CASCADE)
                    scope, field = _DELETED[event.kind]
                    self.rules.pop((scope, event.object.get(field)), None)
        finally:
            subscription.close()

    # --- the request path --------------------------------------------------------

    def admit(self, principal: Any, model: str, team: str | None) -> "Ticket | None":
        """Count the request against every limit that applies, or raise a 429 naming the one it is over.
        The ticket (None: no limit applies) goes back to `release` when the request is over. Once per
        request: the gateway does not admit a route's fallback to another model again."""
        if not self.rules:
            return None
        rules = [rule for rule in (self.rules.get(("key", principal.api_key_id)), self.rules.get(("team", team)),
                                   self.rules.get(("model", model))) if rule is not None]
        if not rules:
            return None
        now = self.clock()
        if now >= self._day_ends:
            self._new_day(now)
        window = int(now // self.window)
        key_name = principal.api_key_name or principal.name
        for rule in rules:
            rule.roll(window)
            rule.attempts += 1
        for rule in rules:
            self._check(rule, rules, now, key_name)
        for rule in rules:
            rule.requests += 1
            rule.in_flight += 1
        ticket = Ticket(rules)
        _CURRENT.set(ticket)
        return ticket

    def _check(self, rule: Rule, rules: list[Rule], now: float, key_name: str) -> None:
        alone = not rule.peers
        if rule.budget_day is not None and rule.used_day() >= rule.budget_day:
            self._refuse(rules, now, "budget_exceeded", f"the daily token budget of the {rule.named(key_name)} is used "
                         f"up ({rule.used_day()} of {rule.budget_day} tokens today, UTC)", self._day_ends - now)
        if rule.budget_month is not None and rule.used_month() >= rule.budget_month:
            self._refuse(rules, now, "budget_exceeded", f"the monthly token budget of the {rule.named(key_name)} is "
                         f"used up ({rule.used_month()} of {rule.budget_month} tokens this month, UTC)",
                         self._month_ends - now)
        if rule.max_concurrency is not None and rule.in_flight >= (rule.max_concurrency if alone
                                                                    else rule.cap_in_flight):
            self._refuse(rules, now, "rate_limit_exceeded", f"the {rule.named(key_name)} has "
                         f"{rule.in_flight if alone else 'its share of'} requests in flight: its limit is "
                         f"{rule.max_concurrency} at once (max_concurrency)", self.sync_seconds)
        window_left = (rule.window + 1) * self.window - now
        if rule.rpm is not None:
            full = rule.cluster_requests() >= rule.rpm
            if full or (not alone and rule.requests >= rule.cap_requests):
                self._refuse(rules, now, "rate_limit_exceeded", f"the {rule.named(key_name)} reached its limit of "
                             f"{rule.rpm} requests per minute (rpm)", window_left if full else self.sync_seconds)
        if rule.tpm is not None:
            full = rule.cluster_tokens() >= rule.tpm
            if full or (not alone and rule.tokens >= rule.cap_tokens):
                self._refuse(rules, now, "rate_limit_exceeded", f"the {rule.named(key_name)} reached its limit of "
                             f"{rule.tpm} tokens per minute (tpm)", window_left if full else self.sync_seconds)

    def _refuse(self, rules: list[Rule], now: float, code: str, message: str, wait: float) -> None:
        retry = max(1, math.ceil(wait))
        headers = self.headers(rules, now)
        headers["Retry-After"] = str(retry)
        raise ApiError(429, code, f"{message}; retry in {retry} s", headers=headers)

    def tokens_metered(self, tokens: int) -> None:
        """The usage meter's report of the answer's tokens (prompt + completion)."""
        ticket = _CURRENT.get()
        if ticket is not None:
            ticket.tokens = tokens  # a request has one usage, however many times it is reported

    def release(self, ticket: Ticket) -> None:
        """The request is over: out of flight, its tokens counted."""
        _CURRENT.set(None)
        now = self.clock()
        window = int(now // self.window)
        if now >= self._day_ends:
            self._new_day(now)
        for rule in ticket.rules:
            rule.in_flight -= 1
            if ticket.tokens:
                rule.roll(window)
                rule.tokens += ticket.tokens
                rule.day_since += ticket.tokens
                rule.month_since += ticket.tokens
                if rule.budgeted and self._nearly_due(rule):
                    self._budgets_changed.set()  # LimitNearlyReached is recorded soon

    def headers_of(self, ticket: Ticket) -> dict[str, str]:
        """The x-ratelimit-* headers of an admitted request's answer (its 429 carries its own)."""
        return self.headers(ticket.rules, self.clock())

    def headers(self, rules: Iterable[Rule], now: float) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers of the tightest request and token limits among `rules`."""
        headers: dict[str, str] = {}
        requests_rule = tokens_rule = None
        requests_left = tokens_left = 0
        for rule in rules:  # on the request path: plain loops
            if rule.rpm is not None:
                left = rule.rpm - rule.cluster_requests()
                if requests_rule is None or left < requests_left:
                    requests_rule, requests_left = rule, left
            if rule.tpm is not None:
                left = rule.tpm - rule.cluster_tokens()
                if tokens_rule is None or left < tokens_left:
                    tokens_rule, tokens_left = rule, left
        if requests_rule is None and tokens_rule is None:
            return headers
        reset = _duration((int(now // self.window) + 1) * self.window - now)  # every rule has the same windows
        if requests_rule is not None:
            headers["x-ratelimit-limit-requests"] = str(requests_rule.rpm)
            headers["x-ratelimit-remaining-requests"] = str(requests_left if requests_left > 0 else 0)
            headers["x-ratelimit-reset-requests"] = reset
        if tokens_rule is not None:
            headers["x-ratelimit-limit-tokens"] = str(tokens_rule.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(tokens_left if tokens_left > 0 else 0)
            headers["x-ratelimit-reset-tokens"] = reset
        return headers

    # --- budgets -------------------------------------------------------------------

    def _new_day(self, now: float) -> None:
        moment = datetime.fromtimestamp(now, UTC)
        today = moment.date()
        midnight = datetime(today.year, today.month, today.day, tzinfo=UTC)
        self._day_ends = (midnight + timedelta(days=1)).timestamp()
        first = today.replace(day=1)
        following = (first + timedelta(days=32)).replace(day=1)
        self._month_ends = datetime(following.year, following.month, 1, tzinfo=UTC).timestamp()
        new_month = first != self._month_start
        self._day, self._month_start = today, first
        for rule in self.rules.values():
            rule.day_base = rule.day_since = 0
            if new_month:
                rule.month_base = rule.month_since = 0

    def _nearly_due(self, rule: Rule) -> bool:
        """Past 90% of a budget without its event yet (on the request path: no tuples unless it is)."""
        day, month = rule.budget_day, rule.budget_month
        return bool((day is not None and rule.day_base + rule.day_since >= NEARLY_REACHED * day
                     and ("day", self._day) not in rule.notified)
                    or (month is not None and rule.month_base + rule.month_since >= NEARLY_REACHED * month
                        and ("month", self._month_start) not in rule.notified))

    def _periods(self, rule: Rule) -> tuple[tuple[str, date, int | None, int], ...]:
        return (("day", self._day, rule.budget_day, rule.used_day()),
                ("month", self._month_start, rule.budget_month, rule.used_month()))

    async def refresh_budgets(self) -> None:
        """The budgets' usage from the usage table (every server's, durable), plus what this server counted
        since. Then LimitNearlyReached for a key, team or model past 90% of a budget, once per period."""
        from server.db import tables

        rules = [rule for rule in self.rules.values() if rule.budgeted]
        if not rules:
            return
        now = self.clock()
        if now >= self._day_ends:
            self._new_day(now)
        today = self._day
        for rule in rules:  # what is counted from here on is added to what the table says
            rule.day_base += rule.day_since
            rule.month_base += rule.month_since
            rule.day_since = rule.month_since = 0
        await self.usage.flush()  # this server's own usage so far is in the table
        usage = tables.Usage
        tokens = usage.prompt_tokens + usage.completion_tokens
        # A row's team is the model's team then; rows written before usage had a team: the model's now.
        team = case((usage.team != "", usage.team), else_=tables.Model.team)
        columns = {"key": usage.api_key_id, "team": team, "model": usage.model_name}
        found: dict[tuple[str, Any], tuple[int, int]] = {}
        async with self.db.session() as s:
            for scope, column in columns.items():
                subjects = [rule.subject for rule in rules if rule.scope == scope]
                if not subjects:
                    continue
                query = (select(column, func.sum(tokens), func.sum(case((usage.day == today, tokens), else_=0)))
                         .select_from(usage).where(usage.day >= today.replace(day=1), column.in_(subjects))
                         .group_by(column))
                if scope == "team":
                    query = query.outerjoin(tables.Model, tables.Model.name == usage.model_name)
                for subject, month, day in (await s.execute(query)).all():
                    found[(scope, subject)] = (int(day or 0), int(month or 0))
        for rule in rules:
            if self._day != today:
                break  # the day ended meanwhile: the counts start again from zero
            rule.day_base, rule.month_base = found.get((rule.scope, rule.subject), (0, 0))
        await self._nearly_reached(rules)

    async def _nearly_reached(self, rules: list[Rule]) -> None:
        from server.db import tables
        from server.events import record_event

        due = [(rule, period, start, budget, used) for rule in rules
               for period, start, budget, used in self._periods(rule)
               if budget and used >= NEARLY_REACHED * budget and (period, start) not in rule.notified]
        if not due:
            return
        async with self.db.session() as s:
            for rule, period, start, budget, used in due:
                rule.notified.add((period, start))
                kind, obj, actor = await self._event_object(s, rule)
                since = datetime(start.year, start.month, start.day, tzinfo=UTC)
                when = "today" if period == "day" else "this month"
                message = f"{_SCOPE_WORDS[rule.scope]} {obj.name} used {used} of its {budget} tokens {when} (UTC)"
                already = await s.scalar(select(tables.Event.id).where(  # another server may have recorded it
                    tables.Event.reason == "LimitNearlyReached", tables.Event.kind == kind,
                    tables.Event.object_name == obj.name, tables.Event.created_at >= since,
                    tables.Event.message.like(f"% tokens {when} (UTC)")).limit(1))
                if already is None:
                    record_event(s, kind, obj, "LimitNearlyReached", message, actor)
            await s.commit()

    async def _event_object(self, s: Any, rule: Rule) -> tuple[str, Any, str]:
        """(event kind, object, actor) of a LimitNearlyReached event: a key's names its owner as the actor, so
        the owner reads it (server/services/access.py sees_event); a team's and a model's carry their team."""
        from server.db import tables

        if rule.scope == "key":
            found = (await s.execute(select(tables.ApiKey.name, tables.User.username).join(tables.User).where(
                tables.ApiKey.id == rule.subject))).first()
            name, owner = found if found else (str(rule.subject), "gateway")
            return "api_keys", SimpleNamespace(id=rule.subject, name=name, team=None), owner
        if rule.scope == "team":
            return "teams", SimpleNamespace(id=None, name=rule.subject, team=rule.subject), "gateway"
        team = await s.scalar(select(tables.Model.team).where(tables.Model.name == rule.subject))
        return "models", SimpleNamespace(id=None, name=rule.subject, team=team), "gateway"

    async def _budget_loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.budget_seconds):
                    await self._budgets_changed.wait()
                await asyncio.sleep(0.2)  # a burst of changes makes one refresh
            except TimeoutError:
                pass
            self._budgets_changed.clear()
            try:
                await self.refresh_budgets()
            except Exception as exc:  # the store is away: the counts here go on, exact for this server
                log.warning("could not read the budgets' usage: %s", exc)

    # --- what the API shows -----------------------------------------------------------

    def usage_of(self, scope: str, subject: Any) -> LimitUsage:
        rule = self.rules.get((scope, subject))
        if rule is None:
            return LimitUsage()
        rule.roll(int(self.clock() // self.window))
        return LimitUsage(requests=rule.cluster_requests(), tokens=rule.cluster_tokens(),
                          in_flight=rule.in_flight + rule.remote_in_flight, tokens_today=rule.used_day(),
                          tokens_this_month=rule.used_month())

