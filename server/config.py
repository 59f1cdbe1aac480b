"""Server configuration: flags, then MAAS_* environment variables, then defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs


def default_data_dir() -> Path:
    # PostgreSQL runs as an unprivileged user when we are root, and it cannot traverse
    # /root; a system-wide folder is also what a root-run service is expected to use.
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/maas")
    return Path(platformdirs.user_data_dir("maas"))


DEFAULT_PRIORITY_CLASSES = "critical,high,normal,low"


def priority_ranks(classes: str) -> dict[str, int]:
    """Priority class name -> rank, from a comma-separated list, highest first (higher preempts lower)."""
    names = [n.strip() for n in classes.split(",") if n.strip()]
    return {name: len(names) - i for i, name in enumerate(names)}


@dataclass
class ServerConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    database_url: str | None = None
    worker_timeout: float = 15.0  # seconds without heartbeat before a worker is not_ready
    # Seconds an instance stays unreachable before it is replaced elsewhere. With the worker
    # timeout this puts a replacement in service within about 30 s of a worker's loss.
    reschedule_after: float = 10.0
    # ...unless the gateway's probes find its backend still answering (a dead agent, a live backend):
    # then it keeps serving, and a restarted agent adopts it; replaced only after this long.
    replace_serving_after: float = 600.0
    restart_backoff: float = 10.0  # first restart delay after an error; doubles each time
    restart_backoff_max: float = 300.0
    max_restarts: int = 5  # then the instance is replaced by a new one (placed afresh)
    resync_interval: float = 10.0  # full reconcile even when no event arrived
    watch_heartbeat: float = 10.0
    gateway_timeout: float = 600.0  # seconds for one /v1 request, streams included
    gateway_max_body_mb: int = 64  # largest /v1 JSON request body
    gateway_max_upload_mb: int = 64  # largest /v1 upload (multipart: audio transcriptions)
    higress_dir: str | None = None  # write Higress objects here (the file layout of Higress standalone)
    higress_kubeconfig: str | None = None  # apply Higress objects through this cluster's Kubernetes API
    higress_kube_context: str | None = None  # that kubeconfig's context (default: its current-context)
    advertise_url: str | None = None  # how Higress and remote agents reach this server
    # Folders local model sources may lie in, besides <data-dir>/models (os.pathsep-separated; the
    # agents check their own roots again): a model spec cannot name /etc/shadow.
    model_roots: str = field(default_factory=lambda: os.environ.get("MAAS_MODEL_ROOTS", ""))
    audit_retention_days: int = 90  # audit log entries older than this are deleted
    # The cluster token for a server joining a database another server set up: the database holds only
    # its hash, so this server can hand the token out (banner, local agent) only when given it here or in
    # <data-dir>/token. From MAAS_CLUSTER_TOKEN, never a flag (a command line is readable by every user).
    cluster_token: str | None = field(default=None, repr=False)
    # Autoscaling, scale to zero and priorities (server/controllers/autoscale.py, server/gateway/cold_start.py,
    # server/scheduler/preemption.py).
    priority_classes: str = DEFAULT_PRIORITY_CLASSES  # comma-separated, highest first
    preempt_below_min_replicas: int = 0  # 1: preemption may take a model below its min_replicas
    autoscale_interval: float = 1.0  # seconds between the autoscaler's decisions (and load reports)
    max_held_requests: int = 64  # per model and server: requests held during a cold start; beyond, 503 at once

    def priority_ranks(self) -> dict[str, int]:
        return priority_ranks(self.priority_classes)

    def local_model_roots(self) -> list[str]:
        extra = [os.path.abspath(os.path.expanduser(r)) for r in self.model_roots.split(os.pathsep) if r.strip()]
        return [str(self.data_dir / "models"), *extra]

    @classmethod
    def from_env(cls, **overrides: object) -> "ServerConfig":
        """Flags (overrides that are not None) win over MAAS_* variables, which win over defaults."""
        env = {
            "data_dir": os.environ.get("MAAS_DATA_DIR"),
            "host": os.environ.get("MAAS_HOST"),
            "port": os.environ.get("MAAS_PORT"),
            "database_url": os.environ.get("MAAS_DATABASE_URL"),
            "worker_timeout": os.environ.get("MAAS_WORKER_TIMEOUT"),
            "reschedule_after": os.environ.get("MAAS_RESCHEDULE_AFTER"),
            "replace_serving_after": os.environ.get("MAAS_REPLACE_SERVING_AFTER"),
            "restart_backoff": os.environ.get("MAAS_RESTART_BACKOFF"),
            "restart_backoff_max": os.environ.get("MAAS_RESTART_BACKOFF_MAX"),
            "max_restarts": os.environ.get("MAAS_MAX_RESTARTS"),
            "gateway_timeout": os.environ.get("MAAS_GATEWAY_TIMEOUT"),
            "gateway_max_body_mb": os.environ.get("MAAS_GATEWAY_MAX_BODY_MB"),
            "gateway_max_upload_mb": os.environ.get("MAAS_GATEWAY_MAX_UPLOAD_MB"),
            "higress_dir": os.environ.get("MAAS_HIGRESS_DIR"),
            "higress_kubeconfig": os.environ.get("MAAS_HIGRESS_KUBECONFIG"),
            "higress_kube_context": os.environ.get("MAAS_HIGRESS_KUBE_CONTEXT"),
            "advertise_url": os.environ.get("MAAS_ADVERTISE_URL"),
            "audit_retention_days": os.environ.get("MAAS_AUDIT_RETENTION_DAYS"),
            "cluster_token": os.environ.get("MAAS_CLUSTER_TOKEN"),
            "priority_classes": os.environ.get("MAAS_PRIORITY_CLASSES"),
            "preempt_below_min_replicas": os.environ.get("MAAS_PREEMPT_BELOW_MIN_REPLICAS"),
            "autoscale_interval": os.environ.get("MAAS_AUTOSCALE_INTERVAL"),
            "max_held_requests": os.environ.get("MAAS_MAX_HELD_REQUESTS"),
        }
        values: dict[str, object] = {k: v for k, v in env.items() if v not in (None, "")}
        values.update({k: v for k, v in overrides.items() if v is not None})
        data_dir = Path(str(values.pop("data_dir", default_data_dir()))).expanduser().absolute()
        config = cls(data_dir=data_dir)
        for key, value in values.items():
            field_type = type(getattr(config, key))
            setattr(config, key, value if field_type is type(None) else field_type(value))
        return config
