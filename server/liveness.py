"""Worker liveness as leases, kept in memory; the database sees only what lasts.

A heartbeat renews the worker's lease and replaces its live telemetry (server/telemetry.py),
both in this server's memory. The database is written only when something durable changes
(the worker comes back from not_ready, its GPU inventory or host changes) and, in batches,
the last-seen times: every FLUSH_SECONDS one statement for all workers heard meanwhile, with
no change-log row (nothing a watcher or controller needs to react to).

Who judges: the leader (server/controllers/workers.py) with :class:`Leases`. Any server can take
a worker's heartbeat. The leader renews leases from the heartbeats it takes itself (its own
monotonic clock, exactly) and from the last-seen times the other servers flush to the database
(at most FLUSH_SECONDS + one liveness tick late, far inside the timeout). A lease is never older
than the moment the judge took over: a new leader, or a restarted server, gives every worker a
full timeout of its own before it declares anything dead, whatever gap it had, and gets back the
time of a stall of its own (Leases.excuse). Most of the cluster expiring in one tick is not believed
(too_many_at_once): as in Kubernetes' full disruption, nothing is marked while it lasts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any, Iterable

from sqlalchemy import bindparam, update

from server.db import tables
from server.db.errors import first_line

log = logging.getLogger(__name__)

FLUSH_SECONDS = 2.0

# GPU and host fields that describe the hardware (durable: written to the worker row, seen by the
# scheduler); the others (utilisation, memory in use, temperature, power, processes, CPU load) are
# telemetry and live in memory only.
_GPU_DURABLE = ("index", "name", "vendor", "uuid", "memory_total", "mig_mode", "simulated")
_HOST_DURABLE = ("hostname", "os", "cpu_count", "memory_total")


_gpu_key = itemgetter(*_GPU_DURABLE)
_host_key = itemgetter(*_HOST_DURABLE)


def inventory(gpus: Iterable[dict[str, Any]], host: dict[str, Any]) -> tuple:
    """What of a worker's report is durable: its GPUs and host, without the moving readings.
    Takes wire dicts or pydantic models' __dict__ (every field present)."""
    try:
        return tuple(map(_gpu_key, gpus)), _host_key(host)
    except KeyError:  # a stored row from before a field existed: compare what is there
        return (tuple(tuple(g.get(k) for k in _GPU_DURABLE) for g in gpus),
                tuple(host.get(k) for k in _HOST_DURABLE))


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# More than this share of the ready workers expiring in one tick (and more than a handful) is taken
# for a fault of the judge's own (overload, a partition), not of the workers: none is marked.
DISRUPTION_SHARE = 0.5
DISRUPTION_MIN = 10


def too_many_at_once(expired: int, ready: int) -> bool:
    return expired > DISRUPTION_MIN and expired > DISRUPTION_SHARE * ready


class Leases:
    """The judge's view: when each worker was last heard of, on the judge's monotonic clock.

    Pure bookkeeping (times are passed in), so expiry and the takeover grace are testable as is.
    """

    def __init__(self, taken_over_at: float):
        self.taken_over_at = taken_over_at
        self._renewed: dict[int, float] = {}
        self._db_seen: dict[int, datetime] = {}

    def renew(self, worker_id: int, at: float) -> None:
        """A heartbeat this server took itself, at monotonic time `at`."""
        if at > self._renewed.get(worker_id, float("-inf")):
            self._renewed[worker_id] = at

    def renew_from_store(self, worker_id: int, seen: datetime | None, now: float, wall_now: datetime) -> None:
        """The last-seen time in the database (flushed by whichever server took the heartbeat).
        Only an advance counts, and never as later than now: a clock ahead of ours gains nothing."""
        if seen is None:
            return
        seen = _aware(seen)
        before = self._db_seen.get(worker_id)
        self._db_seen[worker_id] = seen
        if before is not None and seen <= before:
            return
        age = max(0.0, (wall_now - seen).total_seconds())
        self.renew(worker_id, now - age)

    def last_heard(self, worker_id: int) -> float:
        """Monotonic time of the newest sign of life, never before the takeover."""
        return max(self._renewed.get(worker_id, float("-inf")), self.taken_over_at)

    def expired(self, worker_ids: Iterable[int], timeout: float, now: float) -> list[int]:
        return [w for w in worker_ids if now - self.last_heard(w) > timeout]

    def excuse(self, seconds: float, now: float) -> None:
        """The judge itself stalled for `seconds` (its loop ran that late: an overloaded server hears
        heartbeats late too): every lease gets that time back, as a takeover gives a full timeout."""
        if seconds <= 0:
            return
        self.taken_over_at = min(now, self.taken_over_at + seconds)
        for worker_id, at in self._renewed.items():
            self._renewed[worker_id] = min(now, at + seconds)

    def forget(self, keep: Iterable[int]) -> None:
        """Drop workers that are gone (deleted rows)."""
        keep = set(keep)
        for store in (self._renewed, self._db_seen):
            for worker_id in [w for w in store if w not in keep]:
                del store[worker_id]


