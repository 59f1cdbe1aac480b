"""The scheduler loop: a snapshot kept current from the bus -> estimates -> placement -> bulk writes.

The snapshot (workers and the claims of instances) is loaded from the database once and
then follows the event bus; a full reload happens when the subscription overflows, after
an error, and every `full_resync_every` seconds. The subscription is taken before the
load, so nothing committed in between is lost; events the load already reflects are
applied again, which changes nothing (every event carries the whole row, in order).

A pass places every pending instance against the snapshot (claims taken in memory as it
goes; a spec that failed is not tried again in the same pass, since capacity only
shrinks) and writes the outcomes in bulk: one transaction per `write_batch` instances,
rows re-read FOR UPDATE so an instance changed meanwhile (deleted, scaled away, a new
generation) is left alone and its claim given back. Team quotas are part of the snapshot:
an instance whose placement would take its team over a quota stays pending with the
reason quota_exceeded (server/scheduler/quotas.py). The ORM's unit of work costs about
300 us per placement at this volume, so instance updates, their events and the matching
change-log entries go in as multi-row statements instead (see `_write_chunk`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from sqlalchemy import bindparam, insert, select, update

from server import schemas
from server.reconcile import ReconcileLoop
from server.db import tables
from server.db.database import log_changes, to_wire
from server.db.settings import put_setting
from server.db.tables import utcnow
from server.scheduler import hub
from server.scheduler.estimate import EstimateError, MemoryEstimate, estimate, needs_fetch
from server.scheduler.placement import QUOTA_FIELDS, Placement, Request, failure_message, plan, summarize
from server.scheduler.preemption import PREEMPTING, PreemptionPass, keep_preempted_by
from server.scheduler.priorities import apply_policy, below_min, load_policies, write_preemptions
from server.scheduler.snapshot import ClusterState, InstanceRecord, Reserves

log = logging.getLogger(__name__)
S = schemas.InstanceState

_INSTANCE_COLUMNS = (tables.ModelInstance.id, tables.ModelInstance.name, tables.ModelInstance.model_id,
                     tables.ModelInstance.generation, tables.ModelInstance.state, tables.ModelInstance.worker_id,
                     tables.ModelInstance.claim, tables.ModelInstance.spec, tables.ModelInstance.schedule_reasons,
                     tables.ModelInstance.team)


def team_quota(team: tables.Team) -> schemas.TeamQuota:
    """A team row's quota (the columns quota_gpus, quota_vram_bytes...)."""
    return schemas.TeamQuota(**{name: getattr(team, f"quota_{name}") for name in QUOTA_FIELDS})


def team_wire(team: tables.Team) -> dict[str, Any]:
    """What the scheduler follows of a team: published as kind `teams` when its quota changes."""
    return {"name": team.name, "quota": team_quota(team).model_dump(mode="json")}


async def load_state(session: Any, reserves: Reserves) -> ClusterState:
    """A fresh snapshot from the database (the scheduler's resync, and dry runs)."""
    state = ClusterState(reserves)
    workers = [to_wire(w) for w in (await session.execute(select(tables.Worker))).scalars()]
    rows = (await session.execute(select(*_INSTANCE_COLUMNS))).all()
    instances = [{"id": r[0], "name": r[1], "model_id": r[2], "generation": r[3], "state": r[4], "worker_id": r[5],
                  "claim": r[6], "spec": r[7], "schedule_reasons": r[8], "team": r[9]} for r in rows]
    teams = [team_wire(t) for t in (await session.execute(select(tables.Team))).scalars()]
    files = [to_wire(f) for f in (await session.execute(select(tables.ModelFile))).scalars()]
    state.load(workers, instances, teams, files)
    return state


def _reason_signature(reasons: list[Any]) -> list[tuple[Any, Any]]:
    return [(r.get("worker"), r.get("reason")) for r in reasons if isinstance(r, dict)]


