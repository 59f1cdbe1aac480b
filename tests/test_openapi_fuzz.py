"""Schemathesis over /openapi.json against the real in-process server, on each store: every operation, a fixed seed,
at most MAX_EXAMPLES cases per operation and phase (examples, coverage, fuzzing, and the stateful phase that
follows the document's links from what a POST creates to the operations on it).

It fails on any 5xx, any status the document does not declare, any response whose media type or body breaks
the document, and any schema-invalid request the server accepts (negative_data_rejection).

Three passes, one per kind of credential the routes take: an admin's session for everything a user calls, the
cluster token for /v2/agent/register, and a registered worker's token for the other /v2/agent routes.
Left out, with the reason: GET /v2/watch, a stream that by design never ends (its bounds are tested in
test_api.py and the watch tests). GET /v2/instances/{ref}/logs stays in: the worker registered here does not
answer, so a follow=1 request ends with a 502 like any other.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import aiohttp
import pytest

from maas_tui.client import MaasClient

SEED = 20261203
MAX_EXAMPLES = 25
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "negative_data_rejection")
NEVER_ENDS = "/v2/watch"
# Every store: text the database cannot hold, or rounds differently, shows up only on that store.
STORES = [pytest.param("sqlite", marks=pytest.mark.sqlite), pytest.param("postgres", marks=pytest.mark.postgres),
          pytest.param("mariadb", marks=pytest.mark.mariadb)]
STATELESS = "examples,coverage,fuzzing"


async def schemathesis(server_url: str, token: str, report: Path, *filters: str) -> tuple[int, str, dict]:
    command = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{server_url}/openapi.json",
               "-H", f"Authorization: Bearer {token}", "--checks", CHECKS, "--max-examples", str(MAX_EXAMPLES),
               "--seed", str(SEED), "--workers", "1", "--request-timeout", "30", "--no-color",
               "--generation-database", "none", "--report", "json", "--report-json-path", str(report), *filters]
    # A process of its own: the server it tests runs on this test's event loop.
    process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.STDOUT)
    try:
        output, _ = await asyncio.wait_for(process.communicate(), 400)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode, output.decode(errors="replace"), json.loads(report.read_text())


@pytest.mark.parametrize("store", STORES, indirect=True)
async def test_schemathesis_finds_no_5xx_no_undocumented_status_and_no_schema_violation(
        server, admin: MaasClient, tiny_model: Path, tmp_path: Path):
    # Something to find: a model (an instance follows) and a worker that never answers.
    await admin.create_model({"name": "tiny", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 1})
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/v2/agent/register", headers={"Authorization": f"Bearer {server.cluster_token}"},
                             json={"name": "fuzz-worker", "address": "127.0.0.1", "agent_port": 9}) as r:
            assert r.status == 201, await r.text()
            worker_token = (await r.json())["token"]

    passes = {
        "admin": (admin.token, ["--exclude-path", NEVER_ENDS, "--exclude-path-regex", "^/v2/agent/"]),
        # No links among the agent routes: no stateful phase for them.
        "registrar": (server.cluster_token, ["--include-path", "/v2/agent/register", "--phases", STATELESS]),
        "worker": (worker_token, ["--include-path-regex", "^/v2/agent/", "--exclude-path", "/v2/agent/register",
                                  "--phases", STATELESS]),
    }
    summary, failed = [], []
    for name, (token, filters) in passes.items():
        code, output, report = await schemathesis(server.url, token, tmp_path / f"{name}.json", *filters)
        cases = report["test_cases"]
        summary.append(f"{name}: {report['operations']['tested']} operations, {cases['generated']} cases, "
                       f"{cases['unique_failures']} failures, {len(report['errors'])} errors")
        if code != 0 or cases["unique_failures"] or report["errors"]:
            failed.append(f"--- pass {name} (exit {code}) ---\n{output[-20000:]}")
    print("\n".join(summary))
    assert not failed, "\n".join(summary + failed)
    async with aiohttp.ClientSession() as http:  # and the server is still well
        async with http.get(f"{server.url}/healthz") as r:
            assert (await r.json())["database"] == "ok"
