"""What the TUI knows about the cluster, fed by the watch stream. Pure Python: no Textual, no I/O.

`ClusterState.apply()` takes `WatchMessage`s (a snapshot replaces everything, an event
changes one object) and keeps per-GPU history for the sparklines. Derived views (ready
replicas, GPU claims, the header summary) are computed on demand and cached per revision.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from server import schemas
from server.schemas.alerts import AlertOut
from server.schemas.rollout import rollout_status
from server.schemas.telemetry import TELEMETRY_KIND, TelemetryFrame

WATCH_KINDS = ["workers", "models", "instances", "events", "alerts", "files"]
# Read over REST when their view is shown or reloaded (app.load_<kind>), not watched.
POLLED_KINDS = {"keys", "teams", "audit", "usage", "limits"}
HISTORY = 120  # samples kept per GPU (one per heartbeat: minutes of history)
EVENTS_KEPT = 2000
# An instance in one of these states holds its claim.
CLAIMING = {"scheduled", "downloading", "starting", "running", "error", "unreachable", "terminating"}


@dataclass(frozen=True)
class Summary:
    workers_ready: int = 0
    workers_total: int = 0
    gpus_total: int = 0
    gpus_claimed: int = 0
    gpus_simulated: int = 0
    models_total: int = 0
    models_ready: int = 0
    replicas_ready: int = 0
    replicas_desired: int = 0
    instances_error: int = 0
    instances_unreachable: int = 0
    instances_pending: int = 0
    workers_not_ready: int = 0
    alerts_firing: int = 0  # firing alerts no silence covers

    @property
    def alerts(self) -> int:
        return self.instances_error + self.instances_unreachable + self.workers_not_ready


class ClusterState:
    def __init__(self, history: int = HISTORY) -> None:
        self.history_len = history
        self.workers: dict[int, schemas.WorkerOut] = {}
        self.models: dict[int, schemas.ModelOut] = {}
        self.instances: dict[int, schemas.InstanceOut] = {}
        self.events: deque[schemas.EventOut] = deque(maxlen=EVENTS_KEPT)
        self.keys: list[schemas.ApiKeyOut] = []
        self.teams: list[schemas.TeamOut] = []
        self.audit: list[schemas.AuditEntryOut] = []  # newest first
        self.audit_error = ""  # why the audit log could not be read (a 403 for anyone but an admin)
        self.usage: list[schemas.UsageRow] = []  # the last 24 h by day, hour, model and route (the Usage view)
        self.limits: list[Any] = []  # schemas.limits.LimitsListed: each limit with what it uses now (the Usage view)
        self.alerts: dict[int, AlertOut] = {}  # firing and recent resolved alerts (watched; the Alerts view reloads)
        self.files: dict[int, schemas.ModelFileOut] = {}  # model files in the workers' caches (watched)
        self.version: int | None = None
        # Per-GPU utilisation and memory history, keyed by (worker id, gpu index); host CPU per worker.
        self.gpu_util: dict[tuple[int, int], deque[float]] = {}
        self.gpu_mem: dict[tuple[int, int], deque[float]] = {}
        self.cpu: dict[int, deque[float]] = {}
        # Connection state, shown in the header.
        self.connected = False
        self.ever_connected = False
        self.error = ""
        self.auth_failed = False
        # Bumped on every change, per kind, so views can skip work when nothing they show moved.
        self.revision: Counter[str] = Counter()
        self._cache: dict[str, tuple[int, Any]] = {}

    def load(self, *, workers: list[schemas.WorkerOut] | None = None, models: list[schemas.ModelOut] | None = None,
             instances: list[schemas.InstanceOut] | None = None,
             events: list[schemas.EventOut] | None = None) -> "ClusterState":
        """Fill from REST answers (the CLI renders with the TUI's renderers from a state built this way)."""
        for kind, items in (("workers", workers), ("models", models), ("instances", instances)):
            if items is not None:
                setattr(self, kind, {item.id: item for item in items})
                self.revision[kind] += 1
        for worker in workers or ():
            self._sample(worker)
        if events is not None:
            self.events.clear()
            self.events.extend(events)
            self.revision["events"] += 1
        return self

    # --- applying the stream ------------------------------------------------------------

    def apply(self, message: schemas.WatchMessage) -> set[str]:
        """Apply one watch message; returns the kinds that changed."""
        self.version = message.version
        if message.type == "snapshot":
            return self.apply_snapshot(message.items or {})
        if message.type == "event" and message.kind and message.object is not None:
            return self.apply_event(message.kind, message.action or "updated", message.object)
        return set()

    def apply_snapshot(self, items: dict[str, list[dict[str, Any]]]) -> set[str]:
        changed: set[str] = set()
        if "workers" in items:
            workers = [schemas.WorkerOut.model_validate(o) for o in items["workers"]]
            self.workers = {w.id: w for w in workers}
            for worker in workers:
                self._sample(worker)
            live = set(self.workers)
            for store in (self.gpu_util, self.gpu_mem):
                for key in [k for k in store if k[0] not in live]:
                    del store[key]
            changed.add("workers")
        if "models" in items:
            self.models = {m.id: m for m in (schemas.ModelOut.model_validate(o) for o in items["models"])}
            changed.add("models")
        if "instances" in items:
            self.instances = {i.id: i for i in (schemas.InstanceOut.model_validate(o) for o in items["instances"])}
            changed.add("instances")
        if "files" in items:
            self.files = {f.id: f for f in (schemas.ModelFileOut.model_validate(o) for o in items["files"])}
            changed.add("files")
        if "alerts" in items:
            self.alerts = {a.id: a for a in (AlertOut.model_validate(o) for o in items["alerts"])}
            changed.add("alerts")
        if "events" in items:
            self.events.clear()
            self.events.extend(schemas.EventOut.model_validate(o) for o in items["events"])
            changed.add("events")
        for kind in changed:
            self.revision[kind] += 1
        return changed

    def apply_event(self, kind: str, action: str, obj: dict[str, Any]) -> set[str]:
        if kind == "workers":
            self._upsert(self.workers, schemas.WorkerOut, action, obj, on_upsert=self._sample)
        elif kind == "models":
            self._upsert(self.models, schemas.ModelOut, action, obj)
        elif kind == "instances":
            self._upsert(self.instances, schemas.InstanceOut, action, obj)
        elif kind == "files":
            self._upsert(self.files, schemas.ModelFileOut, action, obj)
        elif kind == "alerts":
            self._upsert(self.alerts, AlertOut, action, obj)
        elif kind == "events":
            if action == "created":
                self.events.append(schemas.EventOut.model_validate(obj))
        elif kind == TELEMETRY_KIND:
            return self._apply_telemetry(TelemetryFrame.model_validate(obj))
        else:
            return set()
        self.revision[kind] += 1
        return {kind}

    def _apply_telemetry(self, frame: TelemetryFrame) -> set[str]:
        """Live readings (server/telemetry.py) onto the workers they belong to, one sample each."""
        for worker_id, reading in frame.workers.items():
            worker = self.workers.get(worker_id)
            if worker is None:
                continue
            by_index = {g.index: g for g in reading.gpus}
            gpus = [g.model_copy(update=by_index[g.index].model_dump(exclude={"index"})) if g.index in by_index else g
                    for g in worker.gpus]
            host = worker.host.model_copy(update={"cpu_percent": reading.cpu_percent, "memory_used": reading.memory_used})
            worker = worker.model_copy(update={"gpus": gpus, "host": host,
                                               "last_heartbeat_at": reading.last_heartbeat_at})
            self.workers[worker_id] = worker
            self._sample(worker)
        if not frame.workers:
            return set()
        self.revision["workers"] += 1
        return {"workers"}

    def _upsert(self, store: dict, schema: type, action: str, obj: dict[str, Any], on_upsert=None) -> None:
        if action == "deleted":
            store.pop(obj.get("id"), None)
            return
        item = schema.model_validate(obj)
        store[item.id] = item
        if on_upsert is not None:
            on_upsert(item)

    def _sample(self, worker: schemas.WorkerOut) -> None:
        for gpu in worker.gpus:
            key = (worker.id, gpu.index)
            util = self.gpu_util.get(key)
            if util is None:
                util = self.gpu_util[key] = deque(maxlen=self.history_len)
                self.gpu_mem[key] = deque(maxlen=self.history_len)
            util.append(gpu.utilization)
            self.gpu_mem[key].append(100.0 * gpu.memory_used / gpu.memory_total if gpu.memory_total else 0.0)
        cpu = self.cpu.get(worker.id)
        if cpu is None:
            cpu = self.cpu[worker.id] = deque(maxlen=self.history_len)
        cpu.append(worker.host.cpu_percent)

    def set_disconnected(self, reason: str, auth_failed: bool = False) -> None:
        self.connected = False
        self.error = reason
        self.auth_failed = auth_failed

    def set_connected(self) -> None:
        self.connected = True
        self.ever_connected = True
        self.error = ""
        self.auth_failed = False

    # --- derived views -------------------------------------------------------------------

    def _cached(self, name: str, kinds: tuple[str, ...], build):
        stamp = tuple(self.revision[k] for k in kinds)
        hit = self._cache.get(name)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        value = build()
        self._cache[name] = (stamp, value)
        return value

    def ready_counts(self) -> Counter[int]:
        """Running instances per model id (the server's definition of ready)."""
        return self._cached("ready", ("instances",), lambda: Counter(
            i.model_id for i in self.instances.values() if i.state == schemas.InstanceState.running))

    def gpu_claims(self) -> dict[tuple[int, int], list[schemas.InstanceOut]]:
        """Instances holding each GPU, keyed by (worker id, gpu index)."""
        def build() -> dict[tuple[int, int], list[schemas.InstanceOut]]:
            claims: dict[tuple[int, int], list[schemas.InstanceOut]] = {}
            for inst in self.instances.values():
                if inst.claim and inst.claim.device == "gpu" and inst.worker_id is not None and inst.state in CLAIMING:
                    for index in inst.claim.gpu_indexes:
                        claims.setdefault((inst.worker_id, index), []).append(inst)
            return claims
        return self._cached("claims", ("instances",), build)

    def claimed_bytes(self, worker_id: int, index: int) -> int:
        return sum(i.claim.vram_bytes_per_gpu for i in self.gpu_claims().get((worker_id, index), []) if i.claim)

    def summary(self) -> Summary:
        def build() -> Summary:
            ready = self.ready_counts()
            gpus = [g for w in self.workers.values() for g in w.gpus]
            models = [m for m in self.models.values()]
            states = Counter(i.state for i in self.instances.values())
            return Summary(
                workers_ready=sum(1 for w in self.workers.values() if w.state == "ready"),
                workers_total=len(self.workers),
                gpus_total=len(gpus),
                gpus_claimed=len(self.gpu_claims()),
                gpus_simulated=sum(1 for g in gpus if g.simulated),
                models_total=len(models),
                models_ready=sum(1 for m in models if ready[m.id] >= m.replicas and m.state == "active"),
                replicas_ready=sum(ready[m.id] for m in models),
                replicas_desired=sum(m.replicas for m in models if m.state == "active"),
                instances_error=states["error"],
                instances_unreachable=states["unreachable"],
                instances_pending=states["pending"],
                workers_not_ready=sum(1 for w in self.workers.values() if w.state != "ready"),
                alerts_firing=sum(1 for a in self.alerts.values() if a.state == "firing" and not a.silenced),
            )
        return self._cached("summary", ("workers", "models", "instances", "alerts"), build)

    def sorted_workers(self) -> list[schemas.WorkerOut]:
        return self._cached("workers", ("workers",), lambda: sorted(self.workers.values(), key=lambda w: w.name))

    def sorted_models(self) -> list[schemas.ModelOut]:
        return self._cached("models", ("models",), lambda: sorted(self.models.values(), key=lambda m: m.name))

    def sorted_instances(self) -> list[schemas.InstanceOut]:
        return self._cached("instances", ("instances",),
                            lambda: sorted(self.instances.values(), key=lambda i: (i.model_name, i.name)))

    def rollouts(self) -> dict[int, schemas.RolloutStatus]:
        """Per model id: its rollout progress, by the server's definition (server/schemas/rollout.py)."""
        def build() -> dict[int, schemas.RolloutStatus]:
            owned: dict[int, list[schemas.InstanceOut]] = {}
            for inst in self.instances.values():
                owned.setdefault(inst.model_id, []).append(inst)
            return {m.id: rollout_status(m, owned.get(m.id, ())) for m in self.models.values()}
        return self._cached("rollouts", ("models", "instances"), build)

    def model_by_name(self, name: str) -> schemas.ModelOut | None:
        return next((m for m in self.models.values() if m.name == name), None)

    def instance_by_name(self, name: str) -> schemas.InstanceOut | None:
        return next((i for i in self.instances.values() if i.name == name), None)

    def worker_by_name(self, name: str) -> schemas.WorkerOut | None:
        return next((w for w in self.workers.values() if w.name == name), None)

    def instances_of(self, model_id: int) -> list[schemas.InstanceOut]:
        return [i for i in self.sorted_instances() if i.model_id == model_id]

    def instances_on(self, worker_id: int) -> list[schemas.InstanceOut]:
        return [i for i in self.sorted_instances() if i.worker_id == worker_id]

    def events_about(self, names: set[str], limit: int = 20) -> list[schemas.EventOut]:
        found = [e for e in reversed(self.events) if e.object_name in names]
        return found[:limit]
