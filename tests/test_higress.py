"""Higress objects: valid against Higress's own CRD and plugin schemas (unknown fields rejected),
Ingresses valid for Kubernetes, and kept in sync on disk through deploy, scale and delete."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import eventually, free_port
from kube_api_double import CRDS, KUBERNETES_VERSION
from kube_api_double import FIXTURES as SCHEMAS  # copied from Higress, Apache-2.0: see NOTICE.md there
from kube_api_double import strict_schema as _strict
from maas_tui.client import MaasClient
from server.app import MaasServer
from server.config import ServerConfig
from server.higress.objects import Endpoint, build_objects, slug

MODEL_ROUTER = _strict(yaml.safe_load((SCHEMAS / "plugin-model-router.spec.yaml").read_text())
                       ["spec"]["configSchema"]["openAPIV3Schema"])


def validate(obj: dict[str, Any]) -> None:
    assert obj["metadata"]["namespace"] == "higress-system"
    if obj["kind"] == "Ingress":
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        return
    crd = CRDS[obj["kind"]]
    assert obj["apiVersion"] == crd["apiVersion"]
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
    jsonschema.validate({"spec": obj["spec"]}, crd["schema"])
    if obj["metadata"]["name"] == "maas-model-router":
        jsonschema.validate(obj["spec"]["defaultConfig"], MODEL_ROUTER)


def test_the_validator_rejects_unknown_fields():
    bridge = build_objects({}, Endpoint("10.0.0.1", 8080))[0]
    broken = copy.deepcopy(bridge)
    broken["spec"]["registries"][0]["domian"] = "typo"
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
    router = copy.deepcopy(build_objects({}, Endpoint("10.0.0.1", 8080))[1])
    router["spec"]["defaultConfig"]["modelToHeaders"] = "typo"
    with pytest.raises(jsonschema.ValidationError):
        validate(router)


def test_objects_for_ip_and_hostname_workers_are_valid():
    table = {"llama-3.1:8b": [Endpoint("10.0.0.5", 20001), Endpoint("10.0.0.6", 20000)],
             "qwen": [Endpoint("gpu-a.example", 20000), Endpoint("gpu-b.example", 20001), Endpoint("gpu-c.example", 1)],
             "idle": []}
    objects = build_objects(table, Endpoint("10.0.0.1", 8080))
    for obj in objects:
        validate(obj)
    bridge = objects[0]
    registries = {r["name"]: r for r in bridge["spec"]["registries"]}
    static = registries[f"maas-{slug('llama-3.1:8b')}"]
    assert (static["type"], static["domain"]) == ("static", "10.0.0.5:20001,10.0.0.6:20000")
    dns = [r for r in bridge["spec"]["registries"] if r["type"] == "dns"]
    assert sorted(r["domain"] for r in dns) == ["gpu-a.example", "gpu-b.example", "gpu-c.example"]
    ingresses = {o["metadata"]["annotations"].get("higress.io/exact-match-header-x-higress-llm-model"): o
                 for o in objects if o["kind"] == "Ingress"}
    assert set(ingresses) == {None, "llama-3.1:8b", "qwen"}  # None: the catch-all to the server; idle has none
    qwen = ingresses["qwen"]["metadata"]["annotations"]["higress.io/destination"].splitlines()
    assert [line.split("%")[0] for line in qwen] == ["34", "33", "33"]
    assert ingresses["llama-3.1:8b"]["spec"]["rules"][0]["http"]["paths"][0]["backend"]["resource"] == {
        "apiGroup": "networking.higress.io", "kind": "McpBridge", "name": "default"}


def _files(root: Path) -> dict[str, dict[str, Any]]:
    return {str(p.relative_to(root)): yaml.safe_load(p.read_text()) for p in sorted(root.rglob("*.yaml"))}


async def test_higress_files_follow_deploy_scale_and_delete(tmp_path: Path, tiny_model: Path):
    from agent.agent import Agent, AgentConfig

    root = tmp_path / "higress"
    (root / "ingresses").mkdir(parents=True)
    (root / "ingresses" / "someone-elses.yaml").write_text(yaml.safe_dump({"kind": "Ingress", "metadata": {"name": "x"}}))
    server = MaasServer(ServerConfig(data_dir=tmp_path / "data", port=free_port(), resync_interval=2.0,
                                     database_url=f"sqlite:///{tmp_path / 'maas.db'}", higress_dir=str(root)))
    await server.start()
    agent = Agent(AgentConfig(server_url=server.url, token=server.cluster_token or "", data_dir=tmp_path / "agent",
                              name="worker-1"))
    await agent.start()
    try:
        password = server.admin_password_file.read_text().strip()
        async with MaasClient(server.url) as anonymous:
            token = (await anonymous.login("admin", password)).token
        async with MaasClient(server.url, token) as admin:
            model_file = f"ingresses/maas-model-{slug('tiny')}.yaml"
            await admin.create_model({"name": "tiny", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 2})

            def endpoints() -> list[str]:
                bridge = _files(root).get("mcpbridges/default.yaml")
                registry = [r for r in (bridge or {"spec": {"registries": []}})["spec"]["registries"]
                            if r["name"] == f"maas-{slug('tiny')}"]
                return registry[0]["domain"].split(",") if registry else []

            async def two() -> bool:
                return len(endpoints()) == 2 and model_file in _files(root)
            await eventually(two, message="two endpoints in the McpBridge")
            for obj in _files(root).values():
                if obj.get("metadata", {}).get("name") != "x":
                    validate(obj)
            instances = await admin.list_instances("tiny")
            assert sorted(endpoints()) == sorted(f"127.0.0.1:{i.port}" for i in instances)
            exported = await admin.higress_objects()
            assert {o["metadata"]["name"] for o in exported} == {
                o["metadata"]["name"] for p, o in _files(root).items() if p != "ingresses/someone-elses.yaml"}

            await admin.update_model("tiny", {"replicas": 1})

            async def one() -> bool:
                return len(endpoints()) == 1
            await eventually(one, message="one endpoint after scaling down")

            await admin.delete_model("tiny")

            async def gone() -> bool:
                return model_file not in _files(root) and endpoints() == []
            await eventually(gone, message="the model's Ingress and registry removed")
            assert "ingresses/someone-elses.yaml" in _files(root)  # not ours: left alone
            assert "ingresses/maas-server.yaml" in _files(root)
    finally:
        await agent.stop()
        await server.stop()


async def test_forward_auth_checks_key_and_model(server: MaasServer, admin: MaasClient):
    import aiohttp

    limited = (await admin.request("POST", "/v2/keys", json_body={"name": "one-model", "scopes": ["inference"],
                                                                  "allowed_models": ["a"]}))["key"]
    async with aiohttp.ClientSession() as http:
        async def status(key: str | None, model: str | None) -> int:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            if model:
                headers["x-higress-llm-model"] = model
            async with http.post(f"{server.url}/v2/gateway/authorize", headers=headers) as response:
                return response.status

        assert await status(limited, "a") == 200
        assert await status(limited, "b") == 403
        assert await status(limited, None) == 400
        assert await status(None, "a") == 401
        assert await status("maas_nope_nope", "a") == 401
