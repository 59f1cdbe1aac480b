"""Higress through the Kubernetes API. No real kube-apiserver is installable here, so these run
against tests/kube_api_double.py, a TEST DOUBLE that serves the REST paths over real HTTPS,
with Kubernetes' resourceVersion/409 semantics and Higress's CRD schemas (unknown fields rejected)."""

from __future__ import annotations

import asyncio
import base64
import re
from pathlib import Path

import aiohttp
import pytest

from conftest import eventually, free_port
from typer.testing import CliRunner

from kube_api_double import KubeApiDouble, make_pki, server_tls, write_kubeconfig
from maas_tui.cli.main import app as cli_app
from maas_tui.client import MaasClient
from server.app import MaasServer
from server.config import ServerConfig
from server.higress.kube import KubeApplier, KubeConfigError, KubeError
from server.higress.objects import Endpoint, build_objects, slug

pytestmark = pytest.mark.timeout(180)
BRIDGE = "/apis/networking.higress.io/v1/namespaces/higress-system/mcpbridges/default"
OTHER_REGISTRY = {"name": "nacos-prod", "type": "nacos2", "domain": "10.9.9.9", "port": 8848,
                  "nacosNamespaceId": "public"}
FOREIGN_INGRESS = {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                   "metadata": {"name": "someone-elses", "namespace": "higress-system"},
                   "spec": {"ingressClassName": "higress", "rules": [{"http": {"paths": [{
                       "path": "/other", "pathType": "Prefix",
                       "backend": {"service": {"name": "other", "port": {"number": 80}}}}]}}]}}


@pytest.fixture
async def cluster(tmp_path: Path):
    """The double over HTTPS with a cluster CA, and a token kubeconfig for it."""
    pki = make_pki(tmp_path / "pki")
    double = KubeApiDouble(token="s3cret", tls=server_tls(pki))
    url = await double.start()
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", url, {"token": "s3cret"},
                                  {"certificate-authority": str(pki["ca"]) + ".crt"})
    try:
        yield double, kubeconfig, pki
    finally:
        await double.stop()