class Scheduler(ReconcileLoop):
    name = "scheduler"
    kinds = ("instances", "workers", "teams", "files", "models")  # models: priorities (scheduler/preemption.py)
    write_batch = 50  # a transaction this small reaches the watchers (the TUI) in tens of ms: bench/cluster.py
    full_resync_every = 300.0
    estimate_ttl = 15.0

    def __init__(self, server: Any, interval: float):
        super().__init__(server, interval)
        self.state = ClusterState(Reserves.from_env())
        self._synced_at = 0.0
        self._needs_resync = True
        self._dirty = True
        self._specs: dict[str, schemas.ModelSpec | ValueError] = {}
        self._estimates: dict[str, tuple[float, MemoryEstimate | EstimateError]] = {}
        self._hub_fetches: dict[str, asyncio.Task[None]] = {}  # hub metadata fetched in the background
        self._hub_loaded = False
        self.policies: dict[int, Any] = {}  # model id -> ModelPolicy (priority rank, min_replicas)
        self.stats: dict[str, float] = {"passes": 0, "placed": 0, "unschedulable": 0, "resyncs": 0,
                                        "estimate_s": 0.0, "plan_s": 0.0, "write_s": 0.0}

    # --- the loop ---------------------------------------------------------------------

    async def _run(self) -> None:
        subscription = self.server.bus.subscribe(self.kinds, maxsize=1_000_000)
        try:
            while True:
                try:
                    if self._needs_resync or time.monotonic() - self._synced_at > self.full_resync_every:
                        await self.resync()
                    if self._dirty:
                        self._dirty = False
                        await self.reconcile()
                except Exception:
                    log.exception("%s failed; reloading its snapshot", self.name)
                    self._needs_resync = True
                    await asyncio.sleep(1)
                try:
                    async with asyncio.timeout(self.interval):  # not wait_for: see server/reconcile.py
                        event = await subscription.get()
                except TimeoutError:
                    self._dirty = self._dirty or bool(self.state.pending)
                    continue
                events = [event]
                while not subscription.queue.empty():
                    events.append(subscription.queue.get_nowait())
                if any(e is None for e in events):  # overflowed: everything is reloaded
                    subscription = self.server.bus.subscribe(self.kinds, maxsize=1_000_000)
                    self._needs_resync = True
                    self._dirty = True
                    continue
                self.apply_events(events)
        finally:
            subscription.close()
            for task in list(self._hub_fetches.values()):
                task.cancel()  # its thread ends at its own timeout; nobody waits for it

    def apply_events(self, events: list[Any]) -> None:
        for event in events:
            try:
                if event.kind == "models":
                    self._dirty = apply_policy(self.policies, event.action, event.object, self.server.config) or self._dirty
                    continue
                if self.state.apply(event.kind, event.action, event.object):
                    self._dirty = True
            except Exception:
                log.exception("cannot apply %s %s; reloading", event.kind, event.action)
                self._needs_resync = True
                self._dirty = True

    async def resync(self) -> None:
        async with self.server.db.session() as s:
            if not self._hub_loaded:  # hub metadata fetched before a restart: not fetched again
                rows = await s.execute(select(tables.Setting.value).where(
                    tables.Setting.key.startswith(hub.SETTING_PREFIX, autoescape=True)))
                hub.CACHE.load(list(rows.scalars()))
                self._hub_loaded = True
            state = await load_state(s, self.state.reserves)
            self.policies = await load_policies(s, self.server.config)
        self.state = state
        self._synced_at = time.monotonic()
        self._needs_resync = False
        self._dirty = True
        self.stats["resyncs"] += 1

    # --- estimates ----------------------------------------------------------------------

    def _spec(self, record: InstanceRecord) -> schemas.ModelSpec | ValueError:
        key = record.key
        spec = self._specs.get(key)
        if spec is None:
            try:
                spec = schemas.ModelSpec.model_validate(record.spec)
            except ValueError as exc:
                spec = exc
            if len(self._specs) > 4096:
                self._specs.clear()
            self._specs[key] = spec
        return spec

    async def _fetch_hub(self, ref: hub.HubRef) -> None:
        try:
            await asyncio.to_thread(hub.CACHE.get, ref)
        except hub.HubError:
            pass  # remembered by the cache: the next pass's estimate gives it as the instance's reason
        except Exception:
            log.exception("fetching the metadata of %s failed", ref.key)
        finally:
            self._hub_fetches.pop(ref.key, None)
            self._dirty = True  # the loop's next tick places what waited for this
        await self._save_hub_metadata()

    async def _save_hub_metadata(self) -> None:
        rows = hub.CACHE.take_unsaved()
        if not rows:
            return
        try:
            async with self.server.db.session() as s:
                for key, value in rows:
                    await put_setting(s, key, value)
                await s.commit()
        except Exception:
            log.exception("cannot store hub metadata; kept in memory, written with the next")
            hub.CACHE.mark_unsaved([key for key, _ in rows])

    async def _estimate_all(self, specs: dict[str, schemas.ModelSpec]) -> dict[str, MemoryEstimate | EstimateError]:
        """Estimates of `specs`, except those whose hub metadata is being fetched: they wait for a later pass."""
        now = time.monotonic()
        missing = {k: s for k, s in specs.items()
                   if k not in self._estimates or now - self._estimates[k][0] > self.estimate_ttl}
        if missing:
            def work() -> tuple[dict[str, MemoryEstimate | EstimateError], dict[str, hub.HubRef]]:
                out: dict[str, MemoryEstimate | EstimateError] = {}
                fetches: dict[str, hub.HubRef] = {}
                for key, spec in missing.items():
                    try:
                        # In this thread too: whether a fetch is needed may look in the Hugging Face cache on disk.
                        ref = needs_fetch(spec)
                        if ref is not None:
                            fetches[key] = ref
                            continue
                        out[key] = estimate(spec)
                    except EstimateError as exc:
                        out[key] = exc
                    except Exception as exc:  # an unexpected file: say so on the instance, keep scheduling
                        log.exception("estimating %s failed", spec.source)
                        out[key] = EstimateError(f"cannot estimate {spec.source}: {exc}")
                return out, fetches

            results, fetches = await asyncio.to_thread(work)
            for key, result in results.items():
                self._estimates[key] = (now, result)
            # A hub fetch takes seconds (or a timeout): it runs beside the loop so other models are placed meanwhile.
            for key, ref in fetches.items():
                self._estimates.pop(key, None)
                if ref.key not in self._hub_fetches:
                    self._hub_fetches[ref.key] = asyncio.create_task(self._fetch_hub(ref), name=f"hub {ref.key}")
        await self._save_hub_metadata()  # fetched by a dry run or describe meanwhile
        return {k: self._estimates[k][1] for k in specs if k in self._estimates}

    # --- one pass -----------------------------------------------------------------------

    async def reconcile(self) -> None:
        state = self.state
        if not state.pending:
            return
        started = time.perf_counter()
        preemption = PreemptionPass(state, self.policies, below_min(self.server.config))
        records = sorted(state.pending.values(), key=lambda r: (-preemption.rank(r.model_id), r.id))  # priority first
        specs: dict[str, schemas.ModelSpec] = {}
        invalid: dict[str, str] = {}
        for record in records:
            spec = self._spec(record)
            if isinstance(spec, ValueError):
                invalid[record.key] = str(spec).splitlines()[0]
            else:
                specs[record.key] = spec
        estimates = await self._estimate_all(specs)
        if self.state is not state:  # reloaded while estimating
            return
        planned = time.perf_counter()
        self.stats["estimate_s"] += planned - started

        requests: dict[str, Request] = {}
        failed: dict[tuple[str, str | None], list[schemas.UnschedulableReason]] = {}
        placed: list[tuple[InstanceRecord, Placement]] = []
        unschedulable: list[tuple[InstanceRecord, list[dict[str, Any]], str]] = []
        cluster = state.cluster
        for n, record in enumerate(records):
            key = record.key
            reasons: list[schemas.UnschedulableReason] | None = failed.get((key, record.team))
            if reasons is None:
                if key in invalid:
                    reasons = [schemas.UnschedulableReason(reason="invalid_spec", message=invalid[key])]
                elif key not in estimates:
                    continue  # its hub metadata is being fetched: a later pass places it
                elif isinstance(estimates[key], EstimateError):
                    error = estimates[key]
                    reasons = [schemas.UnschedulableReason(reason=error.reason, message=str(error))]  # type: ignore[union-attr]
                else:
                    request = requests.get(key)
                    if request is None:
                        request = requests[key] = Request(specs[key], estimates[key])  # type: ignore[arg-type]
                        request.holders = state.files.holders(specs[key].source)
                    request.model_key = record.model_id
                    request.team = record.team
                    result = plan(request, cluster)
                    if isinstance(result, Placement):
                        cluster.commit(result, record.model_id, record.team)
                        placed.append((record, result))
                        continue
                    reasons = summarize(result)
                    if (waiting := preemption.place(record, request)) is not None:
                        reasons = waiting
                # Within a pass capacity (and a team's room) only shrinks: the same spec of the same team fails
                # the same way (but a preempting instance took its own victims: the next one looks for others).
                if not reasons or reasons[0].reason != PREEMPTING:
                    failed[(key, record.team)] = reasons
            dumped = keep_preempted_by(record.schedule_reasons, [r.model_dump(mode="json") for r in reasons])
            if dumped != record.schedule_reasons:
                unschedulable.append((record, dumped, failure_message(reasons)))
            if n % 2000 == 1999:
                await asyncio.sleep(0)  # let requests in; the snapshot is ours until the pass ends
        written = time.perf_counter()
        self.stats["plan_s"] += written - planned
        await self._write(placed, unschedulable)
        await write_preemptions(self.server.db, preemption.victims, self.name)
        self.stats["write_s"] += time.perf_counter() - written
        self.stats["passes"] += 1

    async def _write(self, placed: list[tuple[InstanceRecord, Placement]],
                     unschedulable: list[tuple[InstanceRecord, list[dict[str, Any]], str]]) -> None:
        work: list[tuple[InstanceRecord, Any]] = [(r, p) for r, p in placed] + [(r, (d, m)) for r, d, m in unschedulable]
        for start in range(0, len(work), self.write_batch):
            chunk = work[start:start + self.write_batch]
            try:
                done, skipped, noted = await self._write_chunk(chunk)
            except BaseException:
                # Nothing of this chunk or the later ones was written: give their claims back to the snapshot.
                for record, outcome in work[start:]:
                    if isinstance(outcome, Placement):
                        self.state.cluster.apply(outcome.claim, outcome.worker.id, record.model_id, -1, record.team)
                raise
            for record, placement in skipped:
                self.state.cluster.apply(placement.claim, placement.worker.id, record.model_id, -1, record.team)
            for record, placement, claim_raw in done:
                self.state.mark_scheduled(record, placement.worker.id, placement.claim, claim_raw)
            for record, reasons in noted:
                record.schedule_reasons = reasons
            self.stats["placed"] += len(done)
            self.stats["unschedulable"] += len(noted)
        feed = getattr(self.server, "feed", None)
        if work and feed is not None:
            feed.wake()

    async def _write_chunk(self, chunk: list[tuple[InstanceRecord, Any]]) -> tuple[list, list, list]:
        """One transaction for up to `write_batch` outcomes, in bulk statements.

        The rows are re-read FOR UPDATE (a changed instance is left alone). Instance
        updates, their events and the change-log entries for both go in as a handful of
        multi-row statements; the change-log entries are the wire objects the session's
        own change hook would write (server/db/database.py), built from the rows as
        written, and a NOTIFY wakes the other servers, as after any commit.
        """
        instances = tables.ModelInstance.__table__
        events = tables.Event.__table__
        done: list[tuple[InstanceRecord, Placement, dict[str, Any]]] = []
        skipped: list[tuple[InstanceRecord, Placement]] = []
        noted: list[tuple[InstanceRecord, list[dict[str, Any]]]] = []
        placements: list[dict[str, Any]] = []
        reasons_rows: list[dict[str, Any]] = []
        new_events: list[dict[str, Any]] = []
        wires: list[dict[str, Any]] = []
        now = utcnow()
        columns = [c for c in instances.c if c.name != "spec"]  # the spec is in the snapshot already
        async with self.server.db.session() as s:
            rows = {row["id"]: dict(row) for row in (await s.execute(
                select(*columns).where(instances.c.id.in_([r.id for r, _ in chunk])).with_for_update()
            )).mappings().all()}
            for record, outcome in chunk:
                row = rows.get(record.id)
                current = row is not None and row["state"] == S.pending and row["generation"] == record.generation
                if isinstance(outcome, Placement):
                    if not current:
                        skipped.append((record, outcome))
                        continue
                    claim_raw = outcome.claim.model_dump(mode="json")
                    message = describe_claim(outcome.worker.name, outcome.claim) + (
                        f"; {outcome.note}" if outcome.note else "")
                    values = {"state": S.scheduled.value, "worker_id": outcome.worker.id,
                              "worker_name": outcome.worker.name, "address": outcome.worker.address,
                              "claim": claim_raw, "schedule_reasons": [], "state_message": message, "updated_at": now}
                    placements.append({"b_id": record.id, **values})
                    new_events.append(_event(row, "Scheduled", message, self.name, now))
                    done.append((record, outcome, claim_raw))
                elif current:
                    reasons, message = outcome
                    values = {"schedule_reasons": reasons, "state_message": f"unschedulable: {message}",
                              "updated_at": now}
                    reasons_rows.append({"b_id": record.id, **values})
                    if _reason_signature(reasons) != _reason_signature(row["schedule_reasons"] or []):
                        new_events.append(_event(row, "Unschedulable", message, self.name, now))
                    noted.append((record, reasons))
                else:
                    continue
                spec = self._specs.get(record.key)  # already validated: not validated again for the wire
                wires.append({**row, "spec": spec if isinstance(spec, schemas.ModelSpec) else record.spec, **values})
            for params in (placements, reasons_rows):
                if params:
                    names = [k for k in params[0] if k != "b_id"]
                    statement = update(instances).where(instances.c.id == bindparam("b_id")).values(
                        {name: bindparam(name) for name in names})
                    await s.execute(statement, params)
            changes = [{"kind": "instances", "action": "updated", "object": _wire(schemas.InstanceOut, w),
                        "created_at": now} for w in wires]
            if new_events:
                ids = (await s.execute(insert(events).returning(events.c.id, sort_by_parameter_order=True),
                                       new_events)).scalars().all()
                changes += [{"kind": "events", "action": "created", "object": _wire(schemas.EventOut, {**e, "id": i}),
                             "created_at": now} for e, i in zip(new_events, ids)]
            await log_changes(s, changes)
            await s.commit()
        return done, skipped, noted


