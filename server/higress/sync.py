"""Keeping Higress in step with the routing table, in the file layout of Higress standalone:
`<root>/<plural>/<name>.yaml`, each written atomically; objects of deleted models removed."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select

from server import schemas
from server.controllers.loop import ReconcileLoop
from server.db import tables
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


class HigressSync(ReconcileLoop):
    name = "higress-sync"
    kinds = ("models", "instances")

    def __init__(self, server: Any, interval: float, root: Path):
        super().__init__(server, interval)
        self.root = root

    async def reconcile(self) -> None:
        objects = await current_objects(self.server)
        written, removed = await asyncio.to_thread(apply_to_directory, self.root, objects)
        if written or removed:
            log.info("higress: %d objects written, %d removed in %s", written, removed, self.root)
