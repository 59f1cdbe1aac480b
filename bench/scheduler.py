"""Scheduler throughput and packing at scale, on the embedded PostgreSQL.

1,000 simulated workers x 8 GPUs (a third each of H100-80GB, A100-40GB, L4-24GB) and
10,000 pending instances of mixed models (vLLM specs from tests/fixtures/models: an
embedding model, 7-8B models at several context lengths, fp8, AWQ 70B, Mixtral, 70B in
bf16; plus fixed-size claims from 1 to 60 GiB). Workers, models and pending instances
are inserted directly; then the real scheduler loads its snapshot and runs its pass:
estimates, placement and the batched writes (claims, state, one event per instance).

Placements per second count that whole pass, DB writes included (the snapshot load is
timed apart). For binpack the GPUs used are compared with the lower bound: per GPU type,
ceil(sum of the claims placed on that type / GPU size). Run it once per strategy on the
same rows; the last line is

    RESULT placements_per_s=<slower strategy> binpack_overhead_pct=<n>

    .venv/bin/python bench/scheduler.py [--workers 1000] [--instances 10000] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import delete, insert, select  # noqa: E402

from server import schemas  # noqa: E402
from server.bus import EventBus  # noqa: E402
from server.db import tables  # noqa: E402
from server.db.database import Database  # noqa: E402
from server.db.embedded import EmbeddedPostgres  # noqa: E402
from server.scheduler.service import Scheduler  # noqa: E402

GB = 1000**3
GiB = 1024**3
FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "models"
GPU_KINDS = [("H100", 80), ("A100", 40), ("L4", 24)]


def model_mix() -> list[tuple[str, dict, int]]:
    """(name, spec fields, weight): what the 10,000 instances are made of."""
    f = {name: str(FIXTURES / name) for name in (
        "bge-m3", "llama-3.1-8b-instruct", "llama-3.1-8b-instruct-fp8", "qwen2.5-7b-instruct",
        "mixtral-8x7b-instruct-v0.1", "llama-3.1-70b-instruct", "llama-3.1-70b-instruct-awq-int4")}
    mix = [
        ("bge-m3", {"source": f["bge-m3"]}, 10),
        ("llama-8b-8k", {"source": f["llama-3.1-8b-instruct"], "max_model_len": 8192}, 10),
        ("llama-8b-32k", {"source": f["llama-3.1-8b-instruct"], "max_model_len": 32768}, 6),
        ("llama-8b-128k", {"source": f["llama-3.1-8b-instruct"]}, 3),
        ("llama-8b-fp8-8k", {"source": f["llama-3.1-8b-instruct-fp8"], "max_model_len": 8192}, 8),
        ("llama-8b-fp8-32k", {"source": f["llama-3.1-8b-instruct-fp8"], "max_model_len": 32768}, 4),
        ("qwen-7b-8k", {"source": f["qwen2.5-7b-instruct"], "max_model_len": 8192}, 6),
        ("qwen-7b-32k", {"source": f["qwen2.5-7b-instruct"]}, 6),
        ("mixtral-8k", {"source": f["mixtral-8x7b-instruct-v0.1"], "max_model_len": 8192}, 1),
        ("llama-70b-8k", {"source": f["llama-3.1-70b-instruct"], "max_model_len": 8192}, 1),
        ("llama-70b-awq-8k", {"source": f["llama-3.1-70b-instruct-awq-int4"], "max_model_len": 8192}, 2),
    ]
    for gib in (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 30, 40, 60):
        mix.append((f"fixed-{gib}g", {"source": f"org/fixed-{gib}g", "memory_bytes": gib * GiB}, 3 if gib <= 20 else 1))
    return mix


async def insert_cluster(db: Database, workers: int, instances: int, seed: int, strategy: str) -> dict[int, str]:
    """Workers (once), and for this run its models and pending instances. Returns worker id -> GPU kind."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    async with db.session() as s:
        await s.execute(delete(tables.ModelInstance))
        await s.execute(delete(tables.Event))
        await s.execute(delete(tables.Model))
        existing = (await s.execute(select(tables.Worker.id, tables.Worker.gpus))).all()
        if not existing:
            rows = []
            for n in range(workers):
                kind, size = GPU_KINDS[n % len(GPU_KINDS)]
                gpus = [schemas.GPUDevice(index=i, name=f"{kind}-{size}GB (simulated)", vendor="simulated",
                                          memory_total=size * GB, simulated=True).model_dump(mode="json") for i in range(8)]
                rows.append({"name": f"worker-{n:04d}", "address": f"10.{n // 250}.{n % 250}.1", "agent_port": 10000,
                             "labels": {"gpu": kind.lower()}, "state": "ready", "cordoned": False, "gpus": gpus,
                             "host": {"memory_total": 1024 * GiB, "cpu_count": 128}, "token_hash": "", "agent_secret": "",
                             "last_heartbeat_at": now, "created_at": now, "updated_at": now, "state_message": ""})
            await s.execute(insert(tables.Worker), rows)
        mix = model_mix()
        model_ids = {}
        for name, fields, _ in mix:
            spec = schemas.ModelSpec(backend="vllm", placement_strategy=strategy, **fields).model_dump(mode="json")
            model = tables.Model(name=name, spec=spec, replicas=0, generation=1)
            s.add(model)
            await s.flush()
            model_ids[name] = (model.id, spec)
        names = rng.choices([m[0] for m in mix], weights=[m[2] for m in mix], k=instances)
        rows = [{"name": f"{name}-{n:05d}", "model_id": model_ids[name][0], "model_name": name, "generation": 1,
                 "spec": model_ids[name][1], "state": "pending", "state_message": "", "schedule_reasons": [],
                 "restart_count": 0, "created_at": now, "updated_at": now} for n, name in enumerate(names)]
        for start in range(0, len(rows), 2000):
            await s.execute(insert(tables.ModelInstance), rows[start:start + 2000])
        await s.commit()
        kinds = {wid: gpus[0]["name"].split("-")[0] for wid, gpus in (await s.execute(
            select(tables.Worker.id, tables.Worker.gpus))).all()}
    return kinds