class Heartbeats:
    """This server's side of heartbeats: who was heard when, what the database holds of each
    worker (so a heartbeat that changes nothing durable writes nothing), and the batched flush
    of last-seen times."""

    def __init__(self, db: Any, flush_seconds: float = FLUSH_SECONDS):
        self.db = db
        self.flush_seconds = flush_seconds
        self.heard: dict[int, float] = {}  # worker id -> monotonic time of its last heartbeat here
        self._unflushed: dict[int, datetime] = {}
        # Worker id -> its row as published (WorkerOut wire dict), kept current from the bus.
        self.stored: dict[int, dict[str, Any]] = {}
        self._inventory: dict[int, tuple] = {}  # of each stored row, computed once
        self._encoded: dict[int, bytes] = {}  # each stored row as JSON without its last "}", encoded once
        # Worker id -> (body, its validated model) of the last heartbeat that passed validation, so that
        # the same bytes again from the same (authenticated) worker are not parsed and validated again.
        self._validated: dict[int, tuple[bytes, Any]] = {}
        self._task: asyncio.Task[None] | None = None
        self.flushes = 0

    def heard_from(self, worker_id: int) -> datetime:
        """Renew a worker's lease here; returns the wall-clock time it was heard."""
        self.heard[worker_id] = time.monotonic()
        wall = datetime.now(UTC)
        self._unflushed[worker_id] = wall
        return wall

    def remember(self, row: dict[str, Any]) -> None:
        """The worker row as the database now holds it (a bus event, a write of our own)."""
        self.stored[row["id"]] = row
        self._inventory[row["id"]] = inventory(row.get("gpus") or (), row.get("host") or {})
        rest = {k: v for k, v in row.items() if k != "last_heartbeat_at"}
        self._encoded[row["id"]] = json.dumps(rest, separators=(",", ":")).encode()[:-1]

    def validated(self, worker_id: int, raw: bytes) -> Any:
        """The model of this worker's last validated heartbeat if `raw` is the same bytes, else None.
        Validation is a function of the bytes alone: what passed once passes again."""
        last = self._validated.get(worker_id)
        return last[1] if last is not None and last[0] == raw else None

    def passed_validation(self, worker_id: int, raw: bytes, body: Any) -> None:
        self._validated[worker_id] = (raw, body)

    def forget(self, worker_id: int) -> None:
        self._validated.pop(worker_id, None)
        self.stored.pop(worker_id, None)
        self._inventory.pop(worker_id, None)
        self._encoded.pop(worker_id, None)
        self.heard.pop(worker_id, None)
        self._unflushed.pop(worker_id, None)

    def current(self, worker_id: int, gpus: list[dict[str, Any]], host: dict[str, Any],
                seen: datetime) -> bytes | None:
        """When a heartbeat with this report needs no database write (the worker is ready and its
        hardware unchanged): the stored row with this last-seen time, as JSON. Else None."""
        row = self.stored.get(worker_id)
        if row is None or row.get("state") != "ready":
            return None
        if self._inventory.get(worker_id) != inventory(gpus, host):
            return None
        return self._encoded[worker_id] + b',"last_heartbeat_at":"' + seen.isoformat().encode() + b'"}'

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="heartbeat-flush")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self.flush()  # a clean stop leaves the newest times behind
        except Exception as exc:
            log.warning("last heartbeat flush failed: %s", first_line(exc))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_seconds)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is down: keep the times, write them next round
                log.warning("cannot write last-seen times (%s); retrying", first_line(exc))

    async def flush(self) -> None:
        """One statement (one parameter set per worker) for every worker heard since the last flush.
        A Core UPDATE: no change-log row, no NOTIFY; updated_at stays (nothing a client follows moved)."""
        batch, self._unflushed = self._unflushed, {}
        if not batch:
            return
        statement = (update(tables.Worker.__table__)
                     .where(tables.Worker.__table__.c.id == bindparam("worker_id"))
                     .values(last_heartbeat_at=bindparam("seen"), updated_at=tables.Worker.__table__.c.updated_at))
        try:
            async with self.db.engine.begin() as conn:
                await conn.execute(statement, [{"worker_id": w, "seen": seen} for w, seen in batch.items()])
        except BaseException:
            for worker_id, seen in batch.items():  # newer times heard meanwhile win
                self._unflushed.setdefault(worker_id, seen)
            raise
        self.flushes += 1