async def _as_other_writer(double: KubeApiDouble, method: str, path: str, body: dict | None = None) -> dict:
    """Another client of the same API server (over HTTPS, with its own credentials)."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {double.token}"}) as http:
        async with http.request(method, double.url + path, json=body, ssl=False) as response:
            assert response.status in (200, 201), await response.text()
            return await response.json()


async def _seed(double: KubeApiDouble) -> None:
    """What other writers already keep in the namespace: a registry in the shared bridge, an Ingress."""
    await _as_other_writer(double, "POST", BRIDGE.rsplit("/", 1)[0], {
        "apiVersion": "networking.higress.io/v1", "kind": "McpBridge",
        "metadata": {"name": "default", "namespace": "higress-system"}, "spec": {"registries": [OTHER_REGISTRY]}})
    await _as_other_writer(double, "POST", "/apis/networking.k8s.io/v1/namespaces/higress-system/ingresses",
                           FOREIGN_INGRESS)


def _registries(double: KubeApiDouble) -> dict[str, dict]:
    bridge = double.objects("mcpbridges").get("default") or {"spec": {"registries": []}}
    return {r["name"]: r for r in bridge["spec"]["registries"]}


async def test_kubeconfig_credentials(cluster, tmp_path: Path):
    double, kubeconfig, pki = cluster
    objects = build_objects({"m": [Endpoint("10.0.0.5", 20000)]}, Endpoint("10.0.0.1", 8080))
    assert await KubeApplier(kubeconfig).apply(objects) == (len(objects), 0)
    assert await KubeApplier(kubeconfig).apply(objects) == (0, 0)  # in sync: nothing written

    # A client certificate (inline data) instead of a token; the CA inline too.
    data = {stem: base64.b64encode(Path(f"{pki[stem]}.{ext}").read_bytes()).decode()
            for stem, ext in (("ca", "crt"), ("client", "crt"))}
    key = base64.b64encode(Path(f"{pki['client']}.key").read_bytes()).decode()
    by_cert = write_kubeconfig(tmp_path / "by-cert", double.url,
                               {"client-certificate-data": data["client"], "client-key-data": key},
                               {"certificate-authority-data": data["ca"]})
    assert await KubeApplier(by_cert).apply(objects) == (0, 0)

    wrong_token = write_kubeconfig(tmp_path / "wrong", double.url, {"token": "nope"},
                                   {"certificate-authority": f"{pki['ca']}.crt"})
    with pytest.raises(KubeError, match="HTTP 401"):
        await KubeApplier(wrong_token).apply(objects)
    untrusted = write_kubeconfig(tmp_path / "untrusted", double.url, {"token": "s3cret"})  # no CA: system roots
    with pytest.raises(KubeError, match="cannot reach|certificate"):
        await KubeApplier(untrusted).apply(objects)
    plugin = write_kubeconfig(tmp_path / "exec", double.url, {"exec": {"command": "aws"}})
    with pytest.raises(KubeConfigError, match="exec"):
        await KubeApplier(plugin).apply(objects)
    with pytest.raises(KubeConfigError, match="cannot read"):
        await KubeApplier(tmp_path / "missing").apply(objects)


async def test_in_cluster_service_account(cluster, tmp_path: Path, monkeypatch):
    """`--higress-kubeconfig in-cluster`: the pod's service account token and CA, the service's address."""
    from server.higress import kube

    double, _kubeconfig, pki = cluster
    objects = build_objects({"m": [Endpoint("10.0.0.5", 20000)]}, Endpoint("10.0.0.1", 8080))
    with pytest.raises(KubeConfigError, match="KUBERNETES_SERVICE_HOST"):
        await KubeApplier(kube.IN_CLUSTER).apply(objects)
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "ca.crt").write_bytes(Path(f"{pki['ca']}.crt").read_bytes())
    monkeypatch.setattr(kube, "SERVICE_ACCOUNT", account)
    host, port = double.url.removeprefix("https://").rsplit(":", 1)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
    with pytest.raises(KubeConfigError, match="service account"):  # no token file yet
        await KubeApplier(kube.IN_CLUSTER).apply(objects)
    (account / "token").write_text("s3cret\n")
    assert await KubeApplier(kube.IN_CLUSTER).apply(objects) == (len(objects), 0)
    assert double.objects("mcpbridges")["default"]["spec"]["registries"]


async def test_the_double_rejects_what_kubernetes_would(cluster):
    """The double is only worth its tests if it refuses what the real API server refuses."""
    double, kubeconfig, _ = cluster
    objects = build_objects({}, Endpoint("10.0.0.1", 8080))
    await KubeApplier(kubeconfig).apply(objects)
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer s3cret"}) as http:
        async def put(body: dict) -> tuple[int, dict]:
            async with http.put(double.url + BRIDGE, json=body, ssl=False) as response:
                return response.status, await response.json()

        current = double.objects("mcpbridges")["default"]
        typo = {**current, "spec": {"registries": [{**OTHER_REGISTRY, "domian": "x"}]}}
        assert (await put(typo))[0] == 400
        wrong_type = {**current, "spec": {"registries": [{**OTHER_REGISTRY, "port": "eighty"}]}}
        assert (await put(wrong_type))[0] == 422
        stale = {**current, "metadata": {**current["metadata"], "resourceVersion": "1"}}
        status, body = await put(stale)
        assert (status, body["reason"]) == (409, "Conflict") and "has been modified" in body["message"]


async def test_concurrent_writer_conflict_is_retried_and_both_changes_survive(cluster):
    double, kubeconfig, _ = cluster
    await _seed(double)
    applier = KubeApplier(kubeconfig)
    staged = False

    async def between_read_and_write(method: str, path: str) -> None:
        """Right after the applier read the bridge, another writer adds its registry."""
        nonlocal staged
        if method == "GET" and path == BRIDGE and not staged:
            staged = True
            bridge = await _as_other_writer(double, "GET", BRIDGE)
            bridge["spec"]["registries"].append({"name": "eureka-x", "type": "eureka", "domain": "10.8.8.8",
                                                 "port": 8761})
            await _as_other_writer(double, "PUT", BRIDGE, bridge)

    double.before_reply = between_read_and_write
    table = {"llama": [Endpoint("10.0.0.5", 20000), Endpoint("10.0.0.6", 20001)]}
    await applier.apply(build_objects(table, Endpoint("10.0.0.1", 8080)))
    double.before_reply = None

    puts = [status for method, path, status in double.log if method == "PUT" and path == BRIDGE]
    assert puts == [200, 409, 200]  # the other writer's, ours refused as stale, ours again after re-reading
    assert applier.conflicts == 1
    registries = _registries(double)
    assert set(registries) == {"nacos-prod", "eureka-x", "maas-server", f"maas-{slug('llama')}"}
    assert registries[f"maas-{slug('llama')}"]["domain"] == "10.0.0.5:20000,10.0.0.6:20001"
    assert registries["nacos-prod"] == OTHER_REGISTRY

    # The model goes away: its Ingress and registry too; other writers' objects stay.
    assert f"maas-model-{slug('llama')}" in double.objects("ingresses")
    written, removed = await applier.apply(build_objects({}, Endpoint("10.0.0.1", 8080)))
    assert (written, removed) == (1, 1)
    assert set(_registries(double)) == {"nacos-prod", "eureka-x", "maas-server"}
    assert set(double.objects("ingresses")) == {"maas-server", "someone-elses"}


async def _metrics(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(f"{url}/metrics") as response:
        return await response.text()


def _sync_up(text: str) -> float | None:
    match = re.search(r'^maas_higress_sync_up\{applier="kubernetes",[^}]*\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else None


async def test_deploy_scale_delete_follow_through_the_api(cluster, tmp_path: Path, tiny_model: Path):
    from agent.agent import Agent, AgentConfig

    double, kubeconfig, _ = cluster
    await _seed(double)
    server = MaasServer(ServerConfig(data_dir=tmp_path / "data", port=free_port(), resync_interval=2.0,
                                     database_url=f"sqlite:///{tmp_path / 'maas.db'}",
                                     higress_kubeconfig=str(kubeconfig)))
    await server.start()
    agent = Agent(AgentConfig(server_url=server.url, token=server.cluster_token or "", data_dir=tmp_path / "agent",
                              name="worker-1"))
    await agent.start()
    registry, ingress = f"maas-{slug('tiny')}", f"maas-model-{slug('tiny')}"
    try:
        password = server.admin_password_file.read_text().strip()
        async with MaasClient(server.url) as anonymous:
            token = (await anonymous.login("admin", password)).token
        async with MaasClient(server.url, token) as admin, aiohttp.ClientSession() as http:
            await admin.create_model({"name": "tiny", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 2})

            def endpoints() -> list[str]:
                found = _registries(double).get(registry)
                return found["domain"].split(",") if found else []

            async def two() -> bool:
                return len(endpoints()) == 2 and ingress in double.objects("ingresses")
            await eventually(two, message="two endpoints in the McpBridge")
            instances = await admin.list_instances("tiny")
            assert sorted(endpoints()) == sorted(f"127.0.0.1:{i.port}" for i in instances)
            assert {"maas-model-router", "maas-ext-auth"} <= set(double.objects("wasmplugins"))
            assert _sync_up(await _metrics(http, server.url)) == 1.0

            await admin.update_model("tiny", {"replicas": 1})

            async def one() -> bool:
                return len(endpoints()) == 1
            await eventually(one, message="one endpoint after scaling down")

            await admin.delete_model("tiny")

            async def gone() -> bool:
                return ingress not in double.objects("ingresses") and not endpoints()
            await eventually(gone, message="the model's Ingress and registry removed")
            assert "nacos-prod" in _registries(double) and "someone-elses" in double.objects("ingresses")
            assert not [entry for entry in double.log if entry[2] >= 400 and entry[2] != 404]
    finally:
        await agent.stop()
        await server.stop()


async def test_unreachable_api_server_is_reported_and_recovers(tmp_path: Path):
    pki = make_pki(tmp_path / "pki")
    port = free_port()  # nothing listens here yet
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"https://127.0.0.1:{port}", {"token": "s3cret"},
                                  {"certificate-authority": f"{pki['ca']}.crt"})
    server = MaasServer(ServerConfig(data_dir=tmp_path / "data", port=free_port(), resync_interval=2.0,
                                     database_url=f"sqlite:///{tmp_path / 'maas.db'}",
                                     higress_kubeconfig=str(kubeconfig)))
    await server.start()
    double = KubeApiDouble(token="s3cret", tls=server_tls(pki))
    try:
        async with aiohttp.ClientSession() as http:
            async def reported_down() -> bool:
                text = await _metrics(http, server.url)
                failures = re.search(r'^maas_higress_sync_failures_total\{applier="kubernetes",[^}]*\} (\S+)$',
                                     text, re.M)
                return _sync_up(text) == 0.0 and failures is not None and float(failures.group(1)) >= 2
            await eventually(reported_down, message="the failing sync in /metrics")
            async with http.get(f"{server.url}/healthz") as response:
                assert response.status == 200
            password = server.admin_password_file.read_text().strip()
            async with MaasClient(server.url) as anonymous:
                token = (await anonymous.login("admin", password)).token
            async with MaasClient(server.url, token) as admin:
                sync = (await admin.request("GET", "/v2/gateway/higress"))["sync"]
                key = (await admin.create_key("ops", scopes=["management"])).key
            assert sync[0]["applier"] == "kubernetes" and sync[0]["ok"] is False
            assert "cannot reach the Kubernetes API" in sync[0]["error"]
            env = {"MAAS_SERVER": server.url, "MAAS_API_KEY": key, "MAAS_CONFIG": str(tmp_path / "cli.json"),
                   "COLUMNS": "250"}
            shown = await asyncio.to_thread(CliRunner().invoke, cli_app, ["gateway", "higress", "status"], env=env)
            assert shown.exit_code == 0 and "kubernetes" in shown.output and "NO" in shown.output, shown.output

            await double.start(port)  # the API server comes up: the next retry succeeds

            async def recovered() -> bool:
                return _sync_up(await _metrics(http, server.url)) == 1.0
            await eventually(recovered, message="the sync to recover")
            assert "maas-server" in double.objects("ingresses")
    finally:
        await server.stop()
        await double.stop()
