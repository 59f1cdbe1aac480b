"""The scheduler's picture of the cluster, kept current from the event bus.

Workers, instance claims and team quotas come from the database once (`load`), then from
the wire objects the bus publishes for every committed change (`apply`; a quota change is
published as kind `teams`, see server/api/teams.py). Allocation is the sum of the claims of
instances that hold resources, never the usage agents report; a team's usage against its
quota is the same sum over its instances.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

from server import schemas
from server.scheduler.locality import FileIndex
from server.scheduler.placement import Cluster, WorkerSnapshot
from server.schemas import parse_size

S = schemas.InstanceState
# Instances whose claims still hold resources.
# downloading: the agent holds the claim while it fetches weights or an image.
CLAIMING = frozenset({S.scheduled, S.downloading, S.starting, S.running, S.error, S.unreachable, S.terminating})

RESERVED_RAM_LABEL = "maas.reserved-ram"
RESERVED_VRAM_LABEL = "maas.reserved-vram"
@dataclass(frozen=True)
class Reserves:
    """Memory kept back on every worker: host RAM (None: 10%, at most 2 GiB) and per GPU.

    Cluster-wide from MAAS_RESERVED_RAM / MAAS_RESERVED_VRAM, per worker from the labels
    maas.reserved-ram / maas.reserved-vram (sizes like 4GiB).
    """

    ram: int | None = None
    vram: int = 0

    @classmethod
    def from_env(cls) -> "Reserves":
        return cls(ram=parse_size(os.environ.get("MAAS_RESERVED_RAM")),
                   vram=parse_size(os.environ.get("MAAS_RESERVED_VRAM")) or 0)


def worker_from_wire(obj: dict[str, Any], reserves: Reserves) -> WorkerSnapshot:
    labels = {str(k): str(v) for k, v in (obj.get("labels") or {}).items()}
    gpus = obj.get("gpus") or []
    ram_label = parse_size(labels.get(RESERVED_RAM_LABEL))
    vram_label = parse_size(labels.get(RESERVED_VRAM_LABEL))
    return WorkerSnapshot(
        id=int(obj["id"]), name=str(obj["name"]), address=str(obj.get("address") or ""),
        ready=obj.get("state") == schemas.WorkerState.ready, cordoned=bool(obj.get("cordoned")),
        ram_total=int((obj.get("host") or {}).get("memory_total", 0)),
        gpu_total={int(g["index"]): int(g["memory_total"]) for g in gpus},
        labels=labels,
        gpu_names={int(g["index"]): str(g.get("name") or "") for g in gpus},
        gpu_vendors={int(g["index"]): str(g.get("vendor") or "nvidia").lower() for g in gpus},
        reserved_ram_bytes=ram_label if ram_label is not None else reserves.ram,
        reserved_vram_bytes=vram_label if vram_label is not None else reserves.vram,
    )


def _static(w: WorkerSnapshot) -> tuple:
    """What of a worker matters to placement (heartbeats that change nothing here are ignored)."""
    return (w.name, w.address, w.ready, w.cordoned, w.ram_total, w.gpu_total, w.labels, w.gpu_names, w.gpu_vendors,
            w.reserved_ram_bytes, w.reserved_vram_bytes)


def spec_key(spec: dict[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


@dataclass
class InstanceRecord:
    id: int
    name: str
    model_id: int
    generation: int
    state: str
    worker_id: int | None
    claim_raw: dict[str, Any] | None
    spec: dict[str, Any]
    schedule_reasons: list[Any] = field(default_factory=list)
    team: str | None = None
    claim: schemas.ResourceClaim | None = None
    _spec_key: str | None = None

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> "InstanceRecord":
        return cls(id=int(obj["id"]), name=str(obj.get("name", "")), model_id=int(obj.get("model_id") or 0),
                   generation=int(obj.get("generation") or 0), state=str(obj.get("state")),
                   worker_id=obj.get("worker_id"), claim_raw=obj.get("claim"), spec=obj.get("spec") or {},
                   schedule_reasons=list(obj.get("schedule_reasons") or []), team=obj.get("team"))

    @property
    def key(self) -> str:
        if self._spec_key is None:
            self._spec_key = spec_key(self.spec)
        return self._spec_key

    def holds(self) -> bool:
        return self.state in CLAIMING and self.worker_id is not None and self.claim_raw is not None

    def holding(self) -> tuple[int | None, str, str | None] | None:
        """What this instance holds (and whose quota it counts against), comparable between versions of it."""
        return (self.worker_id, spec_key(self.claim_raw), self.team) if self.holds() else None


def quota_from_wire(obj: dict[str, Any]) -> schemas.TeamQuota | None:
    """A team's quota from its published object ({"name", "quota"}); None when it has none or it is unreadable."""
    try:
        return schemas.TeamQuota.model_validate(obj.get("quota") or {})
    except ValueError:
        return None


