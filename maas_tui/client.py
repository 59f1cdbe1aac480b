"""The one async API client: the CLI and the TUI both go through it."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import aiohttp

from server import schemas
from server.ndjson import json_lines, watch_messages
from server.schemas.alerts import AlertOut, SilenceOut, WebhookOut
from server.schemas.bench import BenchGateOut, BenchHistory, BenchResultCreate, BenchResultOut


class ApiClientError(Exception):
    def __init__(self, status: int, code: str, message: str, details: Any = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


class ServerUnreachable(ApiClientError):
    def __init__(self, url: str, reason: str):
        super().__init__(0, "unreachable", f"cannot reach the server at {url}: {reason}")


class MaasClient:
    def __init__(self, server: str, token: str = "", timeout: float = 30.0):
        self.server = server.rstrip("/")
        self.token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=5)
        self._session: aiohttp.ClientSession | None = None
        # Age in seconds of the oldest answer the server gave from memory while its database was down.
        self.stale_seconds: int | None = None

    async def __aenter__(self) -> "MaasClient":
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def request(self, method: str, path: str, *, json_body: Any = None, params: dict[str, str] | None = None) -> Any:
        url = self.server + path
        try:
            async with self.session.request(method, url, json=json_body, params=params, headers=self._headers()) as response:
                data = await _json_or_text(response)
                if response.status >= 400:
                    raise _error_from(response.status, data)
                stale = response.headers.get("X-Maas-Stale-Seconds", "")
                if stale.isdigit():
                    self.stale_seconds = max(self.stale_seconds or 0, int(stale))
                return data
        except aiohttp.ClientConnectionError as exc:
            raise ServerUnreachable(self.server, str(exc) or type(exc).__name__) from None
        except TimeoutError:
            raise ServerUnreachable(self.server, "timed out") from None

    async def health(self) -> dict[str, Any]:
        return await self.request("GET", "/healthz")

    # --- auth and keys ----------------------------------------------------------

    async def login(self, username: str, password: str) -> schemas.LoginResponse:
        data = await self.request("POST", "/v2/auth/login", json_body={"username": username, "password": password})
        return schemas.LoginResponse.model_validate(data)

    async def list_keys(self, all_users: bool = False) -> list[schemas.ApiKeyListed]:
        params = {"all": "1"} if all_users else None
        return [schemas.ApiKeyListed.model_validate(i)
                for i in (await self.request("GET", "/v2/keys", params=params))["items"]]

    async def create_key(self, name: str, expires_in_days: int | None = None, scopes: list[str] | None = None,
                         allowed_models: list[str] | None = None) -> schemas.ApiKeyCreated:
        body: dict[str, Any] = {"name": name}
        if expires_in_days:
            body["expires_in_days"] = expires_in_days
        if scopes:
            body["scopes"] = scopes
        if allowed_models:
            body["allowed_models"] = allowed_models
        return schemas.ApiKeyCreated.model_validate(await self.request("POST", "/v2/keys", json_body=body))

    async def usage(self, by: str = "day,key,model", since: str | None = None,
                    until: str | None = None) -> list[schemas.UsageRow]:
        params = {"by": by} | ({"since": since} if since else {}) | ({"until": until} if until else {})
        return [schemas.UsageRow.model_validate(i) for i in (await self.request("GET", "/v2/usage", params=params))["items"]]

    async def delete_key(self, name: str, user: str | None = None) -> None:
        await self.request("DELETE", f"/v2/keys/{name}", params={"user": user} if user else None)

    async def list_sessions(self, all_users: bool = False) -> list[schemas.SessionOut]:
        params = {"all": "1"} if all_users else None
        return [schemas.SessionOut.model_validate(i)
                for i in (await self.request("GET", "/v2/sessions", params=params))["items"]]

    async def revoke_session(self, prefix: str) -> None:
        await self.request("DELETE", f"/v2/sessions/{prefix}")

    async def higress_objects(self) -> list[dict[str, Any]]:
        return (await self.request("GET", "/v2/gateway/higress"))["items"]

    async def higress_sync(self) -> list[dict[str, Any]]:
        """How each Higress applier fares on the leading server (empty where none is configured)."""
        return (await self.request("GET", "/v2/gateway/higress"))["sync"]

    # --- models -------------------------------------------------------------------

    async def list_models(self) -> list[schemas.ModelOut]:
        return [schemas.ModelOut.model_validate(i) for i in (await self.request("GET", "/v2/models"))["items"]]

    async def get_model(self, name: str) -> schemas.ModelOut:
        return schemas.ModelOut.model_validate(await self.request("GET", f"/v2/models/{name}"))

    async def create_model(self, body: dict[str, Any]) -> schemas.ModelOut:
        return schemas.ModelOut.model_validate(await self.request("POST", "/v2/models", json_body=body))

    async def update_model(self, name: str, changes: dict[str, Any]) -> schemas.ModelOut:
        return schemas.ModelOut.model_validate(await self.request("PATCH", f"/v2/models/{name}", json_body=changes))

    async def delete_model(self, name: str) -> schemas.ModelOut:
        return schemas.ModelOut.model_validate(await self.request("DELETE", f"/v2/models/{name}"))

    async def evaluate_model(self, body: dict[str, Any]) -> schemas.ModelEvaluation:
        """Dry run of a deploy: where each replica would go, or why not. Writes nothing."""
        return schemas.ModelEvaluation.model_validate(await self.request("POST", "/v2/models/evaluate", json_body=body))

    async def describe_model(self, name: str) -> schemas.ModelDescription:
        return schemas.ModelDescription.model_validate(await self.request("GET", f"/v2/models/{name}/describe"))

    async def rollout_status(self, name: str) -> schemas.RolloutStatus:
        return schemas.RolloutStatus.model_validate(await self.request("GET", f"/v2/models/{name}/rollout"))

    async def rollout_action(self, name: str, action: str, to_revision: int | None = None) -> schemas.ModelOut:
        """restart, undo (optionally to a revision), pause or resume a model's rollout."""
        body = {"to_revision": to_revision} if to_revision is not None else None
        return schemas.ModelOut.model_validate(
            await self.request("POST", f"/v2/models/{name}/rollout/{action}", json_body=body))

    async def model_history(self, name: str) -> list[schemas.ModelRevisionOut]:
        return [schemas.ModelRevisionOut.model_validate(i)
                for i in (await self.request("GET", f"/v2/models/{name}/history"))["items"]]

    async def worker_action(self, name: str, action: str) -> schemas.WorkerOut:
        """cordon, uncordon or drain a worker."""
        return schemas.WorkerOut.model_validate(await self.request("POST", f"/v2/workers/{name}/{action}"))

    async def approve_worker(self, name: str) -> schemas.WorkerApproval:
        """Let the next registration under a taken worker name through without the worker's token."""
        return schemas.WorkerApproval.model_validate(await self.request("POST", f"/v2/workers/{name}/approve"))

    # --- instances, workers, events ------------------------------------------------

    async def list_instances(self, model: str | None = None) -> list[schemas.InstanceOut]:
        params = {"model": model} if model else None
        data = await self.request("GET", "/v2/instances", params=params)
        return [schemas.InstanceOut.model_validate(i) for i in data["items"]]

    async def get_instance(self, ref: str) -> schemas.InstanceOut:
        return schemas.InstanceOut.model_validate(await self.request("GET", f"/v2/instances/{ref}"))

    async def restart_instance(self, ref: str) -> schemas.InstanceOut:
        return schemas.InstanceOut.model_validate(await self.request("POST", f"/v2/instances/{ref}/restart"))

    async def delete_instance(self, ref: str) -> schemas.InstanceOut:
        return schemas.InstanceOut.model_validate(await self.request("DELETE", f"/v2/instances/{ref}"))

    async def list_workers(self) -> list[schemas.WorkerOut]:
        return [schemas.WorkerOut.model_validate(i) for i in (await self.request("GET", "/v2/workers"))["items"]]

    async def get_worker(self, name: str) -> schemas.WorkerOut:
        return schemas.WorkerOut.model_validate(await self.request("GET", f"/v2/workers/{name}"))

    async def delete_worker(self, name: str) -> None:
        await self.request("DELETE", f"/v2/workers/{name}")

    async def list_events(self, limit: int = 100, name: str | None = None, kind: str | None = None) -> list[schemas.EventOut]:
        params = {"limit": str(limit)} | ({"name": name} if name else {}) | ({"kind": kind} if kind else {})
        return [schemas.EventOut.model_validate(i) for i in (await self.request("GET", "/v2/events", params=params))["items"]]

    # --- backends -------------------------------------------------------------------

    async def list_backends(self) -> list[schemas.BackendOut]:
        return [schemas.BackendOut.model_validate(i) for i in (await self.request("GET", "/v2/backends"))["items"]]

    async def get_backend(self, name: str) -> schemas.BackendOut:
        return schemas.BackendOut.model_validate(await self.request("GET", f"/v2/backends/{name}"))

    async def add_backend(self, definition: dict[str, Any], replace: bool = False) -> schemas.BackendOut:
        params = {"replace": "1"} if replace else None
        return schemas.BackendOut.model_validate(await self.request("POST", "/v2/backends", json_body=definition,
                                                                    params=params))

    async def delete_backend(self, name: str) -> None:
        await self.request("DELETE", f"/v2/backends/{name}")

    async def set_backend_allow_list(self, backend: str, env: list[str], args: list[str]) -> schemas.BackendAllowList:
        body = {"env": env, "args": args}
        return schemas.BackendAllowList.model_validate(await self.request("PUT", f"/v2/backends/{backend}/allow",
                                                                          json_body=body))

    # --- streams --------------------------------------------------------------------

    @asynccontextmanager
    async def _stream(self, method: str, path: str, read_timeout: float | None,
                      **kwargs: Any) -> AsyncIterator[aiohttp.ClientResponse]:
        """An open streaming response: API errors raised as ApiClientError, a lost connection
        (at any point while reading) as ServerUnreachable."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=read_timeout)
        try:
            async with self.session.request(method, self.server + path, headers=self._headers(), timeout=timeout,
                                            **kwargs) as response:
                if response.status >= 400:
                    raise _error_from(response.status, await _json_or_text(response))
                yield response
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            raise ServerUnreachable(self.server, str(exc) or type(exc).__name__) from None

    async def stream_logs(self, ref: str, tail: int = 200, follow: bool = False, previous: bool = False) -> AsyncIterator[bytes]:
        params = {"tail": str(tail), "follow": "1" if follow else "0", "previous": "1" if previous else "0"}
        async with self._stream("GET", f"/v2/instances/{ref}/logs", None, params=params) as response:
            async for chunk in response.content.iter_any():
                yield chunk

    async def watch(self, kinds: list[str], since: int | None = None) -> AsyncIterator[schemas.WatchMessage]:
        params = {"kinds": ",".join(kinds)} | ({"since": str(since)} if since is not None else {})
        async with self._stream("GET", "/v2/watch", 60, params=params) as response:
            async for message in watch_messages(response.content.iter_any()):
                yield schemas.WatchMessage.model_validate(message)

    async def chat(self, model: str, prompt: str, max_tokens: int = 64) -> AsyncIterator[str]:
        """Stream a chat completion through the gateway, yielding text pieces."""
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "stream": True}
        async with self._stream("POST", "/v1/chat/completions", 300, json=body) as response:
            async for raw in json_lines(response.content.iter_any()):
                line = raw.decode(errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                for choice in json.loads(data).get("choices", []):
                    if piece := (choice.get("delta") or {}).get("content"):
                        yield piece

    # --- users and SSH keys (the TUI over SSH) -----------------------------------------

    async def list_users(self) -> list[schemas.UserOut]:
        return [schemas.UserOut.model_validate(i) for i in (await self.request("GET", "/v2/users"))["items"]]

    async def create_user(self, username: str, password: str, role: str = "member",
                          teams: list[str] | None = None) -> schemas.UserOut:
        body: dict[str, Any] = {"username": username, "password": password, "role": role}
        if teams is not None:
            body["teams"] = teams
        return schemas.UserOut.model_validate(await self.request("POST", "/v2/users", json_body=body))

    async def update_user(self, username: str, role: str | None = None, disabled: bool | None = None) -> schemas.UserOut:
        changes = {k: v for k, v in (("role", role), ("disabled", disabled)) if v is not None}
        return schemas.UserOut.model_validate(await self.request("PATCH", f"/v2/users/{username}", json_body=changes))

    async def delete_user(self, username: str) -> None:
        await self.request("DELETE", f"/v2/users/{username}")

    async def audit(self, limit: int = 100, actor: str | None = None, since: str | None = None) -> list[schemas.AuditEntryOut]:
        params = {"limit": str(limit)} | ({"actor": actor} if actor else {}) | ({"since": since} if since else {})
        return [schemas.AuditEntryOut.model_validate(i) for i in (await self.request("GET", "/v2/audit", params=params))["items"]]

    # --- teams ----------------------------------------------------------------------

    async def list_secrets(self, team: str) -> list[schemas.SecretOut]:
        return [schemas.SecretOut.model_validate(i) for i in (await self.request("GET", f"/v2/teams/{team}/secrets"))["items"]]

    async def set_secret(self, team: str, name: str, value: str) -> schemas.SecretOut:
        return schemas.SecretOut.model_validate(await self.request("PUT", f"/v2/teams/{team}/secrets/{name}",
                                                                   json_body={"value": value}))

    async def delete_secret(self, team: str, name: str) -> None:
        await self.request("DELETE", f"/v2/teams/{team}/secrets/{name}")

    async def list_teams(self) -> list[schemas.TeamOut]:
        return [schemas.TeamOut.model_validate(i) for i in (await self.request("GET", "/v2/teams"))["items"]]

    async def create_team(self, name: str) -> schemas.TeamOut:
        return schemas.TeamOut.model_validate(await self.request("POST", "/v2/teams", json_body={"name": name}))

    async def delete_team(self, name: str) -> None:
        await self.request("DELETE", f"/v2/teams/{name}")

    # model files in the workers' caches (issue 19)
    async def list_files(self, worker: str | None = None, source: str | None = None) -> list[schemas.ModelFileOut]:
        params = {k: v for k, v in (("worker", worker), ("source", source)) if v}
        return [schemas.ModelFileOut.model_validate(i)
                for i in (await self.request("GET", "/v2/files", params=params or None))["items"]]

    async def pull_files(self, source: str, workers: list[str] | None = None,
                         labels: dict[str, str] | None = None) -> list[schemas.ModelFileOut]:
        body = {"source": source, "workers": list(workers or []), "labels": dict(labels or {})}
        return [schemas.ModelFileOut.model_validate(i)
                for i in (await self.request("POST", "/v2/files", json_body=body))["items"]]

    async def remove_file(self, file_id: int) -> dict[str, Any]:
        return await self.request("DELETE", f"/v2/files/{file_id}")

    async def set_team_quota(self, name: str, quota: schemas.TeamQuota) -> schemas.TeamOut:
        """Replace a team's quota (a field left None is unlimited)."""
        return schemas.TeamOut.model_validate(await self.request(
            "PUT", f"/v2/teams/{name}/quota", json_body=quota.model_dump(mode="json")))

    async def set_team_member(self, team: str, username: str, role: str = "member") -> schemas.TeamOut:
        return schemas.TeamOut.model_validate(await self.request("PUT", f"/v2/teams/{team}/members/{username}",
                                                                 json_body={"role": role}))

    async def remove_team_member(self, team: str, username: str) -> schemas.TeamOut:
        return schemas.TeamOut.model_validate(await self.request("DELETE", f"/v2/teams/{team}/members/{username}"))

    async def list_ssh_keys(self, username: str) -> list[schemas.SshKeyOut]:
        data = await self.request("GET", f"/v2/users/{_seg(username)}/keys")
        return [schemas.SshKeyOut.model_validate(i) for i in data["items"]]

    async def add_ssh_key(self, username: str, public_key: str, name: str = "") -> schemas.SshKeyOut:
        data = await self.request("POST", f"/v2/users/{_seg(username)}/keys",
                                  json_body={"public_key": public_key, "name": name})
        return schemas.SshKeyOut.model_validate(data)

    async def delete_ssh_key(self, username: str, key: str) -> None:
        await self.request("DELETE", f"/v2/users/{_seg(username)}/keys/{_seg(key)}")

    async def ssh_authorized_keys(self, username: str) -> list[str]:
        return list((await self.request("GET", f"/v2/users/{_seg(username)}/authorized-keys"))["items"])

    async def open_ssh_session(self, username: str, fingerprint: str = "", peer: str = "") -> schemas.SshSessionOut:
        data = await self.request("POST", f"/v2/users/{_seg(username)}/sessions",
                                  json_body={"fingerprint": fingerprint, "peer": peer})
        return schemas.SshSessionOut.model_validate(data)

    async def close_ssh_session(self, username: str, prefix: str, reason: str = "") -> None:
        await self.request("DELETE", f"/v2/users/{_seg(username)}/sessions/{_seg(prefix)}", params={"reason": reason})

    # --- model routes (aliases weighted between models, with fallbacks) ---

    async def list_routes(self) -> list[schemas.RouteOut]:
        return [schemas.RouteOut.model_validate(i) for i in (await self.request("GET", "/v2/routes"))["items"]]

    async def get_route(self, name: str) -> schemas.RouteOut:
        return schemas.RouteOut.model_validate(await self.request("GET", f"/v2/routes/{_seg(name)}"))

    async def create_route(self, body: schemas.RouteCreate) -> schemas.RouteOut:
        return schemas.RouteOut.model_validate(await self.request(
            "POST", "/v2/routes", json_body=body.model_dump(mode="json", exclude_none=True)))

    async def update_route(self, name: str, body: schemas.RouteUpdate) -> schemas.RouteOut:
        return schemas.RouteOut.model_validate(await self.request(
            "PATCH", f"/v2/routes/{_seg(name)}", json_body=body.model_dump(mode="json", exclude_none=True)))

    async def delete_route(self, name: str) -> None:
        await self.request("DELETE", f"/v2/routes/{_seg(name)}")

    # --- telemetry history and maas doctor (server/api/telemetry.py) ---

    async def telemetry(self, worker: str | None = None, instance: str | None = None, model: str | None = None,
                        since: str | None = None) -> "TelemetryHistory":
        from server.schemas.telemetry import TelemetryHistory

        params = {k: v for k, v in (("worker", worker), ("instance", instance), ("model", model),
                                    ("since", since)) if v is not None}
        return TelemetryHistory.model_validate(await self.request("GET", "/v2/telemetry", params=params))

    async def doctor(self, worker: str | None = None) -> list["DoctorReport"]:
        from server.schemas.telemetry import DoctorReport

        if worker is not None:
            return [DoctorReport.model_validate(await self.request("GET", f"/v2/workers/{_seg(worker)}/doctor"))]
        return [DoctorReport.model_validate(i) for i in (await self.request("GET", "/v2/doctor"))["items"]]

    # --- alerts, silences, webhooks; benchmarks and the rollout bench gate (issue 20) ----------------

    async def list_alerts(self, state: str = "all", limit: int = 200) -> list[AlertOut]:
        data = await self.request("GET", "/v2/alerts", params={"state": state, "limit": str(limit)})
        return [AlertOut.model_validate(i) for i in data["items"]]

    async def list_silences(self) -> list[SilenceOut]:
        return [SilenceOut.model_validate(i) for i in (await self.request("GET", "/v2/alerts/silences"))["items"]]

    async def silence(self, rule: str, duration_seconds: int, object_name: str | None = None,
                      comment: str = "") -> SilenceOut:
        body = {"rule": rule, "duration_seconds": duration_seconds, "object_name": object_name, "comment": comment}
        return SilenceOut.model_validate(await self.request("POST", "/v2/alerts/silences", json_body=body))

    async def expire_silence(self, silence_id: int) -> SilenceOut:
        return SilenceOut.model_validate(await self.request("DELETE", f"/v2/alerts/silences/{silence_id}"))

    async def list_webhooks(self) -> list[WebhookOut]:
        return [WebhookOut.model_validate(i) for i in (await self.request("GET", "/v2/alerts/webhooks"))["items"]]

    async def add_webhook(self, url: str, secret: str | None = None) -> WebhookOut:
        body = {"url": url} | ({"secret": secret} if secret is not None else {})
        return WebhookOut.model_validate(await self.request("POST", "/v2/alerts/webhooks", json_body=body))

    async def delete_webhook(self, hook_id: int) -> None:
        await self.request("DELETE", f"/v2/alerts/webhooks/{hook_id}")

    async def bench_history(self, model: str) -> BenchHistory:
        return BenchHistory.model_validate(await self.request("GET", f"/v2/models/{_seg(model)}/bench"))

    async def store_bench(self, model: str, result: BenchResultCreate) -> BenchResultOut:
        data = await self.request("POST", f"/v2/models/{_seg(model)}/bench", json_body=result.model_dump(mode="json"))
        return BenchResultOut.model_validate(data)

    async def set_bench_gate(self, model: str, expression: str, requests: int = 4, max_tokens: int = 16) -> BenchGateOut:
        body = {"expression": expression, "requests": requests, "max_tokens": max_tokens}
        return BenchGateOut.model_validate(await self.request("PUT", f"/v2/models/{_seg(model)}/bench/gate",
                                                              json_body=body))

    async def delete_bench_gate(self, model: str) -> None:
        await self.request("DELETE", f"/v2/models/{_seg(model)}/bench/gate")

    async def stream_completion(self, body: dict[str, Any]) -> AsyncIterator[str]:
        """POST a streamed chat completion through the gateway; yield each server-sent event's data as it
        arrives (what server/schemas/bench.py measures). An HTTP error raises ApiClientError."""
        async with self._stream("POST", "/v1/chat/completions", 300, json=body) as response:
            async for raw in json_lines(response.content.iter_any()):
                line = raw.decode(errors="replace").strip()
                if line.startswith("data:"):
                    yield line[5:].strip()


    # --- gateway limits (rpm, tpm, concurrency, token budgets per key, team and model) ---

    async def list_limits(self, scope: str | None = None) -> list["LimitsListed"]:
        from server.schemas.limits import LimitsListed

        params = {"scope": scope} if scope else None
        return [LimitsListed.model_validate(i) for i in (await self.request("GET", "/v2/limits", params=params))["items"]]

    async def set_limits(self, scope: str, name: str, changes: dict[str, int | None],
                         user: str | None = None) -> "LimitsListed":
        """Change the limits of a key (`user`: another user's, admin), a team or a model: the fields given
        (None removes one); the others stay."""
        from server.schemas.limits import LimitsListed

        plural = {"key": "keys", "team": "teams", "model": "models"}[scope]
        return LimitsListed.model_validate(await self.request(
            "PATCH", f"/v2/{plural}/{_seg(name)}/limits", json_body=changes, params={"user": user} if user else None))


async def _json_or_text(response: aiohttp.ClientResponse) -> Any:
    text = await response.text()
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text


def _error_from(status: int, data: Any) -> ApiClientError:
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        error = data["error"]
        return ApiClientError(status, str(error.get("code") or error.get("type") or "error"),
                              str(error.get("message", "")), error.get("details"))
    return ApiClientError(status, "error", str(data)[:500] or f"HTTP {status}")


def _seg(value: str) -> str:
    """One URL path segment (SSH fingerprints hold '/' and '+')."""
    from urllib.parse import quote

    return quote(value, safe="")