def _event(row: Any, reason: str, message: str, actor: str, now: Any) -> dict[str, Any]:
    return {"kind": "instances", "object_id": row["id"], "object_name": row["name"], "reason": reason,
            "message": message, "actor": actor, "created_at": now}


def _wire(schema: type[schemas.Schema], values: dict[str, Any]) -> dict[str, Any]:
    """The wire shape of a row given as a mapping (only the fields the schema has)."""
    fields = schema.model_fields
    return schema.model_validate({k: v for k, v in values.items() if k in fields}).model_dump(mode="json")


def describe_claim(worker_name: str, claim: schemas.ResourceClaim) -> str:
    """`w1 (GPU [0, 1], 2 x 17.9 GiB, tp=2)` and the like."""
    gib = 1024**3
    if claim.device == "cpu":
        return f"{worker_name} (CPU, {claim.ram_bytes / 2**20:.0f} MiB)"
    parts = [f"GPU {claim.gpu_indexes}"]
    count = len(claim.gpu_indexes)
    size = claim.vram_bytes_per_gpu
    parts.append(f"{count} x {size / gib:.1f} GiB" if count > 1 else
                 (f"{size / 2**20:.0f} MiB" if size < gib else f"{size / gib:.1f} GiB"))
    if claim.tensor_parallel_size > 1:
        parts.append(f"tp={claim.tensor_parallel_size}")
    if claim.subordinate_workers:
        parts.append(f"pp={claim.pipeline_parallel_size} with " + ", ".join(
            f"{s.worker_name} GPU {s.gpu_indexes}" for s in claim.subordinate_workers))
    if claim.gpu_layers is not None:
        parts.append(f"{claim.gpu_layers} layers on GPU, {claim.ram_bytes / gib:.1f} GiB in RAM")
    if claim.gpu_memory_utilization is not None:
        parts.append(f"gpu-memory-utilization {claim.gpu_memory_utilization:g}")
    return f"{worker_name} ({', '.join(parts)})"
