"""Shared fixtures: a tiny GGUF model, an in-process server on SQLite, a local agent, clients.

The fast tier runs the real server and agent in the test's event loop over real HTTP on
127.0.0.1 with SQLite; the integration tier (test_integration.py) runs them as separate
processes on the embedded PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_gguf import write_tiny_gguf  # noqa: E402

from agent.agent import Agent, AgentConfig  # noqa: E402
from maas_tui.client import MaasClient  # noqa: E402
from server.app import MaasServer  # noqa: E402
from server.config import ServerConfig  # noqa: E402


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30.0, interval: float = 0.1,
                     message: str = "condition") -> None:
    """Poll `check` until it is true; a bounded wait, never a fixed sleep."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if await check():
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message}")
        await asyncio.sleep(interval)


@pytest.fixture(scope="session")
def traversable_tmp() -> Path:
    """A temp folder the `postgres` user can traverse (pytest's own tmp root is 0700)."""
    base = Path(tempfile.mkdtemp(prefix="maas-tests-", dir="/tmp"))
    os.chmod(base, 0o711)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model(traversable_tmp: Path) -> Path:
    return write_tiny_gguf(traversable_tmp / "tiny.gguf", seed=0)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[MaasServer]:
    config = ServerConfig(data_dir=tmp_path / "data", port=free_port(),
                          database_url=f"sqlite:///{tmp_path / 'maas.db'}", resync_interval=2.0)
    srv = MaasServer(config)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def admin(server: MaasServer) -> AsyncIterator[MaasClient]:
    """A client logged in as the admin with the generated first-start password."""
    password = server.admin_password_file.read_text().strip()
    async with MaasClient(server.url) as anonymous:
        token = (await anonymous.login("admin", password)).token
    async with MaasClient(server.url, token) as client:
        yield client


@pytest.fixture
async def api_key(admin: MaasClient) -> str:
    return (await admin.create_key("tests")).key


@pytest.fixture
async def agent(server: MaasServer, tmp_path: Path) -> AsyncIterator[Agent]:
    local = Agent(AgentConfig(server_url=server.url, token=server.cluster_token or "", data_dir=tmp_path / "agent",
                              name="worker-1", address="127.0.0.1", heartbeat_interval=1.0, drain_seconds=1.0))
    await local.start()
    await asyncio.wait_for(local.registered.wait(), 10)
    try:
        yield local
    finally:
        await local.stop()
