"""Building Higress objects from the models and their running instances. Pure: no I/O.

Per model: one registry in the shared McpBridge `default` (a `static` registry with the
comma-separated IP:port list, or one `dns` registry per replica where a worker is
known by host name) and an Ingress that matches `x-higress-llm-model` exactly. Once per
gateway: the model-router plugin (body `model` -> that header), forward auth to the
MaaS server (keys are stored only hashed, so Higress cannot hold them), and a catch-all
Ingress to the server for `/v1/models` and the rest.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

NAMESPACE = "higress-system"
MODEL_HEADER = "x-higress-llm-model"
BRIDGE_NAME = "default"
SERVER_REGISTRY = "maas-server"  # starts with REGISTRY_PREFIX: ours
PLUGIN_REGISTRY = "oci://higress-registry.cn-hangzhou.cr.aliyuncs.com/plugins"
LABELS = {"app.kubernetes.io/managed-by": "maas"}
REGISTRY_PREFIX = "maas-"  # McpBridge registries MaaS owns; the bridge is shared with other writers


def is_managed_registry(registry: dict[str, Any]) -> bool:
    return str(registry.get("name", "")).startswith(REGISTRY_PREFIX)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def slug(name: str) -> str:
    """A DNS-1123 name for a model name (which may hold dots, colons and capitals)."""
    base = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40] or "model"
    return f"{base}-{hashlib.sha256(name.encode()).hexdigest()[:6]}"


def _metadata(name: str) -> dict[str, Any]:
    return {"name": name, "namespace": NAMESPACE, "labels": dict(LABELS)}


def model_registries(model: str, endpoints: list[Endpoint]) -> list[dict[str, Any]]:
    """McpBridge registries serving one model (none while nothing runs)."""
    if not endpoints:
        return []
    ordered = sorted(set(endpoints), key=lambda e: (e.host, e.port))
    if all(_is_ip(e.host) for e in ordered):
        return [{"name": f"{REGISTRY_PREFIX}{slug(model)}", "type": "static", "protocol": "http", "port": 80,
                 "domain": ",".join(f"{e.host}:{e.port}" for e in ordered)}]
    return [{"name": f"{REGISTRY_PREFIX}{slug(model)}-{i}", "type": "dns", "protocol": "http", "domain": e.host, "port": e.port}
            for i, e in enumerate(ordered)]


def _destination(registries: list[dict[str, Any]]) -> str:
    services = [f"{r['name']}.{r['type']}:{r['port']}" for r in registries]
    if len(services) == 1:
        return services[0]
    weights = [100 // len(services)] * len(services)
    weights[0] += 100 - sum(weights)
    return "\n".join(f"{w}% {s}" for w, s in zip(weights, services))


def _ingress(name: str, path: str, annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {**_metadata(name), "annotations": annotations},
        "spec": {
            "ingressClassName": "higress",
            "rules": [{"http": {"paths": [{"path": path, "pathType": "Prefix", "backend": {"resource": {
                "apiGroup": "networking.higress.io", "kind": "McpBridge", "name": BRIDGE_NAME}}}]}}],
        },
    }


def model_ingress(model: str, registries: list[dict[str, Any]]) -> dict[str, Any]:
    return _ingress(f"maas-model-{slug(model)}", "/v1", {
        f"higress.io/exact-match-header-{MODEL_HEADER}": model,
        "higress.io/destination": _destination(registries),
        "higress.io/load-balance": "least_conn",
        "higress.io/proxy-next-upstream": "error,timeout,http_502,http_503",
        "higress.io/proxy-next-upstream-tries": "2",
        "higress.io/proxy-next-upstream-timeout": "30",
    })


def server_ingress() -> dict[str, Any]:
    """Everything that no model Ingress matches goes to the MaaS server (and its gateway)."""
    return _ingress("maas-server", "/", {"higress.io/destination": f"{SERVER_REGISTRY}.static:80"})


def mcp_bridge(registries: list[dict[str, Any]], server: Endpoint) -> dict[str, Any]:
    server_registry = {"name": SERVER_REGISTRY, "type": "static", "protocol": "http", "port": 80,
                       "domain": f"{server.host}:{server.port}"}
    return {"apiVersion": "networking.higress.io/v1", "kind": "McpBridge", "metadata": _metadata(BRIDGE_NAME),
            "spec": {"registries": [server_registry, *registries]}}


def model_router_plugin() -> dict[str, Any]:
    return {"apiVersion": "extensions.higress.io/v1alpha1", "kind": "WasmPlugin",
            "metadata": _metadata("maas-model-router"),
            "spec": {"phase": "AUTHN", "priority": 900, "url": f"{PLUGIN_REGISTRY}/model-router:2.0.0",
                     "defaultConfigDisable": False,
                     "defaultConfig": {"enable": True, "modelKey": "model", "modelToHeader": MODEL_HEADER,
                                       "enableOnPathSuffix": ["/completions", "/embeddings", "/rerank",
                                                              "/audio/speech", "/images/generations"]}}}


def auth_plugin() -> dict[str, Any]:
    """Forward auth: Higress asks the server whether the key may use the model in the header."""
    return {"apiVersion": "extensions.higress.io/v1alpha1", "kind": "WasmPlugin",
            "metadata": _metadata("maas-ext-auth"),
            "spec": {"phase": "AUTHN", "priority": 360, "failStrategy": "FAIL_CLOSE",
                     "url": f"{PLUGIN_REGISTRY}/ext-auth:2.0.0", "defaultConfigDisable": False,
                     "defaultConfig": {
                         "http_service": {
                             "endpoint_mode": "forward_auth",
                             "endpoint": {"service_name": f"{SERVER_REGISTRY}.static", "service_port": 80,
                                          "path": "/v2/gateway/authorize", "request_method": "POST"},
                             "timeout": 2000,
                             "authorization_request": {"allowed_headers": [
                                 {"exact": "authorization"}, {"exact": "x-api-key"}, {"exact": MODEL_HEADER}]},
                         },
                         "status_on_error": 503,
                     }}}


def build_objects(models: dict[str, list[Endpoint]], server: Endpoint) -> list[dict[str, Any]]:
    """Every object for the current table: model -> endpoints of its running instances."""
    registries: list[dict[str, Any]] = []
    ingresses: list[dict[str, Any]] = []
    for model in sorted(models):
        serving = model_registries(model, models[model])
        if serving:
            registries += serving
            ingresses.append(model_ingress(model, serving))
    return [mcp_bridge(registries, server), model_router_plugin(), auth_plugin(), server_ingress(), *ingresses]


PLURALS = {"McpBridge": "mcpbridges", "Ingress": "ingresses", "WasmPlugin": "wasmplugins"}