async def measure(db: Database, bus: EventBus, kinds: dict[int, str]) -> dict:
    scheduler = Scheduler(SimpleNamespace(db=db, bus=bus, config=None), interval=10.0)
    t0 = time.perf_counter()
    await scheduler.resync()
    t1 = time.perf_counter()
    await scheduler.reconcile()
    t2 = time.perf_counter()
    async with db.session() as s:
        rows = (await s.execute(select(tables.ModelInstance.state, tables.ModelInstance.worker_id,
                                       tables.ModelInstance.claim, tables.ModelInstance.model_name))).all()
        events = (await s.execute(select(tables.Event.reason))).scalars().all()
    used: dict[tuple[int, int], int] = defaultdict(int)
    replicas: dict[tuple[str, int], int] = Counter()
    placed = 0
    multi = Counter()
    for state, worker_id, claim, model in rows:
        if state != "scheduled":
            continue
        placed += 1
        c = schemas.ResourceClaim.model_validate(claim)
        multi[(c.tensor_parallel_size, c.pipeline_parallel_size)] += 1
        for i in c.gpu_indexes:
            used[(worker_id, i)] += c.vram_bytes_per_gpu
        for sub in c.subordinate_workers:
            for i in sub.gpu_indexes:
                used[(sub.worker_id, i)] += sub.vram_bytes_per_gpu
        replicas[(model, worker_id)] += 1
    sizes = dict((k, v * GB) for k, v in GPU_KINDS)
    overcommitted = sum(1 for (w, _), b in used.items() if b > sizes[kinds[w]])
    per_kind_claims: dict[str, int] = defaultdict(int)
    per_kind_used: dict[str, int] = Counter()
    for (w, _), b in used.items():
        per_kind_claims[kinds[w]] += b
        per_kind_used[kinds[w]] += 1
    bound = {k: math.ceil(per_kind_claims[k] / sizes[k]) for k in per_kind_claims}
    total_claims = sum(per_kind_claims.values())
    used_capacity = sum(sizes[kinds[w]] for (w, _) in used)
    # The strictest bound: the fewest GPUs of the fleet (largest first) whose memory covers every claim.
    fleet = sorted((sizes[kinds[w]] for w in kinds for _ in range(8)), reverse=True)
    covered, fleet_bound = 0, 0
    while covered < total_claims:
        covered += fleet[fleet_bound]
        fleet_bound += 1
    return {
        "instances": len(rows), "placed": placed, "pending": sum(1 for r in rows if r[0] == "pending"),
        "load_s": t1 - t0, "pass_s": t2 - t1, "per_s": placed / (t2 - t1) if t2 > t1 else 0.0,
        "per_s_with_load": placed / (t2 - t0) if t2 > t0 else 0.0,
        "events": Counter(events), "overcommitted": overcommitted, "gpus_used": len(used),
        "per_kind_used": dict(per_kind_used), "bound": bound, "claims_gib": total_claims / GiB,
        "overhead_pct": 100.0 * (len(used) / max(1, sum(bound.values())) - 1),
        "capacity_overhead_pct": 100.0 * (used_capacity / max(1, total_claims) - 1),
        "fleet_bound": fleet_bound, "multi": dict(multi),
        "max_same_model_per_worker": max(replicas.values()) if replicas else 0,
        "workers_per_model": len(replicas) / max(1, len({m for m, _ in replicas})),
        "stats": dict(scheduler.stats),
    }


