"""How long from `POST /v2/models` to every replica `running`, against starting the same
llama.cpp processes by hand (the baseline), in one run on this machine.

    .venv/bin/python bench/deploy.py [--replicas 2] [--rounds 9] [--database embedded|sqlite]

Prints a table and, last, `RESULT key=value ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from conftest import free_port  # noqa: E402
from tiny_gguf import write_tiny_gguf  # noqa: E402

from agent.agent import Agent, AgentConfig  # noqa: E402
from maas_tui.client import MaasClient  # noqa: E402
from server.app import MaasServer  # noqa: E402
from server.config import ServerConfig  # noqa: E402


async def direct_start(model: Path, replicas: int) -> float:
    """Baseline: spawn the backend processes ourselves and wait for /health."""
    started = time.perf_counter()
    ports = [free_port() for _ in range(replicas)]
    processes = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.backends.llamacpp_server", "--model", str(model), "--alias", "tiny",
        "--host", "127.0.0.1", "--port", str(port), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, start_new_session=True) for port in ports]
    async with aiohttp.ClientSession() as http:
        for port in ports:
            while True:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/health") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    for process in processes:
        process.terminate()
        await process.wait()
    return elapsed


async def deploy_through_maas(client: MaasClient, model: Path, replicas: int, name: str) -> float:
    started = time.perf_counter()
    await client.create_model({"name": name, "source": str(model), "backend": "llama.cpp", "replicas": replicas})
    while True:
        instances = await client.list_instances(name)
        if len(instances) == replicas and all(i.state == "running" for i in instances):
            elapsed = time.perf_counter() - started
            break
        await asyncio.sleep(0.01)
    await client.delete_model(name)
    while await client.list_instances(name):
        await asyncio.sleep(0.05)
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--database", choices=["embedded", "sqlite"], default="embedded")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="maas-bench-", dir="/tmp"))
    os.chmod(base, 0o711)
    model = write_tiny_gguf(base / "tiny.gguf")
    url = f"sqlite:///{base / 'maas.db'}" if args.database == "sqlite" else None
    server = MaasServer(ServerConfig(data_dir=base / "data", port=free_port(), database_url=url))
    await server.start()
    agent = Agent(AgentConfig(server_url=server.url, token=server.cluster_token or "", data_dir=base / "agent",
                              name="bench-worker"))
    await agent.start()
    await agent.registered.wait()
    try:
        password = server.admin_password_file.read_text().strip()
        async with MaasClient(server.url) as anonymous:
            token = (await anonymous.login("admin", password)).token
        direct, maas = [], []
        async with MaasClient(server.url, token) as client:
            for round_no in range(args.rounds):
                direct.append(await direct_start(model, args.replicas))
                maas.append(await deploy_through_maas(client, model, args.replicas, f"bench-{round_no}"))
    finally:
        await agent.stop()
        await server.stop()
        shutil.rmtree(base, ignore_errors=True)

    d, m = statistics.median(direct), statistics.median(maas)
    print(f"deploy of {args.replicas} llama.cpp replicas, {args.rounds} rounds, database: {args.database}")
    print(f"{'path':<34}{'median s':>10}{'min s':>10}{'max s':>10}")
    print(f"{'direct: spawn + /health':<34}{d:>10.3f}{min(direct):>10.3f}{max(direct):>10.3f}")
    print(f"{'maas: POST -> all running':<34}{m:>10.3f}{min(maas):>10.3f}{max(maas):>10.3f}")
    print(f"RESULT replicas={args.replicas} deploy_s={m:.3f} direct_s={d:.3f} overhead_s={m - d:.3f} ratio={m / d:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
