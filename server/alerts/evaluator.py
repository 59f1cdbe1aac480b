"""The leader's alert evaluator: event rules from the bus's events, state rules from checks every
`settings.interval` seconds. Alert rows are the state: a new leader carries on from the firing ones.

Each change of state (firing, resolved) is recorded as an event (kind `alerts`, AlertFiring or
AlertResolved) and, unless a silence covers it, sent to the webhooks. The GPU temperature check reads the
live telemetry this server holds: with several servers, the readings of the workers whose heartbeats reach
the leader (all of them with one server).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from sqlalchemy import delete, select

from server import schemas
from server.alerts.rules import EVENT_RULES, RULES, AlertSettings, Rule
from server.alerts.webhooks import WebhookSender
from server.db import tables
from server.db.errors import database_unavailable, first_line
from server.events import record_event
from server.reconcile import ReconcileLoop
from server.schemas.alerts import AlertNotification, AlertOut
from server.schemas.rollout import rollout_status
from server.services.alerts import active_silences, silence_covers

log = logging.getLogger(__name__)

S = schemas.InstanceState
RETAIN = timedelta(days=30)  # resolved alerts and ended silences are kept this long
CLEANUP_SECONDS = 3600.0


@dataclass(frozen=True)
class Finding:
    team: str | None
    message: str


Key = tuple[str, str]  # (object kind, object name)


class AlertEvaluator(ReconcileLoop):
    name = "alert-evaluator"

    def __init__(self, server: Any, settings: AlertSettings | None = None):
        settings = settings or AlertSettings.from_env()
        super().__init__(server, settings.interval)  # start/stop; _run below waits on events and the checks' clock
        self.settings = settings
        self.sender = WebhookSender(server, self.settings)
        self._progress: dict[int, tuple[tuple[int, int, int, int], float]] = {}  # model id -> (rollout, since)
        self.passes = 0
        self._last_cleanup = float("-inf")

    async def stop(self) -> None:
        await super().stop()
        await self.sender.stop()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        subscription = self.server.bus.subscribe(("events",))
        next_check = loop.time()
        try:
            while True:
                events: list[dict[str, Any]] = []
                try:
                    async with asyncio.timeout(max(0.0, next_check - loop.time())):  # not wait_for: see reconcile.py
                        event = await subscription.get()
                    events.append(event)
                    while not subscription.queue.empty():
                        events.append(subscription.queue.get_nowait())
                except TimeoutError:
                    pass
                if any(e is None for e in events):  # overflowed: what it dropped is judged by the next checks
                    subscription = self.server.bus.subscribe(("events",))
                matching = [e.object for e in events if e is not None and e.object.get("reason") in EVENT_RULES]
                checks_due = loop.time() >= next_check
                if not matching and not checks_due:
                    continue
                try:
                    await self.evaluate(matching, checks=checks_due)
                except Exception as exc:
                    if database_unavailable(exc):  # said once per check, without a traceback
                        log.warning("alerts not evaluated: the database is unavailable (%s)", first_line(exc))
                    else:
                        log.exception("evaluating alerts failed; retrying at the next check")
                if checks_due:
                    next_check = loop.time() + self.settings.interval
                if loop.time() - self._last_cleanup > CLEANUP_SECONDS:
                    self._last_cleanup = loop.time()
                    try:
                        await self.clean_up()
                    except Exception:
                        log.exception("deleting old alerts failed; trying again later")
        finally:
            subscription.close()

    async def clean_up(self) -> None:
        """Resolved alerts and ended silences older than RETAIN go (the alerts table must not grow for ever)."""
        before = datetime.now(UTC) - RETAIN
        async with self.server.db.session() as s:
            await s.execute(delete(tables.Alert).where(tables.Alert.state == "resolved",
                                                       tables.Alert.resolved_at < before))
            await s.execute(delete(tables.AlertSilence).where(tables.AlertSilence.ends_at < before))
            await s.commit()

    async def evaluate(self, events: list[dict[str, Any]], checks: bool = True) -> None:
        """One pass: fire event rules for `events`; with `checks`, run the state checks and resolve what ended."""
        now = datetime.now(UTC)
        changed: list[tables.Alert] = []
        async with self.server.db.session() as s:
            firing = {(a.rule, a.object_kind, a.object_name): a for a in (await s.execute(
                select(tables.Alert).where(tables.Alert.state == "firing"))).scalars()}
            silences = await active_silences(s)
            for event in events:
                rule = EVENT_RULES[event["reason"]]
                key = (event.get("kind") or "events", event.get("object_name") or "")
                finding = Finding(event.get("team"), event.get("message") or rule.summary)
                await self._fire(s, rule, key, finding, firing, silences, now, changed, refresh=True)
            if checks:
                for rule in RULES.values():
                    if rule.check is None:
                        continue
                    found = await getattr(self, rule.check)(s, now)
                    for key, finding in found.items():
                        await self._fire(s, rule, key, finding, firing, silences, now, changed)
                    for (name, kind, obj), alert in list(firing.items()):
                        if name == rule.name and (kind, obj) not in found:
                            self._resolve(s, alert, "the condition ended", silences, now, changed)
                            del firing[(name, kind, obj)]
                quiet = now - timedelta(seconds=self.settings.event_quiet_seconds)
                for (name, kind, obj), alert in list(firing.items()):
                    if RULES.get(name) is None or (RULES[name].events and _aware(alert.updated_at) < quiet):
                        self._resolve(s, alert, f"no {name} event for {self.settings.event_quiet_seconds:g} s",
                                      silences, now, changed)
                        del firing[(name, kind, obj)]
            await s.commit()
            notifications = [(AlertNotification(status=a.state, alert=AlertOut.model_validate(a)).model_dump(mode="json"),
                              a.silenced) for a in changed]
        self.passes += 1
        for notification, silenced in notifications:
            if not silenced:
                await self.sender.send(notification)

    async def _fire(self, s, rule: Rule, key: Key, finding: Finding, firing: dict, silences: list, now: datetime,
                    changed: list, refresh: bool = False) -> None:
        alert = firing.get((rule.name, *key))
        if alert is not None:
            if alert.message != finding.message or refresh:
                alert.message = finding.message
                alert.updated_at = now  # an event rule's quiet time starts again
            return
        alert = tables.Alert(rule=rule.name, severity=rule.severity, state="firing", object_kind=key[0],
                             object_name=key[1], team=finding.team, message=finding.message, started_at=now,
                             updated_at=now, silenced=any(silence_covers(x, rule.name, key[1], now) for x in silences))
        s.add(alert)
        await s.flush()
        firing[(rule.name, *key)] = alert
        changed.append(alert)
        record_event(s, "alerts", _subject(alert), "AlertFiring", f"{rule.severity}: {finding.message}", self.name)

    def _resolve(self, s, alert: tables.Alert, why: str, silences: list, now: datetime, changed: list) -> None:
        alert.state, alert.resolved_at = "resolved", now
        alert.silenced = any(silence_covers(x, alert.rule, alert.object_name, now) for x in silences)
        changed.append(alert)
        record_event(s, "alerts", _subject(alert), "AlertResolved", why, self.name)

    # --- the state checks: (object kind, object name) -> Finding, for what is wrong now ----------------

    async def failing_instances(self, s, now: datetime) -> dict[Key, Finding]:
        rows = (await s.execute(select(tables.ModelInstance).where(
            tables.ModelInstance.state != S.running, tables.ModelInstance.state != S.terminating))).scalars()
        failing: dict[str, list[tables.ModelInstance]] = {}
        for instance in rows:
            if instance.state == S.error or instance.restart_count > 0:
                failing.setdefault(instance.model_name, []).append(instance)
        found = {}
        for model, instances in failing.items():
            first = instances[0]
            why = first.state_message.splitlines()[0] if first.state_message else first.state
            found[("models", model)] = Finding(first.team, f"{len(instances)} instance(s) failing; {first.name} "
                                               f"({first.state}, {first.restart_count} restarts): {why}"[:1000])
        return found

    async def stalled_rollouts(self, s, now: datetime) -> dict[Key, Finding]:
        # Only models in a rollout (an instance of an older generation left): a few, however large the cluster.
        rolling = select(tables.ModelInstance.model_id).join(
            tables.Model, tables.Model.id == tables.ModelInstance.model_id).where(
            tables.ModelInstance.generation < tables.Model.generation,
            tables.Model.state == schemas.ModelState.active).distinct()
        model_ids = list((await s.execute(rolling)).scalars())
        models = (await s.execute(select(tables.Model).where(tables.Model.id.in_(model_ids)))).scalars().all()
        instances = (await s.execute(select(tables.ModelInstance.model_id, tables.ModelInstance.generation,
                                            tables.ModelInstance.state).where(
            tables.ModelInstance.model_id.in_(model_ids)))).all() if model_ids else []
        by_model: dict[int, list[Any]] = {}
        for row in instances:
            by_model.setdefault(row.model_id, []).append(row)
        clock = asyncio.get_running_loop().time()
        found, seen = {}, set()
        for model in models:
            status = rollout_status(model, by_model.get(model.id, []))
            if status.outdated == 0:
                continue
            seen.add(model.id)
            if model.rollout_message:
                found[("models", model.name)] = Finding(model.team, model.rollout_message[:1000])
                continue
            if model.paused:  # paused by hand: the operator knows
                continue
            mark = (status.generation, status.updated, status.ready, status.outdated)
            before = self._progress.get(model.id)
            if before is None or before[0] != mark:
                self._progress[model.id] = (mark, clock)
            elif clock - before[1] >= self.settings.rollout_stall_seconds:
                found[("models", model.name)] = Finding(model.team, (
                    f"rollout to generation {model.generation} made no progress for {clock - before[1]:.0f} s "
                    f"({status.ready}/{status.replicas} ready, {status.outdated} outdated)"))
        for model_id in set(self._progress) - seen:
            del self._progress[model_id]
        return found

    async def workers_not_ready(self, s, now: datetime) -> dict[Key, Finding]:
        rows = (await s.execute(select(tables.Worker).where(
            tables.Worker.state == schemas.WorkerState.not_ready))).scalars()
        return {("workers", w.name): Finding(None, f"worker {w.name} is not ready: {w.state_message or 'no heartbeat'}")
                for w in rows}

    async def hot_gpus(self, s, now: datetime) -> dict[Key, Finding]:
        readings = self.server.telemetry.readings
        if not readings:
            return {}
        names = dict((await s.execute(select(tables.Worker.id, tables.Worker.name).where(
            tables.Worker.id.in_(list(readings))))).all())
        limit = self.settings.gpu_temperature
        found = {}
        for worker_id, reading in readings.items():
            for gpu in reading.get("gpus") or ():
                temperature = gpu.get("temperature")
                if temperature is not None and temperature >= limit and worker_id in names:
                    name = f"{names[worker_id]}/gpu{gpu.get('index')}"
                    found[("gpus", name)] = Finding(None, f"GPU {name} at {temperature:g} °C (threshold {limit:g} °C)")
        return found


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _subject(alert: tables.Alert) -> Any:
    """What an alert's events are about: named rule/object, with the object's team (who may read them)."""
    return SimpleNamespace(id=alert.id, name=f"{alert.rule}/{alert.object_name}"[:140], team=alert.team)
