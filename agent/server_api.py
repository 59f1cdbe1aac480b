"""The agent's client of the server's agent API: registration, heartbeats, instance states and events,
what a launch needs from the server (backend key, secrets, custom backend definitions), Ray head
addresses, the file inventory and the watch streams.

Everything in the agent that talks to the server goes through one `ServerAPI` (the serving loop, Ray,
the model cache, doctor): it holds the worker's identity (id, token, the agent secret the server
presents to us) and the HTTP session, so nobody reaches into the Agent for them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from agent import backoff, identity
from agent.backends import BackendError
from server.schemas import BackendDefinition, BackendKey, InstanceSecrets, WorkerRegistered

log = logging.getLogger(__name__)

NETWORK_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)


class ServerRejected(Exception):
    """The server refused this agent for good (a bad cluster token, a refused name): retrying cannot help."""


class ServerAPI:
    def __init__(self, server_url: str, cluster_token: str, data_dir: Path, name: str):
        self.server_url = server_url
        self.cluster_token = cluster_token  # only for registering; every other call uses the worker token
        self.data_dir = data_dir
        self.name = name
        self.worker_id: int | None = None
        self.worker_token = ""
        # What the server presents when it calls this agent (logs, metrics, doctor): given at registration.
        self.agent_secret = ""
        self.registered = asyncio.Event()
        self.http: aiohttp.ClientSession | None = None  # also the agent's session for its backends' probes

    def open(self) -> None:
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30, sock_connect=5))

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.worker_token}"}

    def url(self, path: str) -> str:
        return f"{self.server_url}{path}"

    # --- identity ---------------------------------------------------------------------------

    async def register_until_accepted(self, describe: Callable[[], dict[str, Any]]) -> None:
        """Register (`describe()` gives the worker's name, address, GPUs, host), retrying while the server
        cannot be reached or is busy; ServerRejected when it refuses."""
        attempt = 0
        while True:
            try:
                await self.register(describe())
                return
            except ServerRejected:
                raise
            except NETWORK_ERRORS as exc:
                # A busy server (429/503) says when to come back; jitter spreads the agents out.
                headers = exc.headers if isinstance(exc, aiohttp.ClientResponseError) else None
                log.warning("cannot register with the server at %s (%s); retrying", self.server_url, exc)
                await asyncio.sleep(backoff.delay(attempt, headers))
                attempt += 1

    async def register(self, body: dict[str, Any]) -> WorkerRegistered:
        # Our current token keeps our name (a restart included); without it the name waits for an approval.
        saved = self.worker_token or await asyncio.to_thread(identity.load_token, self.data_dir, self.name)
        if saved:
            body["token"] = saved
        async with self.http.post(self.url("/v2/agent/register"), json=body,
                                  headers={"Authorization": f"Bearer {self.cluster_token}"}) as response:
            if response.status in (401, 403, 422):
                raise ServerRejected(f"the server refused registration ({response.status}): {await response.text()}")
            if response.status == 409:  # held until `maas worker approve NAME`; we keep asking
                log.warning("registration held: %s", await response.text())
            response.raise_for_status()
            registered = WorkerRegistered.model_validate(await response.json())
        await asyncio.to_thread(identity.save_token, self.data_dir, self.name, registered.token)
        self.worker_id = registered.worker.id
        self.worker_token = registered.token
        self.agent_secret = registered.agent_secret
        self.registered.set()
        log.info("registered as worker %s (id %s) with %d GPUs", self.name, self.worker_id,
                 len(registered.worker.gpus))
        return registered

    async def heartbeat(self, body: dict[str, Any]) -> tuple[int, Mapping[str, str]]:
        """One heartbeat: the status and headers of the answer (network errors raise)."""
        async with self.http.post(self.url("/v2/agent/heartbeat"), json=body, headers=self.headers()) as response:
            return response.status, response.headers

    # --- instances --------------------------------------------------------------------------

    async def report(self, instance_id: int, state: str, message: str = "", **extra: Any) -> bool:
        """Tell the server an instance's state. True once the server answered (accepted or refused)."""
        body = {"state": state, "message": message, **{k: v for k, v in extra.items() if v is not None}}
        for attempt in range(5):
            headers = None
            try:
                async with self.http.put(self.url(f"/v2/agent/instances/{instance_id}/status"),
                                         json=body, headers=self.headers()) as response:
                    if response.status < 300:
                        return True
                    if response.status in (404, 409):  # gone or moved on; the watch tells us what is wanted
                        log.info("report %s for instance %s refused: %s", state, instance_id, await response.text())
                        return True
                    headers = response.headers  # busy (429/503): its Retry-After
            except NETWORK_ERRORS as exc:
                log.warning("report failed (%s), retrying", exc)
            await asyncio.sleep(backoff.delay(attempt, headers))
        return False

    async def event(self, instance_id: int, reason: str, message: str, keep_end: bool = False) -> None:
        """An event on the instance (its describe lists them); best effort: a lost one is only logged.
        Messages are cut to 4000 characters: their end when `keep_end` (a log tail), else their start."""
        message = message[-4000:] if keep_end else message[:4000]
        try:
            async with self.http.post(self.url(f"/v2/agent/instances/{instance_id}/events"),
                                      json={"reason": reason, "message": message}, headers=self.headers()) as response:
                if response.status >= 300:
                    log.info("event %s on instance %s refused (%s)", reason, instance_id, response.status)
        except NETWORK_ERRORS as exc:
            log.info("event %s on instance %s not recorded: %s", reason, instance_id, exc)

    async def backend_key(self, instance_id: int) -> str | None:
        """The key the instance's backend is to require (the gateway presents it); None: the backend takes none."""
        async with self.http.get(self.url(f"/v2/agent/instances/{instance_id}/backend-key"),
                                 headers=self.headers()) as response:
            if response.status != 200:
                raise BackendError(f"the server did not give the instance's backend key ({response.status}: "
                                   f"{(await response.text())[:300]})")
            return BackendKey.model_validate(await response.json()).key

    async def secrets(self, instance_id: int) -> dict[str, str]:
        """The values of the team secrets the instance's env names; kept in memory for its launch only."""
        async with self.http.get(self.url(f"/v2/agent/instances/{instance_id}/secrets"),
                                 headers=self.headers()) as response:
            if response.status != 200:
                raise BackendError(f"the server did not give the instance's secrets ({response.status}: "
                                   f"{(await response.text())[:300]})")
            return InstanceSecrets.model_validate(await response.json()).env

    async def backend_definition(self, name: str) -> BackendDefinition:
        """The definition of the custom backend `custom:NAME`."""
        async with self.http.get(self.url(f"/v2/backends/{name}"), headers=self.headers()) as response:
            if response.status == 404:
                raise BackendError(f"backend custom:{name} is not registered on the server "
                                   "(register it with `maas backend add -f FILE`)")
            response.raise_for_status()
            body = await response.json()
        return BackendDefinition.model_validate({k: v for k, v in body.items()
                                                 if k in BackendDefinition.model_fields})

    # --- Ray (agent/ray.py) -------------------------------------------------------------------

    async def publish_ray_head(self, instance_id: int, restart_count: int, head_address: str) -> None:
        body = {"head_address": head_address, "restart_count": restart_count}
        async with self.http.put(self.url(f"/v2/agent/instances/{instance_id}/ray"), json=body,
                                 headers=self.headers()) as response:
            if response.status >= 300:
                raise BackendError(f"the server refused the Ray head address ({response.status}): "
                                   f"{(await response.text())[:500]}")

    async def ray_head(self, instance_id: int) -> tuple[int, dict[str, Any] | str]:
        """(status, body): 200 with {head_address, restart_count}; 404/409 while none is published."""
        async with self.http.get(self.url(f"/v2/agent/instances/{instance_id}/ray"),
                                 headers=self.headers()) as response:
            if response.status == 200:
                return 200, await response.json()
            return response.status, (await response.text())[:300]

    # --- model files (agent/cache.py) -----------------------------------------------------------

    async def put_files(self, inventory: dict[str, Any]) -> tuple[int, str]:
        """Report the file inventory: (status, the first 300 characters of a refusal)."""
        async with self.http.put(self.url("/v2/agent/files"), json=inventory, headers=self.headers()) as response:
            return response.status, ((await response.text())[:300] if response.status >= 300 else "")

    # --- the watch stream ---------------------------------------------------------------------

    def watch(self, kinds: str, since: int | None) -> Any:
        """`async with api.watch(...) as response`: the watch stream of `kinds` from `since` (None: a snapshot)."""
        params = {"kinds": kinds} | ({"since": str(since)} if since is not None else {})
        return self.http.get(self.url("/v2/watch"), params=params, headers=self.headers(),
                             timeout=aiohttp.ClientTimeout(total=None, sock_read=60))
