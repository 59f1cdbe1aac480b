"""A SIMULATED cluster for the TUI: fixed, deterministic data for snapshots, screenshots and the bench.

Nothing here talks to a server. `demo_state()` builds a `ClusterState` (simulated workers and
GPUs, models, instances, events, keys, minutes of GPU history, teams, the audit log) at a fixed clock;
`DemoClient` answers the app's client calls from memory. `python -m maas_tui.tui.demo` runs the
TUI on it, with utilisation moving every second (`--static` keeps it still).

Why ~570 lines: it is data (a whole simulated cluster), not logic.
"""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta
from typing import Any, AsyncIterator

from server import schemas
from maas_tui.client import ApiClientError
from maas_tui.tui.state import ClusterState
from server.schemas.alerts import AlertOut

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
GB = 1000**3


def fixed_clock() -> datetime:
    return NOW


def utilisation(worker: int, gpu: int, t: float) -> float:
    """A deterministic, lively 0..100 signal per GPU."""
    base = 55 + 40 * math.sin(t / 7.0 + worker * 1.3 + gpu * 0.9)
    wobble = 10 * math.sin(t / 2.3 + gpu * 2.1 + worker)
    return float(max(0, min(100, round(base + wobble))))


def make_worker(wid: int, name: str, gpus: list[tuple[str, int]], t: float = 0.0, state: str = "ready",
                simulated: bool = True, cpu_count: int = 64, ram_gb: int = 512) -> schemas.WorkerOut:
    devices = []
    for index, (model, memory_gb) in enumerate(gpus):
        util = utilisation(wid, index, t) if state == "ready" else 0.0
        devices.append(schemas.GPUDevice(
            index=index, name=f"{model} (simulated)" if simulated else model, vendor="simulated" if simulated else "nvidia",
            memory_total=memory_gb * GB, memory_used=int(memory_gb * GB * min(0.95, util / 110 + 0.05)),
            utilization=util, temperature=round(35 + util * 0.45), simulated=simulated))
    cpu = 0.0 if state != "ready" else round(20 + 15 * math.sin(t / 5 + wid), 1)
    return schemas.WorkerOut(
        id=wid, name=name, address=f"10.0.0.{10 + wid}", agent_port=10150, labels={"zone": "a" if wid % 2 else "b"},
        state=state, state_message="" if state == "ready" else "no heartbeat for 45s", gpus=devices,
        host=schemas.HostInfo(hostname=name, os="Linux", cpu_count=cpu_count, cpu_percent=cpu,
                              memory_total=ram_gb * GB, memory_used=int(ram_gb * GB * (0.2 + 0.1 * (wid % 3)))),
        last_heartbeat_at=NOW - timedelta(seconds=2 if state == "ready" else 45),
        created_at=NOW - timedelta(days=3), updated_at=NOW)


QWEN_SOURCE = "hf://Qwen/Qwen2.5-7B-Instruct-GGUF/qwen2.5-7b-instruct-q5_k_m.gguf"  # shows a download


def _spec(source: str, **kw: Any) -> schemas.ModelSpec:
    return schemas.ModelSpec(source=source, backend="llama.cpp", **kw)