async def run(args: argparse.Namespace) -> None:
    base = Path(tempfile.mkdtemp(prefix="maas-bench-", dir="/tmp"))
    os.chmod(base, 0o711)
    pg = EmbeddedPostgres(base / "data")
    try:
        print(f"starting the embedded PostgreSQL in {base} ...", file=sys.stderr)
        url = await asyncio.to_thread(pg.start)
        bus = EventBus()
        db = Database(url)
        await db.migrate()
        capacity = args.workers * 8 * sum(size for _, size in GPU_KINDS) * GB / len(GPU_KINDS)
        results = {}
        for strategy in ("binpack", "spread"):
            print(f"{strategy}: inserting {args.workers} workers and {args.instances} pending instances ...",
                  file=sys.stderr)
            kinds = await insert_cluster(db, args.workers, args.instances, args.seed, strategy)
            print(f"{strategy}: scheduling ...", file=sys.stderr)
            results[strategy] = await measure(db, bus, kinds)
        await db.dispose()
    finally:
        await asyncio.to_thread(pg.stop)
        shutil.rmtree(base, ignore_errors=True)

    b, s = results["binpack"], results["spread"]
    print(f"\ncluster: {args.workers} workers x 8 GPUs ({', '.join(f'{k}-{v}GB' for k, v in GPU_KINDS)}), "
          f"{capacity / GiB:,.0f} GiB of GPU memory; {args.instances} pending instances "
          f"({b['claims_gib']:,.0f} GiB claimed once placed, {100 * b['claims_gib'] * GiB / capacity:.0f}% of it)")
    print(f"multi-GPU placements (tp, pp): { {k: v for k, v in sorted(b['multi'].items()) if k != (1, 1)} }\n")
    rows = [
        ("placed / instances", lambda r: f"{r['placed']} / {r['instances']}"),
        ("snapshot load (s)", lambda r: f"{r['load_s']:.2f}"),
        ("scheduling pass incl. DB writes (s)", lambda r: f"{r['pass_s']:.2f}"),
        ("  of which estimates / placement / DB writes (s)",
         lambda r: f"{r['stats']['estimate_s']:.2f} / {r['stats']['plan_s']:.2f} / {r['stats']['write_s']:.2f}"),
        ("placements/s (pass, DB writes incl.)", lambda r: f"{r['per_s']:,.0f}"),
        ("placements/s incl. snapshot load", lambda r: f"{r['per_s_with_load']:,.0f}"),
        ("GPUs over-committed", lambda r: str(r["overcommitted"])),
        ("GPUs used", lambda r: f"{r['gpus_used']} ({', '.join(f'{k} {v}' for k, v in sorted(r['per_kind_used'].items()))})"),
        ("lower bound per type", lambda r: f"{sum(r['bound'].values())} ({', '.join(f'{k} {v}' for k, v in sorted(r['bound'].items()))})"),
        ("GPUs used over the bound", lambda r: f"{r['overhead_pct']:+.1f}%"),
        ("memory of used GPUs over claims", lambda r: f"{r['capacity_overhead_pct']:+.1f}%"),
        ("fleet bound (largest GPUs first)", lambda r: str(r["fleet_bound"])),
        ("most replicas of a model on a worker", lambda r: str(r["max_same_model_per_worker"])),
        ("workers per model (mean)", lambda r: f"{r['workers_per_model']:.0f}"),
        ("Scheduled events written", lambda r: str(r["events"].get("Scheduled", 0))),
    ]
    width = max(len(label) for label, _ in rows)
    print(f"{'':{width}}  {'binpack':>24}  {'spread':>24}")
    for label, get in rows:
        print(f"{label:{width}}  {get(b):>24}  {get(s):>24}")
    slower = min(b["per_s"], s["per_s"])
    print(f"\nRESULT placements_per_s={slower:.0f} binpack_overhead_pct={b['overhead_pct']:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
