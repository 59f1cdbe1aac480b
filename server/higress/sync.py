"""Keeping Higress in step with the routing table, through one or both appliers chosen by
config: the file layout of Higress standalone (`<root>/<plural>/<name>.yaml`, each written
atomically) and the Kubernetes API (server/higress/kube.py). Objects of deleted models are
removed. A failing applier is reported (log, /metrics, GET /v2/gateway/higress) and retried;
it never stops the server or the other applier."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select

from server import schemas
from server.reconcile import ReconcileLoop
from server.db import tables
from server.higress.kube import KubeApplier, KubeError
from server.higress.objects import LABELS, PLURALS, Endpoint, build_objects

log = logging.getLogger(__name__)


async def current_objects(server: Any) -> list[dict[str, Any]]:
    """The objects for what runs now, read from the database (the source of truth)."""
    async with server.db.session() as s:
        models = (await s.execute(select(tables.Model.name).where(
            tables.Model.state == schemas.ModelState.active))).scalars().all()
        running = (await s.execute(select(tables.ModelInstance).where(
            tables.ModelInstance.state == schemas.InstanceState.running))).scalars().all()
    table: dict[str, list[Endpoint]] = {name: [] for name in models}
    for instance in running:
        if instance.model_name in table and instance.address and instance.port:
            table[instance.model_name].append(Endpoint(instance.address, instance.port))
    host, port = server.advertised_endpoint()
    return build_objects(table, Endpoint(host, port))


def write_atomically(path: Path, text: str) -> bool:
    """Write when the content changed; True if it did."""
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(temp, path)
    return True


def _ours(path: Path) -> bool:
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    labels = (document or {}).get("metadata", {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in LABELS.items())


def apply_to_directory(root: Path, objects: list[dict[str, Any]]) -> tuple[int, int]:
    """Make `root` hold exactly these objects among those MaaS manages. (written, removed)."""
    wanted: set[Path] = set()
    written = 0
    for obj in objects:
        path = root / PLURALS[obj["kind"]] / f"{obj['metadata']['name']}.yaml"
        wanted.add(path)
        written += write_atomically(path, yaml.safe_dump(obj, sort_keys=False))
    removed = 0
    for plural in PLURALS.values():
        for path in (root / plural).glob("*.yaml"):
            if path not in wanted and _ours(path):
                path.unlink()
                removed += 1
    return written, removed


class DirectoryApplier:
    def __init__(self, root: Path):
        self.root = root
        self.conflicts = 0
        self.description = f"directory ({root})"

    async def apply(self, objects: list[dict[str, Any]]) -> tuple[int, int]:
        return await asyncio.to_thread(apply_to_directory, self.root, objects)


@dataclass
class SyncStatus:
    applier: str  # "kubernetes" or "directory"
    target: str
    ok: bool | None = None  # None until the first attempt
    error: str = ""
    failures: int = 0  # failed attempts since start
    conflicts: int = 0  # 409 Conflicts met and retried (Kubernetes only)
    last_success: float | None = None  # epoch seconds

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class HigressSync(ReconcileLoop):
    name = "higress-sync"
    kinds = ("models", "instances")

    def __init__(self, server: Any, interval: float, root: Path | None = None, kubeconfig: str | None = None,
                 kube_context: str | None = None):
        super().__init__(server, interval)
        self.appliers: list[Any] = []
        if root is not None:
            self.appliers.append(DirectoryApplier(Path(root)))
        if kubeconfig:
            self.appliers.append(KubeApplier(kubeconfig, kube_context))
        self.status = [SyncStatus("kubernetes" if isinstance(a, KubeApplier) else "directory", a.description)
                       for a in self.appliers]
        server.higress_status = self.status  # read by /metrics and GET /v2/gateway/higress

    async def reconcile(self) -> None:
        objects = await current_objects(self.server)
        retry_soon = False
        for applier, status in zip(self.appliers, self.status):
            try:
                written, removed = await applier.apply(objects)
            except (KubeError, OSError) as exc:
                status.failures += 1
                if status.ok is not False or status.error != str(exc):  # log changes, not every retry
                    log.warning("higress: cannot apply to %s: %s (retrying)", status.target, exc)
                status.ok, status.error = False, str(exc)
                retry_soon = True
                continue
            finally:
                status.conflicts = applier.conflicts
            if status.ok is False:
                log.info("higress: %s is in sync again", status.target)
            status.ok, status.error, status.last_success = True, "", time.time()
            if written or removed:
                log.info("higress: %d objects written, %d removed in %s", written, removed, status.target)
        # An unreachable API server is retried sooner than the full resync interval.
        self.next_wake = min(2.0, self.interval) if retry_soon else None
