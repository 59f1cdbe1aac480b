"""Unit tests: worker leases (expiry, takeover grace, renewals through the store), the heartbeat
cache that decides when a heartbeat writes, the model controller's event filter and its per-object
work queue. Pure: times are passed in."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from server.bus import EventBus, Frame
from server.reconcile import ALL, WorkQueue
from server.controllers.models import ModelController
from server.liveness import Heartbeats, Leases, inventory

TIMEOUT = 15.0


def test_a_lease_expires_after_the_timeout_without_renewal():
    leases = Leases(taken_over_at=100.0)
    leases.renew(1, 101.0)
    leases.renew(2, 110.0)
    assert leases.expired([1, 2], TIMEOUT, now=115.0) == []
    assert leases.expired([1, 2], TIMEOUT, now=116.5) == [1]
    assert leases.expired([1, 2], TIMEOUT, now=126.0) == [1, 2]


def test_an_older_renewal_never_shortens_a_lease():
    leases = Leases(taken_over_at=0.0)
    leases.renew(1, 50.0)
    leases.renew(1, 40.0)
    assert leases.last_heard(1) == 50.0


def test_takeover_grants_every_worker_a_full_timeout():
    # A new leader (or a restarted server) heard nothing from anyone yet, and the store says the
    # workers were last seen long ago (the gap while no leader ran): none expires before a full timeout.
    leases = Leases(taken_over_at=1000.0)
    wall = datetime(2026, 1, 1, tzinfo=UTC)
    leases.renew_from_store(1, wall - timedelta(seconds=60), now=1000.0, wall_now=wall)
    assert leases.expired([1, 2], TIMEOUT, now=1000.0 + TIMEOUT) == []
    assert leases.expired([1, 2], TIMEOUT, now=1000.0 + TIMEOUT + 0.1) == [1, 2]


def test_store_times_renew_only_when_they_advance_and_never_into_the_future():
    leases = Leases(taken_over_at=0.0)
    wall = datetime(2026, 1, 1, tzinfo=UTC)
    seen = wall - timedelta(seconds=2)  # flushed by another server 2 s ago
    leases.renew_from_store(7, seen, now=500.0, wall_now=wall)
    assert leases.last_heard(7) == 498.0
    # The same time read again later is no new sign of life.
    leases.renew_from_store(7, seen, now=520.0, wall_now=wall + timedelta(seconds=20))
    assert leases.expired([7], TIMEOUT, now=520.0) == [7]
    # A clock ahead of ours counts as "now", not later.
    leases.renew_from_store(7, wall + timedelta(seconds=90), now=530.0, wall_now=wall + timedelta(seconds=30))
    assert leases.last_heard(7) == 530.0
    # Naive times (SQLite) are UTC.
    leases.renew_from_store(8, (wall - timedelta(seconds=1)).replace(tzinfo=None), now=500.0, wall_now=wall)
    assert leases.last_heard(8) == 499.0


def test_forgotten_workers_leave_the_table():
    leases = Leases(taken_over_at=0.0)
    leases.renew(1, 10.0)
    leases.renew(2, 10.0)
    leases.forget([2])
    assert leases.last_heard(1) == 0.0 and leases.last_heard(2) == 10.0


def _gpu(index: int, utilization: float = 0.0, memory_used: int = 0) -> dict:
    return {"index": index, "name": "H100 (simulated)", "vendor": "simulated", "uuid": None,
            "memory_total": 80 << 30, "memory_used": memory_used, "utilization": utilization,
            "mig_mode": None, "simulated": True}


def test_a_heartbeat_writes_only_when_something_durable_changed():
    beats = Heartbeats(db=None)
    host = {"hostname": "h", "os": "Linux", "cpu_count": 8, "memory_total": 1 << 34, "cpu_percent": 3.0}
    seen = datetime(2026, 1, 1, tzinfo=UTC)
    assert beats.current(1, [_gpu(0)], host, seen) is None  # nothing known: read (and maybe write) the row
    row = {"id": 1, "name": "w", "state": "ready", "gpus": [_gpu(0)], "host": host, "last_heartbeat_at": None}
    beats.remember(row)
    # Moving readings are telemetry: no write; the answer is the stored row with this last-seen time.
    answer = beats.current(1, [_gpu(0, utilization=97.0, memory_used=5 << 30)], host | {"cpu_percent": 80.0}, seen)
    assert json.loads(answer) == row | {"last_heartbeat_at": seen.isoformat()}
    # Different hardware, or a worker that is not ready, goes to the database.
    assert beats.current(1, [_gpu(0), _gpu(1)], host, seen) is None
    assert beats.current(1, [_gpu(0)], host | {"memory_total": 1 << 35}, seen) is None
    beats.remember(row | {"state": "not_ready"})
    assert beats.current(1, [_gpu(0)], host, seen) is None
    assert inventory([_gpu(0, 50.0)], host) == inventory([_gpu(0, 10.0)], host | {"cpu_percent": 1.0})


def test_heard_workers_wait_for_the_batched_flush():
    beats = Heartbeats(db=None)
    first = beats.heard_from(3)
    second = beats.heard_from(3)
    beats.heard_from(4)
    assert beats._unflushed == {3: second, 4: beats._unflushed[4]} and second >= first
    beats.forget(4)
    assert set(beats._unflushed) == {3} and 4 not in beats.heard


def test_only_the_same_bytes_from_the_same_worker_skip_validation():
    beats = Heartbeats(db=None)
    raw = b'{"gpus":[],"host":{}}'
    assert beats.validated(1, raw) is None  # nothing validated yet
    model = object()
    beats.passed_validation(1, raw, model)
    assert beats.validated(1, bytes(raw)) is model  # equal bytes, another object: as the next request reads them
    assert beats.validated(1, raw + b" ") is None and beats.validated(2, raw) is None
    beats.forget(1)
    assert beats.validated(1, raw) is None


def test_work_queue_holds_each_key_once_and_delays():
    queue = WorkQueue()
    queue.add(1)
    queue.add(1)
    queue.add_after(2, 5.0, now=100.0)
    queue.add_after(2, 9.0, now=100.0)  # a later time does not push it back
    assert queue.next_due(100.0) == 0.0
    assert queue.take(100.0) == (False, {1})
    assert queue.next_due(100.0) == 5.0
    assert queue.take(104.0) == (False, set())
    assert queue.take(105.0) == (False, {2})
    assert queue.next_due(105.0) is None and len(queue) == 0
    queue.add_after(3, 1.0, now=0.0)
    queue.add(3)  # now wins over later
    assert queue.take(0.0) == (False, {3}) and len(queue) == 0
    queue.add_all()
    assert queue.take(0.0) == (True, set())


def _event(kind: str, obj: dict, action: str = "updated"):
    return SimpleNamespace(kind=kind, action=action, object=obj)


def test_the_model_controller_reconciles_only_what_an_event_concerns():
    controller = ModelController(SimpleNamespace(bus=EventBus()), interval=10.0)
    assert controller.keys_of(_event("models", {"id": 4})) == (4,)
    assert controller.keys_of(_event("instances", {"id": 9, "model_id": 4})) == (4,)
    worker = {"id": 1, "state": "ready", "draining": False, "gpus": [_gpu(0, 10.0)]}
    assert controller.keys_of(_event("workers", worker, "created")) == ()  # a new ready worker: the scheduler's
    # A worker row rewritten with new readings (or labels) does not wake it...
    assert controller.keys_of(_event("workers", worker | {"gpus": [_gpu(0, 90.0)]})) == ()
    # ...a worker that went away, drains or comes back does, for every model.
    assert controller.keys_of(_event("workers", worker | {"state": "not_ready"})) is ALL
    assert controller.keys_of(_event("workers", worker | {"state": "not_ready"})) == ()
    assert controller.keys_of(_event("workers", worker)) is ALL
    assert controller.keys_of(_event("workers", worker | {"draining": True})) is ALL
    assert controller.keys_of(_event("workers", worker, "deleted")) is ALL


def test_agent_subscriptions_get_only_their_instances_and_telemetry_goes_to_who_asked():
    bus = EventBus()
    bus.workers_of = lambda obj: {obj.get("worker_id")} | set(obj.get("subordinates", ()))
    agent_1 = bus.subscribe(["instances"], worker_id=1)
    agent_2 = bus.subscribe(["instances"], worker_id=2)
    tui = bus.subscribe(["workers", "instances"], telemetry=True)
    controller = bus.subscribe(["workers", "instances"])
    bus.publish("instances", "updated", {"id": 1, "worker_id": 1})
    bus.publish("instances", "updated", {"id": 2, "worker_id": 2, "subordinates": [1]})
    bus.publish("workers", "updated", {"id": 1})
    assert [e.object["id"] for e in _drain(agent_1)] == [1, 2]
    assert [e.object["id"] for e in _drain(agent_2)] == [2]
    assert len(_drain(controller)) == 3 and len(_drain(tui)) == 3
    bus.publish_frame(lambda: b"delta\n", lambda: b"full\n")
    bus.publish_frame(lambda: b"delta\n", lambda: b"full\n")
    bus.publish_frame(lambda: None, lambda: b"full\n")  # nothing changed: nothing sent
    assert _drain(tui) == [Frame(b"full\n"), Frame(b"delta\n")]
    assert _drain(controller) == [] and _drain(agent_1) == []
    agent_1.close()
    bus.publish("instances", "updated", {"id": 3, "worker_id": 1})
    assert _drain(agent_1) == [] and 1 not in bus._by_worker


def _drain(subscription) -> list:
    items = []
    while not subscription.queue.empty():
        items.append(subscription.queue.get_nowait())
    return items


def test_a_busy_key_is_reconciled_at_most_once_per_spacing():
    queue = WorkQueue()
    queue.add(1)
    assert queue.take(10.0, spacing=0.5) == (False, {1})
    queue.add(1)
    queue.add(2)
    assert queue.take(10.1, spacing=0.5) == (False, {2})  # 1 waits out its spacing...
    assert queue.next_due(10.1) == 0.4 or abs(queue.next_due(10.1) - 0.4) < 1e-9
    queue.add(1)  # ...however many changes arrive meanwhile
    assert queue.take(10.2, spacing=0.5) == (False, set())
    assert queue.take(10.5, spacing=0.5) == (False, {1})


def test_a_stalled_judge_excuses_the_workers():
    leases = Leases(taken_over_at=0.0)
    leases.renew(1, 100.0)
    # The judge's loop ran 8 s late (overloaded): heartbeats it could not read are not the worker's fault.
    leases.excuse(8.0, now=120.0)
    assert leases.expired([1], TIMEOUT, now=120.0) == []
    assert leases.expired([1], TIMEOUT, now=123.5) == [1]
    leases.excuse(60.0, now=124.0)  # never beyond now
    assert leases.last_heard(1) == 124.0


def test_most_of_the_cluster_silent_at_once_is_not_believed():
    from server.liveness import too_many_at_once

    assert not too_many_at_once(1, 2)  # a small cluster losing a worker: marked
    assert not too_many_at_once(10, 12)  # up to a handful, always
    assert not too_many_at_once(400, 1000)  # a rack of 40 %: marked
    assert too_many_at_once(501, 1000)  # most of the cluster at once: this server's fault, not theirs
