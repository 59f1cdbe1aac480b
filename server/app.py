"""The running server: database, bus, controllers, scheduler, REST, watch and gateway in one process."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from sqlalchemy import func, select

from server import __version__, schemas
from server.api.app import create_app
from server.api.http_server import MaasAppRunner
from server.api.security import Authenticator, LoginThrottle, hash_password, hash_secret, new_cluster_token
from server.bus import ChangeFeed, EventBus
from server.config import ServerConfig
from server.data_lock import DataDirLock
from server.controllers.autoscale import Autoscaler, LoadMeter
from server.controllers.models import ModelController
from server.alerts.evaluator import AlertEvaluator
from server.controllers.bench_gate import BenchGate
from server.controllers.workers import WorkerLivenessController
from server.db import tables
from server.db.database import Database, to_wire
from server.db.embedded import EmbeddedPostgres, in_own_thread
from server.db.errors import first_line
from server.gateway.cold_start import ColdStart
from server.gateway.limits import GatewayLimits
from server.gateway.routing_table import RoutingTable
from server.gateway.usage import UsageMeter
from server.higress.sync import HigressSync
from server.leader import LeaderElection
from server.liveness import Heartbeats
from server.telemetry import TelemetryHub
from server.scheduler.service import Scheduler
from server.services.backend_keys import BackendKeys, load_secret

log = logging.getLogger(__name__)

CLUSTER_TOKEN_SETTING = "cluster_token_hash"
CLUSTER_TOKEN = "cluster_token"
_FOLLOWED = ("models", "instances", "api_keys", "users", "workers", "routes")  # what the gateway table and key cache follow


def write_secret(path: Path, text: str) -> None:
    """Write a credential readable by its owner only (mode 0600 from the first byte)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text + "\n")
    os.chmod(path, 0o600)