class ClusterState:
    def __init__(self, reserves: Reserves | None = None):
        self.reserves = reserves or Reserves()
        self.cluster = Cluster()
        self.instances: dict[int, InstanceRecord] = {}
        self.pending: dict[int, InstanceRecord] = {}
        self._statics: dict[int, tuple] = {}
        self.files = FileIndex()  # which workers hold which model files (server/scheduler/locality.py)

    # loading
    def load(self, workers: list[dict[str, Any]], instances: list[dict[str, Any]],
             teams: Iterable[dict[str, Any]] = (), files: list[dict[str, Any]] | None = None) -> None:
        self.cluster = Cluster()
        if files is not None:
            self.files.load(files)
        for obj in teams:
            self.cluster.set_quota(str(obj["name"]), quota_from_wire(obj))
        self.instances.clear()
        self.pending.clear()
        self._statics.clear()
        for obj in workers:
            w = worker_from_wire(obj, self.reserves)
            self.cluster.put(w)
            self._statics[w.id] = _static(w)
        for obj in instances:
            self._set_instance(InstanceRecord.from_wire(obj))

    # events
    def apply(self, kind: str, action: str, obj: dict[str, Any]) -> bool:
        """Apply one bus event; True when it can change a scheduling decision."""
        if kind == "workers":
            return self.apply_worker(action, obj)
        if kind == "instances":
            return self.apply_instance(action, obj)
        if kind == "teams":
            return self.cluster.set_quota(str(obj["name"]), None if action == "deleted" else quota_from_wire(obj))
        if kind == "files":
            return self.files.apply(action, obj)
        return False

    def apply_worker(self, action: str, obj: dict[str, Any]) -> bool:
        worker_id = int(obj["id"])
        if action == "deleted":
            self._statics.pop(worker_id, None)
            return self.cluster.remove(worker_id) is not None
        fresh = worker_from_wire(obj, self.reserves)
        static = _static(fresh)
        if self._statics.get(worker_id) == static:
            return False  # a heartbeat: usage changed, placement inputs did not
        self._statics[worker_id] = static
        current = self.cluster.workers.get(worker_id)
        if current is None:
            self.cluster.put(fresh)
            # Claims that name this worker (its instances may have arrived first).
            for record in self.instances.values():
                if record.holds() and (record.worker_id == worker_id or any(
                        s.get("worker_id") == worker_id for s in (record.claim_raw or {}).get("subordinate_workers", []))):
                    self._hold(record, sign=1, only_worker=worker_id)
            return True
        for name in ("name", "address", "ready", "cordoned", "ram_total", "gpu_total", "labels", "gpu_names",
                     "gpu_vendors", "reserved_ram_bytes", "reserved_vram_bytes"):
            setattr(current, name, getattr(fresh, name))
        self.cluster.put(current)  # renames and index rebuild
        return True

    def apply_instance(self, action: str, obj: dict[str, Any]) -> bool:
        instance_id = int(obj["id"])
        old = self.instances.get(instance_id)
        if action == "deleted":
            if old is None:
                return False
            self.instances.pop(instance_id)
            self.pending.pop(instance_id, None)
            if old.holds():
                self._hold(old, sign=-1)
                return True
            return False
        record = InstanceRecord.from_wire(obj)
        if old is not None and old.holding() == record.holding():
            # Same allocation: keep the parsed claim, refresh the rest.
            record.claim = old.claim
            was_pending = old.state == S.pending
            self.instances[instance_id] = record
            if record.state == S.pending:
                self.pending[instance_id] = record
            else:
                self.pending.pop(instance_id, None)
            return (record.state == S.pending) != was_pending or (was_pending and record.spec != old.spec)
        if old is not None and old.holds():
            self._hold(old, sign=-1)
        self.pending.pop(instance_id, None)
        self._set_instance(record)
        return True

    def _set_instance(self, record: InstanceRecord) -> None:
        self.instances[record.id] = record
        if record.state == S.pending:
            self.pending[record.id] = record
        if record.holds():
            self._hold(record, sign=1)

    def _hold(self, record: InstanceRecord, sign: int, only_worker: int | None = None) -> None:
        if record.claim is None:
            try:
                record.claim = schemas.ResourceClaim.model_validate(record.claim_raw)
            except ValueError:
                return  # a claim we cannot read holds nothing we can count
        claim = record.claim
        if only_worker is not None:
            # Re-apply to one worker that (re)appeared: build a claim with just its part.
            if record.worker_id == only_worker:
                claim = claim.model_copy(update={"subordinate_workers": []})
                self.cluster.apply(claim, record.worker_id, record.model_id, sign)
            for sub in record.claim.subordinate_workers:
                if sub.worker_id == only_worker:
                    part = schemas.ResourceClaim(device="gpu", subordinate_workers=[sub])
                    self.cluster.apply(part, None, record.model_id, sign)
            return
        self.cluster.apply(claim, record.worker_id, record.model_id, sign, team=record.team)

    # after the scheduler's own write
    def mark_scheduled(self, record: InstanceRecord, worker_id: int, claim: schemas.ResourceClaim,
                       claim_raw: dict[str, Any]) -> None:
        """The placement is committed: record it so the echo from the bus changes nothing."""
        record.state = S.scheduled
        record.worker_id = worker_id
        record.claim = claim
        record.claim_raw = claim_raw
        record.schedule_reasons = []
        self.pending.pop(record.id, None)