def demo_state(history: int = 60) -> ClusterState:
    state = ClusterState()
    h100 = [("H100-80GB", 80)] * 4
    layout = [
        (1, "gpu-a01", h100, "ready"), (2, "gpu-a02", h100, "ready"), (3, "gpu-a03", h100, "ready"),
        (4, "gpu-a04", h100, "not_ready"), (5, "gpu-b01", [("L4-24GB", 24)] * 8, "ready"),
        (6, "cpu-01", [], "ready"),
    ]
    # Minutes of history: one sample per heartbeat, the newest last.
    for step in range(history):
        t = step - history + 1.0
        for wid, name, gpus, wstate in layout:
            worker = make_worker(wid, name, gpus, t, wstate, cpu_count=16 if not gpus else 64,
                                 ram_gb=64 if not gpus else 512)
            state.apply_event("workers", "updated", worker.model_dump(mode="json"))
    models = [
        schemas.ModelOut(id=1, name="llama-3.1-8b", spec=_spec("/models/llama-3.1-8b-q4.gguf", context_length=8192),
                         replicas=2, generation=2, state="active", created_at=NOW - timedelta(hours=5), updated_at=NOW),
        schemas.ModelOut(id=2, name="qwen2.5-7b", spec=_spec(QWEN_SOURCE,
                                                              context_length=4096), replicas=3,
                         generation=2, state="active", created_at=NOW - timedelta(hours=2), updated_at=NOW),
        schemas.ModelOut(id=3, name="mistral-7b", spec=_spec("/models/mistral-7b-v0.3.gguf", args=["--threads", "8"]),
                         replicas=1, generation=1, state="active", created_at=NOW - timedelta(minutes=40),
                         updated_at=NOW),
        schemas.ModelOut(id=4, name="tiny", spec=_spec("/srv/models/tiny.gguf", cpu_only=True), replicas=1,
                         generation=1, state="active", created_at=NOW - timedelta(minutes=12), updated_at=NOW,
                         # autoscaled, back from zero (server/controllers/autoscale.py)
                         min_replicas=0, max_replicas=3, target_concurrency=8, priority="low",
                         scale_reason="load 0.0 in flight + 1 held, target 8 per replica: 0 -> 1",
                         scaled_at=NOW - timedelta(minutes=3)),
    ]
    cordoned = state.workers[5].model_copy(update={"cordoned": True})
    state.apply_event("workers", "updated", cordoned.model_dump(mode="json"))
    for model in models:
        state.apply_event("models", "created", model.model_dump(mode="json"))

    def inst(iid: int, name: str, model: schemas.ModelOut, istate: str, worker: tuple[int, str] | None,
             gpus: list[int] | None, vram: float = 0, port: int | None = None, restarts: int = 0, message: str = "",
             reasons: list[schemas.UnschedulableReason] | None = None, age_min: int = 30,
             generation: int | None = None, progress: float | None = None) -> None:
        claim = None
        if worker is not None:
            claim = (schemas.ResourceClaim(device="gpu", gpu_indexes=gpus, vram_bytes_per_gpu=int(vram * GB),
                                           ram_bytes=2 * GB) if gpus else
                     schemas.ResourceClaim(device="cpu", ram_bytes=int(1.2 * GB)))
        obj = schemas.InstanceOut(
            id=iid, name=name, model_id=model.id, model_name=model.name,
            generation=generation or model.generation, spec=model.spec,
            state=istate, state_message=message, worker_id=worker[0] if worker else None,
            worker_name=worker[1] if worker else None, address=f"10.0.0.{10 + worker[0]}" if worker else None,
            port=port, pid=40000 + iid if port else None, claim=claim, schedule_reasons=reasons or [],
            restart_count=restarts, download_progress=progress, created_at=NOW - timedelta(minutes=age_min),
            updated_at=NOW)
        state.apply_event("instances", "created", obj.model_dump(mode="json"))

    llama, qwen, mistral, tiny = models
    inst(1, "llama-3.1-8b-3f9a1c", llama, "running", (1, "gpu-a01"), [0], 18.5, 40001, age_min=290)
    inst(2, "llama-3.1-8b-77b2e0", llama, "running", (2, "gpu-a02"), [1], 18.5, 40002, age_min=288)
    inst(3, "qwen2.5-7b-a1d4e2", qwen, "running", (1, "gpu-a01"), [1, 2], 12.0, 40003, age_min=110, generation=1)
    inst(4, "qwen2.5-7b-c0ffee", qwen, "downloading", (3, "gpu-a03"), [0, 1], 12.0, None, age_min=1,
         message=f"downloading {QWEN_SOURCE} into /var/lib/maas/models", progress=0.42)
    inst(5, "qwen2.5-7b-5e7d21", qwen, "pending", None, None, reasons=[
        schemas.UnschedulableReason(worker="gpu-a01", reason="insufficient_vram", message="needs 12 GB on 2 GPUs, 1 free",
                                    need_bytes=12 * GB, free_bytes=61 * GB, gpu=3),
        schemas.UnschedulableReason(worker="gpu-a04", reason="not_ready", message="worker is not ready"),
        schemas.UnschedulableReason(worker="gpu-b01", reason="insufficient_vram", message="needs 12 GB per GPU, 9 free",
                                    need_bytes=12 * GB, free_bytes=9 * GB),
        schemas.UnschedulableReason(worker="cpu-01", reason="no_gpu", message="the model needs a GPU"),
    ], age_min=1)
    inst(6, "mistral-7b-9b31f0", mistral, "error", (5, "gpu-b01"), [0], 16.0, None, restarts=3,
         message="exited with code 1: CUDA error: out of memory (tried to allocate 2.1 GiB)", age_min=40)
    inst(7, "tiny-2c4e6a", tiny, "running", (6, "cpu-01"), None, port=40007, age_min=12)

    events = [
        (1, "workers", "gpu-a04", "NotReady", "no heartbeat for 45s", "server", 1),
        (2, "models", "llama-3.1-8b", "Created", "llama.cpp from /models/llama-3.1-8b-q4.gguf, 2 replicas", "admin", 300),
        (3, "instances", "llama-3.1-8b-3f9a1c", "Scheduled", "gpu-a01 GPU 0 (18.5 GB)", "scheduler", 290),
        (4, "instances", "llama-3.1-8b-3f9a1c", "Running", "port 40001", "gpu-a01", 289),
        (5, "models", "llama-3.1-8b", "SpecChanged", "generation 2", "admin", 280),
        (6, "models", "qwen2.5-7b", "Created", f"llama.cpp from {QWEN_SOURCE}, 2 replicas",
         "admin", 120),
        (7, "models", "qwen2.5-7b", "Scaled", "2 -> 3 replicas", "admin", 2),
        (14, "models", "qwen2.5-7b", "SpecChanged", "context_length 2048 -> 4096: generation 2", "admin", 1),
        (15, "workers", "gpu-b01", "Cordoned", "by admin", "admin", 5),
        (8, "instances", "qwen2.5-7b-5e7d21", "Unschedulable", "no worker has 12 GB free on 2 GPUs", "scheduler", 1),
        (9, "models", "mistral-7b", "Created", "llama.cpp from /models/mistral-7b-v0.3.gguf, 1 replicas", "admin", 40),
        (10, "instances", "mistral-7b-9b31f0", "Error", "exited with code 1: CUDA error: out of memory", "gpu-b01", 3),
        (11, "models", "tiny", "Created", "llama.cpp from /srv/models/tiny.gguf, 1 replicas", "ops", 12),
        (12, "instances", "tiny-2c4e6a", "Running", "port 40007", "cpu-01", 11),
        (13, "instances", "qwen2.5-7b-c0ffee", "Downloading", f"downloading {QWEN_SOURCE}", "gpu-a03", 1),
    ]
    events.sort(key=lambda e: -e[6])
    for eid, (_, kind, name, reason, message, actor, minutes) in enumerate(events, start=1):
        state.apply_event("events", "created", schemas.EventOut(
            id=eid, kind=kind, object_name=name, reason=reason, message=message, actor=actor,
            created_at=NOW - timedelta(minutes=minutes)).model_dump(mode="json"))

    state.keys = [
        schemas.ApiKeyOut(id=1, name="chat-frontend", prefix="maas_3kq9", created_at=NOW - timedelta(days=12),
                          last_used_at=NOW - timedelta(seconds=4)),
        schemas.ApiKeyOut(id=2, name="batch-eval", prefix="maas_x71m", created_at=NOW - timedelta(days=2),
                          expires_at=NOW + timedelta(days=28)),
    ]
    state.revision["keys"] += 1
    state.teams = demo_teams()
    state.revision["teams"] += 1
    state.usage = demo_usage()
    state.revision["usage"] += 1
    state.limits = demo_limits()
    state.revision["limits"] += 1
    state.audit = demo_audit()
    state.revision["audit"] += 1
    for row in demo_files():
        state.apply_event("files", "created", row.model_dump(mode="json"))
    state.version = 1000
    return state