class MaasServer:
    version = __version__

    def __init__(self, config: ServerConfig):
        self.config = config
        self.bus = EventBus()
        from server.api.agent_api import AgentAdmission, instance_workers

        self.bus.workers_of = instance_workers  # agents' watches get only their instances' changes
        self.telemetry = TelemetryHub(self.bus)  # live GPU/host readings, sent to watchers once a second
        self.heartbeats: Heartbeats | None = None  # leases heard here; last-seen times flushed in batches
        self.agent_admission = AgentAdmission()
        self.routes = RoutingTable()
        # Autoscaling: requests held while a replica starts, and this gateway's load (server/controllers/autoscale.py).
        self.cold_start = ColdStart(self.routes, config.max_held_requests)
        self.load_meter = LoadMeter(self, secrets.token_hex(8))
        self.embedded: EmbeddedPostgres | None = None
        self.db: Database | None = None
        self.auth: Authenticator | None = None
        self.login_throttle = LoginThrottle()  # failed logins per user and per address (this server's)
        self.secret_box: Any = None  # team secrets' key (server/services/secrets.py), opened on first use
        self.http: aiohttp.ClientSession | None = None
        self.usage: UsageMeter | None = None
        self.limits = GatewayLimits()  # rate limits and token budgets of /v1 (server/gateway/limits.py)
        self.feed: ChangeFeed | None = None
        self.leadership: LeaderElection | None = None
        self.higress_status: list[Any] = []  # SyncStatus per Higress applier, set by HigressSync (the leader's)
        self.gateway_timeout = config.gateway_timeout  # seconds for one /v1 exchange (server/gateway/proxy.py)
        self.url = ""
        self.backend_keys: BackendKeys | None = None  # what the gateway presents to backends (services/backend_keys.py)
        self.cluster_token: str | None = None  # the registration token agents join with (from <data-dir>/token)
        self.admin_password: str | None = None  # set on the first start only
        self._runner: web.AppRunner | None = None
        self._loops: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._data_lock = DataDirLock(config.data_dir)

    @property
    def admin_password_file(self) -> Path:
        return self.config.data_dir / "initial_admin_password"

    @property
    def token_file(self) -> Path:
        return self.config.data_dir / "token"

    async def start(self) -> None:
        data_dir = self.config.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self._data_lock.acquire()  # before anything in the folder is read or started (server/data_lock.py)
        database_url = self.config.database_url
        if not database_url:
            self.embedded = EmbeddedPostgres(data_dir)
            database_url = await in_own_thread(self.embedded.start)
        self.db = Database(database_url)
        self.leadership = LeaderElection(self.db, self._start_loops, self._stop_loops)
        # SQLite and MySQL take one server: refused here, before anything is written (StoreInUse).
        await self.leadership.claim_store()
        self.feed = ChangeFeed(self.db, self.bus)
        self.heartbeats = Heartbeats(self.db)
        self.db.set_feed(self.feed)
        await self.db.migrate()
        await self._bootstrap()
        self.auth = Authenticator(self.db)
        async with self.db.session() as s:
            setting = await s.get(tables.Setting, CLUSTER_TOKEN_SETTING)
            self.auth.cluster_token_hash = setting.value if setting else None
        self.http = aiohttp.ClientSession(  # to agents (instance logs); the gateway has its own (gateway/upstream.py)
            # Shorter than llama.cpp's 5 s keep-alive, so we never reuse a connection it is closing.
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        )
        self.usage = UsageMeter(self.db)
        self.usage.start()
        subscription = self.bus.subscribe(_FOLLOWED)  # before the feed starts and the table loads: nothing lost
        await self.feed.start()
        await self._load_routes()
        await self.limits.start(self.db, self.bus, self.usage)
        self._tasks.append(asyncio.create_task(self._follow_bus(subscription), name="bus-follower"))
        # The gateway probes backends whose worker went silent: serving never waits on an agent.
        self._tasks.append(asyncio.create_task(self.routes.probe_loop(), name="gateway-probes"))
        self._tasks.append(asyncio.create_task(self.load_meter.run(), name="gateway-load"))
        self.heartbeats.start()
        self.telemetry.start(self.db)  # the db: the memory drift check reads claims
        if self.embedded is not None:
            self._tasks.append(asyncio.create_task(self._watch_embedded(), name="embedded-postgres-watchdog"))
        await self.leadership.start()
        app = create_app(self)
        # JSON errors for requests aiohttp cannot parse (oversized headers: 431), nothing of them logged.
        self._runner = MaasAppRunner(app, access_log=None, shutdown_timeout=2,
                                     # A client that leaves ends its watch or stream at once.
                                     handler_cancellation=True)
        await self._runner.setup()
        # A deep accept queue: a thousand agents (re)connecting at once are accepted late, not dropped
        # (aiohttp's default of 128 overflows, and a dropped connection attempt costs the client seconds).
        site = web.TCPSite(self._runner, self.config.host, self.config.port, backlog=4096)
        await site.start()
        host = self.config.host if self.config.host not in ("0.0.0.0", "::") else "127.0.0.1"
        self.url = f"http://{host}:{self.config.port}"
        log.info("MaaS-Base %s serving on %s", __version__, self.url)

    async def _start_loops(self) -> None:
        """The scheduler and controllers: on the leader only."""
        self._loops = [
            ModelController(self, self.config.resync_interval),
            Scheduler(self, self.config.resync_interval),
            WorkerLivenessController(self, max(0.5, min(3.0, self.config.worker_timeout / 5))),
            AlertEvaluator(self),  # alert rules and webhooks (server/alerts/)
            BenchGate(self, self.config.resync_interval),  # rollouts gated on a benchmark
            Autoscaler(self, self.config.autoscale_interval),
        ]
        if self.config.higress_dir or self.config.higress_kubeconfig:
            self._loops.append(HigressSync(
                self, self.config.resync_interval, Path(self.config.higress_dir) if self.config.higress_dir else None,
                self.config.higress_kubeconfig, self.config.higress_kube_context))
        for loop in self._loops:
            loop.start()

    async def _stop_loops(self) -> None:
        loops, self._loops = self._loops, []
        for loop in loops:
            await loop.stop()

    async def _watch_embedded(self, interval: float = 1.0, max_backoff: float = 30.0) -> None:
        """The embedded PostgreSQL is ours to run: when its postmaster dies (kill -9, the OOM
        killer), start it again, with backoff while it fails. Meanwhile requests that need the
        database get 503 database_unavailable; the pool, the change feed and the leader election
        reconnect by themselves once it is back."""
        backoff = interval
        while True:
            # Stopped on purpose (url None: `maas db restore`, a test) is not a crash.
            # alive() reads postmaster.pid and /proc: cheap enough for the loop. The restart runs
            # on a thread of its own: the default executor may be busy (password hashes, estimates).
            if self.embedded.url is None or self.embedded.alive():
                await self.embedded.postmaster_exit(interval)  # wakes at once when the postmaster dies
                continue
            log.warning("the embedded PostgreSQL in %s stopped running; starting it again", self.embedded.cluster_dir)
            try:
                await in_own_thread(self.embedded.restart_after_crash)
                log.info("the embedded PostgreSQL is back on 127.0.0.1:%s", self.embedded.port)
                backoff = interval
            except Exception as exc:  # EmbeddedPostgresError and OS errors: try again later
                backoff = min(max_backoff, backoff * 2)
                log.error("could not restart the embedded PostgreSQL (retrying in %.0f s): %s",
                          backoff, first_line(exc))
                await asyncio.sleep(backoff)

    async def database_status(self) -> dict[str, Any]:
        """Whether the database answers now (for /healthz: reported, never a 5xx)."""
        if self.db is None:
            return {"database": "unavailable", "database_error": "not connected yet"}
        try:
            async with asyncio.timeout(2):  # not wait_for: see server/reconcile.py
                async with self.db.engine.connect() as conn:
                    await conn.exec_driver_sql("SELECT 1")
        except Exception as exc:  # any failure to answer is "down" here; the reason goes along
            return {"database": "unavailable", "database_error": first_line(exc)[:300]}
        return {"database": "ok"}

    def advertised_endpoint(self) -> tuple[str, int]:
        """(host, port) others use to reach this server: --advertise-url, else the listening address."""
        from urllib.parse import urlsplit

        if self.config.advertise_url:
            parts = urlsplit(self.config.advertise_url)
            return parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)
        host = self.config.host if self.config.host not in ("0.0.0.0", "::") else socket.gethostname()
        return host, self.config.port

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()
        if self.leadership:
            await self.leadership.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.telemetry.stop()
        if self.heartbeats:
            await self.heartbeats.stop()
        await self.limits.stop()
        if self.usage:
            await self.usage.stop()
        if self.feed:
            await self.feed.stop()
        if self.http:
            await self.http.close()
        if self.db:
            await self.db.dispose()
        if self.embedded:
            await in_own_thread(self.embedded.stop)
        self._data_lock.release()

    async def _bootstrap(self) -> None:
        """First start: an admin with a generated password and the default team. Any start: the cluster
        token's hash in the database and the token in the data folder (see _cluster_token)."""
        async with self.db.session() as s:
            if not (await s.execute(select(func.count()).select_from(tables.User))).scalar_one():
                self.admin_password = secrets.token_urlsafe(18)
                s.add(tables.User(username="admin", password_hash=hash_password(self.admin_password), role="admin"))
                write_secret(self.admin_password_file, self.admin_password)
                s.add(tables.Team(name=schemas.DEFAULT_TEAM))  # where models go until there are more teams
            self.cluster_token = await self._cluster_token(s)
            self.backend_keys = BackendKeys(await load_secret(s))
            await s.commit()

    async def _cluster_token(self, s) -> str | None:
        """One cluster token for every server on this database. The database holds only its hash (what
        verifies a registration); the token itself lives in each server's data folder (<data-dir>/token,
        0600). The first server mints it; a server joining later is given it (MAAS_CLUSTER_TOKEN, or its
        token file) and keeps a copy, or runs without knowing it (it verifies, but cannot hand it out)."""
        hashed = await s.get(tables.Setting, CLUSTER_TOKEN_SETTING)
        legacy = await s.get(tables.Setting, CLUSTER_TOKEN)  # the plain copy earlier versions kept
        on_disk = self.token_file.read_text().strip() if self.token_file.exists() else None
        given = (self.config.cluster_token or "").strip() or None
        if hashed is None:
            token = given or new_cluster_token()
            hashed = tables.Setting(key=CLUSTER_TOKEN_SETTING, value=hash_secret(token))
            s.add(hashed)
        elif given is not None:
            if not secrets.compare_digest(hash_secret(given), hashed.value):
                raise ValueError("MAAS_CLUSTER_TOKEN is not this cluster's token (the database holds the hash of "
                                 "another one); give the token in the first server's <data-dir>/token")
            token = given
        else:
            token = next((t for t in (on_disk, legacy.value if legacy else None)
                          if t and secrets.compare_digest(hash_secret(t), hashed.value)), None)
        if legacy is not None:
            await s.delete(legacy)
        if token is None:
            log.warning("this server does not know the cluster token (the database keeps only its hash): agents "
                        "registering here are verified, but to print it or run a local agent give it in "
                        "MAAS_CLUSTER_TOKEN or %s", self.token_file)
        elif on_disk != token:
            write_secret(self.token_file, token)
        return token

    async def _load_routes(self) -> None:
        async with self.db.session() as s:
            models = (await s.execute(select(tables.Model))).scalars().all()
            instances = (await s.execute(select(tables.ModelInstance))).scalars().all()
            aliases = (await s.execute(select(tables.ModelRoute))).scalars().all()
            self.routes.load([to_wire(m) for m in models], [to_wire(i) for i in instances],
                             [to_wire(r) for r in aliases])

    async def _follow_bus(self, subscription: Any) -> None:
        """Keep the gateway's table and the credential cache current."""
        try:
            while True:
                event = await subscription.get()
                if event is None:
                    subscription = self.bus.subscribe(_FOLLOWED)
                    await self._load_routes()
                    self.auth.invalidate()
                    self.heartbeats.stored.clear()  # re-read from the database by the next heartbeats
                    continue
                if event.kind == "models":
                    self.routes.apply_model(event.action, event.object)
                elif event.kind == "instances":
                    self.routes.apply_instance(event.action, event.object)
                elif event.kind == "routes":
                    self.routes.apply_route(event.action, event.object)
                elif event.kind in ("api_keys", "users"):  # a revoked key, a changed role or team
                    self.auth.invalidate()
                elif event.kind == "workers":
                    self.auth.invalidate(worker_id=event.object["id"])
                    if event.action == "deleted":
                        self.heartbeats.forget(event.object["id"])
                        self.telemetry.drop(event.object["id"])
                    else:
                        self.heartbeats.remember(event.object)
        finally:
            subscription.close()
