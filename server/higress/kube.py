"""Applying Higress objects through the Kubernetes API, with a kubeconfig.

Plain aiohttp rather than a generated client (kubernetes_asyncio is tens of MB of generated
models for the five REST calls used here, and aiohttp is already the server's HTTP stack).
Supported kubeconfig credentials: bearer token (`token`, `tokenFile`), client certificate
(`client-certificate[-data]` + `client-key[-data]`), basic auth; CA from
`certificate-authority[-data]` or `insecure-skip-tls-verify`. `exec` and `auth-provider`
plugins are refused with a clear message. The kubeconfig `in-cluster` means the pod's service
account (KUBERNETES_SERVICE_HOST/PORT, its token and CA).

Ingresses and WasmPlugins named by MaaS are created or replaced whole (with the
resourceVersion read just before, so a concurrent edit is not overwritten blindly). The
McpBridge `default` is shared with other writers: only the registries MaaS owns (`maas-*`)
are changed, read-modify-write with metadata.resourceVersion, retried on 409 Conflict.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import logging
import os
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from server.higress.objects import LABELS, NAMESPACE, is_managed_registry

log = logging.getLogger(__name__)

# kind -> (API path prefix, plural)
RESOURCES = {
    "Ingress": ("/apis/networking.k8s.io/v1", "ingresses"),
    "WasmPlugin": ("/apis/extensions.higress.io/v1alpha1", "wasmplugins"),
    "McpBridge": ("/apis/networking.higress.io/v1", "mcpbridges"),
}
MAX_ATTEMPTS = 8  # conflicts in a row before giving up until the next reconcile
LABEL_SELECTOR = ",".join(f"{k}={v}" for k, v in LABELS.items())


class KubeError(Exception):
    """The API server could not be used: unreachable, refused us, or answered an error."""


class KubeConfigError(KubeError):
    pass


@dataclass
class KubeTarget:
    server: str
    ssl: ssl.SSLContext | bool
    headers: dict[str, str] = field(default_factory=dict)
    auth: aiohttp.BasicAuth | None = None


def _named(entries: list[dict[str, Any]] | None, name: str, what: str, path: Path) -> dict[str, Any]:
    for entry in entries or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry.get(what) or {}
    raise KubeConfigError(f"{path}: no {what} named {name!r}")


def _material(section: dict[str, Any], key: str, base: Path) -> bytes | None:
    """The bytes of `key-data` (base64) or of the file `key` (relative to the kubeconfig)."""
    if section.get(f"{key}-data"):
        try:
            return base64.b64decode(section[f"{key}-data"], validate=True)
        except ValueError as exc:
            raise KubeConfigError(f"{key}-data is not base64: {exc}") from None
    if section.get(key):
        file = Path(os.path.expanduser(section[key]))
        try:
            return (file if file.is_absolute() else base / file).read_bytes()
        except OSError as exc:
            raise KubeConfigError(f"{key}: {exc}") from None
    return None


def load_kubeconfig(path: str | Path, context: str | None = None) -> KubeTarget:
    path = Path(path).expanduser()
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise KubeConfigError(f"cannot read the kubeconfig {path}: {exc}") from None
    if not isinstance(config, dict):
        raise KubeConfigError(f"{path} is not a kubeconfig")
    context_name = context or config.get("current-context")
    if not context_name:
        raise KubeConfigError(f"{path}: no current-context")
    ctx = _named(config.get("contexts"), context_name, "context", path)
    cluster = _named(config.get("clusters"), ctx.get("cluster", ""), "cluster", path)
    user = _named(config.get("users"), ctx.get("user", ""), "user", path) if ctx.get("user") else {}
    server = str(cluster.get("server") or "").rstrip("/")
    if not server.startswith(("https://", "http://")):
        raise KubeConfigError(f"{path}: cluster {ctx.get('cluster')!r} has no http(s) server")
    if user.get("exec") or user.get("auth-provider"):
        raise KubeConfigError(f"{path}: user {ctx.get('user')!r} needs an exec/auth-provider plugin, which is not "
                              "supported; use a token, a token file or a client certificate")
    base = path.parent
    tls: ssl.SSLContext | bool = True
    if server.startswith("https://"):
        if cluster.get("insecure-skip-tls-verify"):
            context_ = ssl.create_default_context()
            context_.check_hostname = False
            context_.verify_mode = ssl.CERT_NONE
        else:
            ca = _material(cluster, "certificate-authority", base)
            try:
                context_ = ssl.create_default_context(cadata=ca.decode() if ca else None)
            except (ssl.SSLError, ValueError) as exc:
                raise KubeConfigError(f"{path}: bad certificate-authority: {exc}") from None
        cert, key = _material(user, "client-certificate", base), _material(user, "client-key", base)
        if cert and key:
            # ssl loads a chain from files only: a private folder, removed once loaded.
            with tempfile.TemporaryDirectory(prefix="maas-kube-") as folder:
                cert_file, key_file = Path(folder) / "cert.pem", Path(folder) / "key.pem"
                for file, data in ((cert_file, cert), (key_file, key)):
                    fd = os.open(file, os.O_WRONLY | os.O_CREAT, 0o600)
                    with os.fdopen(fd, "wb") as handle:
                        handle.write(data)
                try:
                    context_.load_cert_chain(cert_file, key_file)
                except ssl.SSLError as exc:
                    raise KubeConfigError(f"{path}: bad client certificate or key: {exc}") from None
        elif cert or key:
            raise KubeConfigError(f"{path}: a client certificate needs both the certificate and the key")
        tls = context_
    headers: dict[str, str] = {}
    token = user.get("token")
    if not token and user.get("tokenFile"):
        try:
            token = Path(user["tokenFile"]).expanduser().read_text().strip()
        except OSError as exc:
            raise KubeConfigError(f"tokenFile: {exc}") from None
    if token:
        headers["Authorization"] = f"Bearer {token}"
    auth = aiohttp.BasicAuth(user["username"], user.get("password", "")) if user.get("username") else None
    return KubeTarget(server, tls, headers, auth)


def _path(kind: str, name: str | None = None) -> str:
    prefix, plural = RESOURCES[kind]
    return f"{prefix}/namespaces/{NAMESPACE}/{plural}" + (f"/{name}" if name else "")


class _Api:
    def __init__(self, http: aiohttp.ClientSession, server: str):
        self.http = http
        self.server = server

    async def call(self, method: str, path: str, body: Any = None, **params: str) -> tuple[int, Any]:
        if method in ("POST", "PUT"):
            # Reject rather than drop fields the API server does not know: a typo must show.
            params["fieldValidation"] = "Strict"
        try:
            async with self.http.request(method, self.server + path, json=body, params=params) as response:
                try:
                    data = await response.json(content_type=None)
                except ValueError:
                    data = None
                return response.status, data
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise KubeError(f"cannot reach the Kubernetes API at {self.server}: {exc or type(exc).__name__}") from None

    def fail(self, method: str, path: str, status: int, data: Any) -> KubeError:
        message = data.get("message") if isinstance(data, dict) else None
        return KubeError(f"{method} {path}: HTTP {status}: {message or data}")


def _same(current: dict[str, Any], wanted: dict[str, Any]) -> bool:
    meta, want = current.get("metadata") or {}, wanted["metadata"]
    labels = meta.get("labels") or {}
    return (current.get("spec") == wanted.get("spec")
            and all(labels.get(k) == v for k, v in want.get("labels", {}).items())
            and (meta.get("annotations") or {}) == want.get("annotations", meta.get("annotations") or {}))


def _replacement(current: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """`wanted`, keeping what the server and others keep in metadata (uid, finalizers, owners...)."""
    meta = {k: v for k, v in (current.get("metadata") or {}).items() if k != "managedFields"}
    meta["labels"] = {**(meta.get("labels") or {}), **wanted["metadata"].get("labels", {})}
    if "annotations" in wanted["metadata"]:
        meta["annotations"] = wanted["metadata"]["annotations"]
    return {**wanted, "metadata": meta}


IN_CLUSTER = "in-cluster"
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def load_in_cluster(account: Path | None = None, environ: dict[str, str] | None = None) -> KubeTarget:
    """The pod's own service account, as client-go's rest.InClusterConfig reads it."""
    environ = os.environ if environ is None else environ
    account = SERVICE_ACCOUNT if account is None else account
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise KubeConfigError("in-cluster: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set "
                              "(is the server running in a Kubernetes pod?)")
    try:
        token = (account / "token").read_text().strip()
        tls = ssl.create_default_context(cafile=str(account / "ca.crt"))
    except (OSError, ssl.SSLError) as exc:
        raise KubeConfigError(f"in-cluster: cannot read the service account in {account}: {exc}") from None
    server_host = f"[{host}]" if ":" in host else host  # an IPv6 service address
    return KubeTarget(f"https://{server_host}:{port}", tls, {"Authorization": f"Bearer {token}"})


class KubeApplier:
    """Make namespace higress-system hold these objects among those MaaS manages."""

    def __init__(self, kubeconfig: str | Path, context: str | None = None, timeout: float = 10.0):
        self.kubeconfig = str(kubeconfig)
        self.context = context
        self.timeout = timeout
        self.conflicts = 0  # 409s met and retried, since start
        self.description = f"kubernetes ({self.kubeconfig})"

    async def apply(self, objects: list[dict[str, Any]]) -> tuple[int, int]:
        # Read each time: service-account tokens and token files rotate. In a thread: file reads and
        # ssl contexts (the system's CA bundle) would stall the event loop for milliseconds each sync.
        if self.kubeconfig == IN_CLUSTER:
            target = await asyncio.to_thread(load_in_cluster)
        else:
            target = await asyncio.to_thread(load_kubeconfig, self.kubeconfig, self.context)
        connector = aiohttp.TCPConnector(ssl=target.ssl)
        async with aiohttp.ClientSession(connector=connector, headers=target.headers, auth=target.auth,
                                         timeout=aiohttp.ClientTimeout(total=self.timeout)) as http:
            api = _Api(http, target.server)
            written = 0
            for obj in objects:
                if obj["kind"] == "McpBridge":
                    written += await self._merge_bridge(api, obj)
                else:
                    written += await self._replace(api, obj)
            wanted = {(o["kind"], o["metadata"]["name"]) for o in objects}
            removed = 0
            for kind in ("Ingress", "WasmPlugin"):
                removed += await self._remove_others(api, kind, wanted)
            return written, removed

    async def _replace(self, api: _Api, obj: dict[str, Any]) -> int:
        """An object MaaS owns whole: replaced when it differs, keeping the server's metadata."""
        return await self._write(api, obj, lambda current: None if _same(current, obj) else _replacement(current, obj))

    async def _merge_bridge(self, api: _Api, obj: dict[str, Any]) -> int:
        """Our registries into the shared McpBridge; other writers' registries untouched."""
        ours = obj["spec"]["registries"]

        def merged(current: dict[str, Any]) -> dict[str, Any] | None:
            spec = current.get("spec") or {}
            registries = [r for r in spec.get("registries") or [] if not is_managed_registry(r)] + ours
            if (spec.get("registries") or []) == registries:
                return None
            updated = copy.deepcopy(current)
            updated["metadata"].pop("managedFields", None)
            updated["spec"] = {**spec, "registries": registries}
            return updated

        return await self._write(api, obj, merged)

    async def _write(self, api: _Api, obj: dict[str, Any], update: Any) -> int:
        """Create `obj`, or PUT `update(current)` over what is there (None: already as wanted). The PUT
        carries the resourceVersion as read: if anyone wrote since, it is a 409 and we re-read."""
        kind, name = obj["kind"], obj["metadata"]["name"]
        path = _path(kind, name)
        for _ in range(MAX_ATTEMPTS):
            status, current = await api.call("GET", path)
            if status == 404:
                status, data = await api.call("POST", _path(kind), obj)
            elif status == 200:
                body = update(current)
                if body is None:
                    return 0
                status, data = await api.call("PUT", path, body)
            else:
                raise api.fail("GET", path, status, current)
            if status == 409:  # created or changed by someone else meanwhile: read it again
                self.conflicts += 1
                log.info("higress: %s %s changed since read; re-reading", kind, name)
                continue
            if status not in (200, 201):
                raise api.fail("PUT/POST", path, status, data)
            return 1
        raise KubeError(f"{kind} {name}: still conflicting after {MAX_ATTEMPTS} attempts")

    async def _remove_others(self, api: _Api, kind: str, wanted: set[tuple[str, str]]) -> int:
        status, data = await api.call("GET", _path(kind), labelSelector=LABEL_SELECTOR)
        if status != 200:
            raise api.fail("GET", _path(kind), status, data)
        removed = 0
        for item in data.get("items") or []:
            name = item["metadata"]["name"]
            labels = item["metadata"].get("labels") or {}
            if (kind, name) in wanted or any(labels.get(k) != v for k, v in LABELS.items()):
                continue
            status, body = await api.call("DELETE", _path(kind, name))
            if status not in (200, 202, 404):  # 404: someone removed it first
                raise api.fail("DELETE", _path(kind, name), status, body)
            removed += status != 404
        return removed