GiB = 1024**3


def demo_usage() -> list[schemas.UsageRow]:
    """24 hours of gateway usage by hour, model and route (as GET /v2/usage?by=day,hour,model,route gives it):
    a daytime curve for llama, a steady batch on qwen, and a canary route `assistant` (llama 90, qwen 10)."""
    import math

    rows = []
    for back in range(24):
        moment = NOW - timedelta(hours=back)
        daytime = max(0.0, math.sin((moment.hour - 6) / 24 * 2 * math.pi))  # busiest mid-afternoon
        for model, route, requests, per_request in (
                ("llama-3.1-8b", "", int(40 + 360 * daytime), 420), ("llama-3.1-8b", "assistant", int(200 * daytime), 380),
                ("qwen2.5-7b", "", 120 + (back % 3) * 15, 900), ("qwen2.5-7b", "assistant", int(22 * daytime), 380),
                ("tiny", "", 6 if back % 4 == 0 else 0, 40)):
            if requests:
                rows.append(schemas.UsageRow(day=moment.date(), hour=moment.hour, model=model, route=route,
                                             requests=requests, prompt_tokens=requests * per_request * 2 // 3,
                                             completion_tokens=requests * per_request // 3))
    return rows


def demo_limits() -> list[Any]:
    """Limits with what they use now (GET /v2/limits): a key near its daily budget, a model near its rpm."""
    from server.schemas.limits import LimitsListed, LimitUsage

    return [LimitsListed(id=1, scope="key", api_key_id=2, subject="batch-eval", owner="mona", budget_day=2_000_000,
                         usage=LimitUsage(tokens_today=1_860_000)),
            LimitsListed(id=2, scope="model", model="qwen2.5-7b", subject="qwen2.5-7b", rpm=600,
                         usage=LimitUsage(requests=510)),
            LimitsListed(id=3, scope="team", team="research", subject="research", tpm=1_000_000,
                         usage=LimitUsage(tokens=120_000))]


def demo_teams() -> list[schemas.TeamOut]:
    """Three teams; usage as the demo instances would claim it (llama: default; qwen, mistral: research; tiny: apps)."""
    def team(tid: int, name: str, members: list[tuple[str, str]], quota: schemas.TeamQuota,
             usage: schemas.TeamUsage, days: int) -> schemas.TeamOut:
        return schemas.TeamOut(id=tid, name=name, quota=quota, usage=usage, created_at=NOW - timedelta(days=days),
                               members=[schemas.TeamMemberOut(username=u, role=r) for u, r in members])

    return [
        team(1, "default", [("admin", "member"), ("ops", "member")], schemas.TeamQuota(),
             schemas.TeamUsage(gpus=2, vram_bytes=37 * GB, ram_bytes=4 * GB, replicas=2), 30),
        team(2, "research", [("mona", "member"), ("li", "member"), ("sam", "viewer")],
             schemas.TeamQuota(gpus=6, vram_bytes=80 * GiB, ram_bytes=64 * GiB, replicas=3),
             schemas.TeamUsage(gpus=5, vram_bytes=64 * GB, ram_bytes=6 * GB, replicas=3), 12),
        team(3, "apps", [("ops", "member")], schemas.TeamQuota(gpus=0, ram_bytes=8 * GiB, replicas=2),
             schemas.TeamUsage(ram_bytes=int(1.2 * GB), replicas=1), 5),
    ]


def demo_alerts() -> list[AlertOut]:
    """Alerts as GET /v2/alerts gives them (newest first): what the demo cluster's troubles would raise. Not in
    the demo state itself: the Alerts view reads them, so the other screens' header stays as it was."""
    rows = [  # id, rule, severity, state, kind, object, team, message, minutes since it started, resolved after
        (6, "InstanceFailing", "critical", "firing", "models", "mistral-7b", "research",
         "1 instance(s) failing; mistral-7b-9b31f0 (error, 2 restarts): exited with code 1: CUDA error: out of memory",
         3, None),
        (5, "WorkerNotReady", "critical", "firing", "workers", "gpu-a04", None,
         "worker gpu-a04 is not ready: no heartbeat for 15 s", 9, None),
        (4, "LimitNearlyReached", "warning", "firing", "teams", "research", "research",
         "team research uses 5 of its 6 GPUs (83%)", 12, None),
        (3, "MemoryDrift", "warning", "firing", "instances", "qwen2.5-7b-5e7d21", "research",
         "uses 17.9 GB of its 12 GB claim; suggested --memory 20GiB", 25, None),
        (2, "GpuTemperature", "warning", "resolved", "gpus", "gpu-b01/gpu3", None,
         "GPU gpu-b01/gpu3 at 88 °C (threshold 85 °C)", 50, 35),
        (1, "RolloutStalled", "warning", "resolved", "models", "llama-3.1-8b", "default",
         "rollout to generation 3 made no progress for 600 s (1/2 ready, 1 outdated)", 130, 110),
    ]
    return [AlertOut(id=aid, rule=rule, severity=severity, state=state, object_kind=kind, object_name=name, team=team,
                     message=message, silenced=rule == "MemoryDrift", started_at=NOW - timedelta(minutes=started),
                     updated_at=NOW - timedelta(minutes=started if resolved is None else resolved),
                     resolved_at=None if resolved is None else NOW - timedelta(minutes=resolved))
            for aid, rule, severity, state, kind, name, team, message, started, resolved in rows]


def demo_audit() -> list[schemas.AuditEntryOut]:
    """Changes made through the API, newest first (as GET /v2/audit gives them)."""
    entries = [
        ("admin", "10.0.0.5", "PUT", "/v2/teams/research/quota", 200,
         '{"gpus":6,"vram_bytes":85899345920,"ram_bytes":68719476736,"replicas":3}', 1),
        ("mona", "10.0.4.21", "PATCH", "/v2/models/qwen2.5-7b", 200, '{"context_length":4096}', 1),
        ("mona", "10.0.4.21", "DELETE", "/v2/workers/gpu-a04", 403, "", 2),
        ("mona", "10.0.4.21", "PATCH", "/v2/models/qwen2.5-7b", 200, '{"replicas":3}', 2),
        ("admin", "10.0.0.5", "POST", "/v2/workers/gpu-b01/cordon", 200, "", 5),
        ("ops", "10.0.0.7", "POST", "/v2/models", 201,
         '{"name":"tiny","source":"/srv/models/tiny.gguf","backend":"llama.cpp","cpu_only":true,"team":"apps"}', 12),
        ("ops (login)", "10.0.0.7", "POST", "/v2/auth/login", 200, '{"username":"ops","password":"<redacted>"}', 13),
        ("mona", "10.0.4.21", "POST", "/v2/models", 201,
         '{"name":"mistral-7b","source":"/models/mistral-7b-v0.3.gguf","backend":"llama.cpp","args":["--threads","8"]}',
         40),
        ("mona", "10.0.4.21", "PUT", "/v2/teams/research/secrets/HF_TOKEN", 200, '{"value":"<redacted>"}', 119),
        ("admin", "10.0.0.5", "DELETE", "/v2/teams/research", 409, "", 122),
        ("admin", "10.0.0.5", "PUT", "/v2/teams/research/members/mona", 200, '{"role":"member"}', 125),
        ("mona (login)", "10.0.4.21", "POST", "/v2/auth/login", 401, '{"username":"mona","password":"<redacted>"}',
         126),
        ("admin", "10.0.0.5", "POST", "/v2/users", 201, '{"username":"mona","password":"<redacted>","role":"member"}',
         130),
    ]
    return [schemas.AuditEntryOut(id=len(entries) - n, actor=actor, address=address, method=method, path=path,
                                  status=status, summary=summary, at=NOW - timedelta(minutes=minutes, seconds=7))
            for n, (actor, address, method, path, status, summary, minutes) in enumerate(entries)]


def demo_log_lines(count: int) -> list[str]:
    head = [
        "llama.cpp build 4521 (cpu) · model /models/qwen2.5-7b-instruct-q5.gguf",
        "llama_model_loader: loaded meta data with 26 key-value pairs and 339 tensors",
        "llm_load_tensors: offloading 28 repeating layers to GPU",
        "llm_load_tensors: CUDA0 buffer size = 5123.42 MiB",
        "llama_new_context_with_model: n_ctx = 2048, n_batch = 512",
        "llama.cpp server listening on http://10.0.0.13:40004",
    ]
    lines = head[:count]
    for n in range(len(lines), count):
        slot = n % 4
        tokens = 16 + (n * 37) % 240
        lines.append(f"slot {slot} | task {n} | prompt eval {tokens} tokens, {tokens * 3.1:.1f} t/s · "
                     f"eval {n % 64 + 1} tokens · POST /v1/chat/completions 200")
    return lines


class DemoClient:
    """Answers the TUI's client calls from a `ClusterState` in memory. SIMULATED data only."""

    def __init__(self, state: ClusterState, server: str = "demo://simulated", live: bool = False,
                 log_lines: int = 400, interval: float = 1.0) -> None:
        self.server = server
        self.state = state
        self.live = live
        self.log_lines = log_lines
        self.interval = interval
        self._next_id = 1000

    async def close(self) -> None:
        pass

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "simulated": True}

    async def watch(self, kinds: list[str], since: int | None = None) -> AsyncIterator[schemas.WatchMessage]:
        version = self.state.version or 1
        yield schemas.WatchMessage(type="heartbeat", version=version)
        t = 0.0
        layout = {w.id: w for w in self.state.workers.values()}
        while True:
            await asyncio.sleep(self.interval if self.live else 3600)
            t += 1
            for wid, worker in sorted(layout.items()):
                if worker.state != "ready":
                    continue
                updated = make_worker(wid, worker.name, [(g.name.replace(" (simulated)", ""),
                                                          g.memory_total // GB) for g in worker.gpus], t,
                                      cpu_count=worker.host.cpu_count, ram_gb=worker.host.memory_total // GB)
                version += 1
                yield schemas.WatchMessage(type="event", version=version, kind="workers", action="updated",
                                           object=updated.model_dump(mode="json"))

    async def stream_logs(self, ref: str, tail: int = 200, follow: bool = False,
                          previous: bool = False) -> AsyncIterator[bytes]:
        if self.state.instance_by_name(ref) is None:
            raise ApiClientError(404, "not_found", f"instance {ref!r} not found")
        lines = demo_log_lines(self.log_lines)
        if tail >= 0:
            lines = lines[-tail:] if tail else []
        data = ("\n".join(lines) + "\n").encode()
        for start in range(0, len(data), 1 << 20):
            yield data[start: start + (1 << 20)]
        if follow:
            await asyncio.sleep(3600)

    if hasattr(schemas, "ModelEvaluation"):  # the dry run (POST /v2/models/evaluate) is in this build
        async def evaluate_model(self, body: dict[str, Any]) -> Any:
            """A SIMULATED dry run: first fit of 12 GB per replica on the GPUs with the least claimed."""
            create = schemas.ModelCreate.model_validate(body)
            need = 12 * GB
            free: list[tuple[int, str, int]] = []
            for worker in self.state.sorted_workers():
                if worker.state != "ready" or create.cpu_only:
                    continue
                for gpu in worker.gpus:
                    free.append((gpu.memory_total - self.state.claimed_bytes(worker.id, gpu.index), worker.name, gpu.index))
            free.sort(key=lambda f: -f[0])
            replicas = []
            for n in range(create.replicas):
                if n < len(free) and free[n][0] >= need:
                    claim = schemas.ResourceClaim(device="gpu", gpu_indexes=[free[n][2]], vram_bytes_per_gpu=need)
                    replicas.append(schemas.ReplicaPlacement(replica=n, scheduled=True, worker=free[n][1], claim=claim))
                else:
                    replicas.append(schemas.ReplicaPlacement(replica=n, scheduled=False, reasons=[
                        schemas.UnschedulableReason(reason="insufficient_vram", message="no GPU has 12 GB free")]))
            fit = sum(1 for r in replicas if r.scheduled)
            return schemas.ModelEvaluation(name=create.name, replicas=replicas, schedulable=fit,
                                           message=f"{fit} of {create.replicas} replicas fit now (simulated)")

    async def list_keys(self) -> list[schemas.ApiKeyOut]:
        return list(self.state.keys)

    async def create_key(self, name: str, expires_in_days: int | None = None) -> schemas.ApiKeyCreated:
        if any(k.name == name for k in self.state.keys):
            raise ApiClientError(409, "conflict", f"key {name!r} already exists")
        self._next_id += 1
        created = schemas.ApiKeyCreated(id=self._next_id, name=name, prefix="maas_demo", created_at=NOW,
                                        key="maas_demo_SIMULATED_not_a_real_secret_0123456789")
        self.state.keys.append(schemas.ApiKeyOut.model_validate(created.model_dump(exclude={"key"})))
        return created

    async def delete_key(self, name: str) -> None:
        self.state.keys = [k for k in self.state.keys if k.name != name]

    async def list_teams(self) -> list[schemas.TeamOut]:
        return list(self.state.teams)

    async def usage(self, by: str = "day,key,model", since: str | None = None,
                    until: str | None = None) -> list[schemas.UsageRow]:
        return list(self.state.usage)  # the Usage view asks for its own grouping: the demo holds just that

    async def list_limits(self, scope: str | None = None) -> list[Any]:
        return [row for row in self.state.limits if scope is None or row.scope == scope]

    async def list_alerts(self, state: str = "all", limit: int = 200) -> list[AlertOut]:
        return [a for a in demo_alerts() if state in ("all", a.state)][:limit]

    async def audit(self, limit: int = 100, actor: str | None = None,
                    since: str | None = None) -> list[schemas.AuditEntryOut]:
        return [e for e in self.state.audit if actor is None or e.actor == actor][:limit]

    async def create_model(self, body: dict[str, Any]) -> schemas.ModelOut:
        create = schemas.ModelCreate.model_validate(body)
        if self.state.model_by_name(create.name):
            raise ApiClientError(409, "conflict", f"model {create.name!r} already exists")
        self._next_id += 1
        model = schemas.ModelOut(id=self._next_id, name=create.name, spec=schemas.ModelSpec.model_validate(
            create.model_dump(exclude={"name", "replicas"})), replicas=create.replicas, generation=1, state="active",
            created_at=NOW, updated_at=NOW)
        self.state.apply_event("models", "created", model.model_dump(mode="json"))
        return model

    async def update_model(self, name: str, changes: dict[str, Any]) -> schemas.ModelOut:
        model = self.state.model_by_name(name)
        if model is None:
            raise ApiClientError(404, "not_found", f"model {name!r} not found")
        update = schemas.ModelUpdate.model_validate(changes).model_dump(exclude_none=True)
        top = {k: update.pop(k) for k in ("replicas", "max_surge", "max_unavailable") if k in update}
        spec = model.spec.model_copy(update=update)
        if spec != model.spec:
            top.update(spec=spec, generation=model.generation + 1)
        updated = model.model_copy(update=top)
        self.state.apply_event("models", "updated", updated.model_dump(mode="json"))
        return updated

    async def delete_model(self, name: str) -> schemas.ModelOut:
        model = self.state.model_by_name(name)
        if model is None:
            raise ApiClientError(404, "not_found", f"model {name!r} not found")
        self.state.apply_event("models", "deleted", model.model_dump(mode="json"))
        return model

    async def delete_instance(self, ref: str) -> schemas.InstanceOut:
        inst = self.state.instance_by_name(ref)
        if inst is None:
            raise ApiClientError(404, "not_found", f"instance {ref!r} not found")
        self.state.apply_event("instances", "deleted", inst.model_dump(mode="json"))
        return inst

    def _model(self, name: str) -> schemas.ModelOut:
        model = self.state.model_by_name(name)
        if model is None:
            raise ApiClientError(404, "not_found", f"model {name!r} not found")
        return model

    async def rollout_action(self, name: str, action: str, to_revision: int | None = None) -> schemas.ModelOut:
        model = self._model(name)
        update: dict[str, Any] = {"paused": action == "pause"} if action in ("pause", "resume") else {
            "generation": model.generation + 1, "paused": False}
        updated = model.model_copy(update=update)
        self.state.apply_event("models", "updated", updated.model_dump(mode="json"))
        return updated

    async def model_history(self, name: str) -> list[schemas.ModelRevisionOut]:
        model = self._model(name)
        revisions = [schemas.ModelRevisionOut(revision=1, spec=model.spec.model_copy(update={"context_length": 2048}),
                                              change="created", created_at=model.created_at)]
        for n in range(2, model.generation + 1):
            revisions.append(schemas.ModelRevisionOut(revision=n, spec=model.spec, change="context_length 2048 -> "
                                                      f"{model.spec.context_length}", created_at=NOW - timedelta(
                                                          minutes=2)))
        return revisions

    async def worker_action(self, name: str, action: str) -> schemas.WorkerOut:
        worker = self.state.worker_by_name(name)
        if worker is None:
            raise ApiClientError(404, "not_found", f"worker {name!r} not found")
        updated = worker.model_copy(update={"cordoned": action != "uncordon", "draining": action == "drain"})
        self.state.apply_event("workers", "updated", updated.model_dump(mode="json"))
        return updated

    async def restart_instance(self, ref: str) -> schemas.InstanceOut:
        inst = self.state.instance_by_name(ref)
        if inst is None:
            raise ApiClientError(404, "not_found", f"instance {ref!r} not found")
        updated = inst.model_copy(update={"restart_count": inst.restart_count + 1, "state": "starting",
                                           "download_progress": None})
        self.state.apply_event("instances", "updated", updated.model_dump(mode="json"))
        return updated

    async def delete_worker(self, name: str) -> None:
        worker = self.state.worker_by_name(name)
        if worker is not None:
            self.state.apply_event("workers", "deleted", worker.model_dump(mode="json"))

    async def telemetry(self, worker: str | None = None, instance: str | None = None, model: str | None = None,
                        since: str | None = None) -> Any:
        """A SIMULATED hour of history (GET /v2/telemetry's shape), deterministic like the rest of the demo."""
        return demo_telemetry(self.state, worker, instance, model)


def demo_app(live: bool = False, **kwargs: Any):
    from maas_tui.tui.app import MaasApp

    state = demo_state()
    return MaasApp(DemoClient(state, live=live), state=state, clock=fixed_clock, **kwargs)


if __name__ == "__main__":  # pragma: no cover - interactive
    import sys

    demo_app(live="--static" not in sys.argv).run()


def demo_files() -> list[schemas.ModelFileOut]:
    """Model files in the SIMULATED workers' caches: ready, pulling, failed, being removed."""
    qwen = schemas.file_key(QWEN_SOURCE)
    commit = "9f1c2e7d4b5a69c0e3f1d2b8a7c6e5f4d3c2b1a0"

    def row(fid: int, source: str, worker: tuple[int, str], state: str, size: float = 0, used_min: int | None = None,
            progress: float | None = None, message: str = "", path: str = "", revision: str | None = None):
        return schemas.ModelFileOut(id=fid, worker_id=worker[0], worker_name=worker[1], source=source,
                                    revision=revision, path=path, size_bytes=int(size * GB), state=state,
                                    progress=progress, message=message,
                                    last_used_at=NOW - timedelta(minutes=used_min) if used_min is not None else None,
                                    created_at=NOW - timedelta(hours=3), updated_at=NOW)

    cached = f"/var/lib/maas/models/huggingface/hub/models--Qwen--Qwen2.5-7B-Instruct-GGUF/snapshots/{commit}"
    return [
        row(1, qwen, (1, "gpu-a01"), "ready", 5.4, 110, path=f"{cached}/qwen2.5-7b-instruct-q5_k_m.gguf",
            revision=commit),
        row(2, qwen, (3, "gpu-a03"), "pulling", progress=0.42, message="downloading into /var/lib/maas/models"),
        row(3, "/models/llama-3.1-8b-q4.gguf", (1, "gpu-a01"), "ready", 4.9, 290, path="/models/llama-3.1-8b-q4.gguf"),
        row(4, "/models/llama-3.1-8b-q4.gguf", (2, "gpu-a02"), "ready", 4.9, 288, path="/models/llama-3.1-8b-q4.gguf"),
        row(5, "hf://meta-llama/Llama-3.1-70B-Instruct@main", (2, "gpu-a02"), "error",
            message="Hugging Face repository meta-llama/Llama-3.1-70B-Instruct was not found at https://huggingface.co, "
                    "or it is private or gated and needs a token (HF_TOKEN in the agent's environment)"),
        row(6, "hf://mistralai/Mistral-7B-v0.3@main", (5, "gpu-b01"), "removing", 14.5, 1440,
            message="waiting for the worker's agent to delete the files"),
    ]


def demo_telemetry(state: ClusterState, worker: str | None = None, instance: str | None = None,
                   model: str | None = None, points: int = 180) -> Any:
    """GPU and instance history for the demo cluster: `points` buckets of 5 s ending at NOW (SIMULATED)."""
    from server.schemas.telemetry import GPUHistory, InstanceHistory, InstanceMemory, TelemetryHistory

    end = NOW.timestamp()
    t = [end - 5 * (points - 1 - i) for i in range(points)]
    out = TelemetryHistory(server="demo://simulated", step_seconds=5)
    if instance is None and model is None:
        for w in state.sorted_workers():
            if worker is not None and w.name != worker:
                continue
            for g in w.gpus:
                util = [utilisation(w.id, g.index, i / 3) for i in range(points)]
                out.gpus.append(GPUHistory(
                    worker_id=w.id, worker=w.name, gpu=g.index, t=t, utilization=util,
                    memory_used=[g.memory_total * min(0.95, u / 110 + 0.05) for u in util],
                    power_watts=[None] * points, temperature=[round(35 + u * 0.45) for u in util]))
    for inst in sorted(state.instances.values(), key=lambda i: i.name):
        if inst.state != "running" or (instance is not None and inst.name != instance)                 or (model is not None and inst.model_name != model) or (worker is not None and inst.worker_name != worker):
            continue
        rate = [max(0.0, 2 + 1.5 * math.sin(i / 9 + inst.id)) for i in range(points)]
        claimed = (inst.claim.vram_bytes_per_gpu * max(1, len(inst.claim.gpu_indexes)) or inst.claim.ram_bytes)             if inst.claim else 0
        used = int(claimed * (0.42 if inst.id % 2 else 0.81))
        memory = InstanceMemory(device=inst.claim.device if inst.claim else "cpu", claimed_bytes=claimed,
                                used_bytes=used, ratio=used / claimed if claimed else None, reported_at=end,
                                drift="under" if inst.id % 2 and claimed else None,
                                suggested_memory=f"{max(64, int(used * 1.2 / 2**20) // 64 * 64 + 64)}MiB"
                                if inst.id % 2 and claimed else None)
        out.instances.append(InstanceHistory(
            instance_id=inst.id, instance=inst.name, model=inst.model_name, t=t, requests_per_s=rate,
            tokens_per_s=[r * 38 for r in rate], latency_s=[0.35 + 0.1 * math.sin(i / 5) for i in range(points)],
            memory_used=[used] * points, memory=memory))
    return out
