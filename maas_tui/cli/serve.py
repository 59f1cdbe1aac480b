"""Long-running commands: `maas start` (server + local agent) and `maas agent`."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from pathlib import Path
from typing import Any, Coroutine

import typer

from maas_tui.cli.output import console, print_error


def _setup_logging(level: str) -> None:
    numeric = getattr(logging, level.upper(), None)
    if not isinstance(numeric, int):
        print_error(f"unknown log level {level!r}")
        raise typer.Exit(2)
    logging.basicConfig(level=numeric, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _run_until_signal(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop

        uvloop.run(main)
    except ImportError:
        asyncio.run(main)


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def parse_labels(items: list[str]) -> dict[str, str]:
    """`k=v,k2=v2` items (repeatable) as a dict."""
    labels: dict[str, str] = {}
    for item in items:
        for pair in filter(None, (p.strip() for p in item.split(","))):
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise ValueError(f"{pair!r}: write KEY=VALUE")
            labels[key] = value
    return labels


def run_start(*, data_dir: Path | None, host: str | None, port: int | None, database_url: str | None, no_agent: bool,
              simulate_gpus: str | None, log_level: str, extra: dict[str, object] | None = None,
              ssh_port: int | None = None, ssh_max_sessions: int = 16) -> None:
    from agent.agent import Agent, AgentConfig
    from agent.devices import DeviceSpecError, parse_simulated
    from server.app import MaasServer
    from server.heap import settle as settle_heap
    from server.config import ServerConfig
    from server.db.embedded import EmbeddedPostgresError
    from server.leader import StoreInUse

    _setup_logging(log_level)
    if simulate_gpus:
        try:
            parse_simulated(simulate_gpus)
        except DeviceSpecError as exc:
            print_error(f"--simulate-gpus: {exc}")
            raise typer.Exit(2) from None
    try:
        config = ServerConfig.from_env(data_dir=data_dir, host=host, port=port, database_url=database_url,
                                       **(extra or {}))
    except ValueError as exc:  # e.g. MAAS_PORT=abc
        print_error(f"bad configuration: {exc}")
        raise typer.Exit(2) from None

    async def main() -> None:
        server = MaasServer(config)
        agent = None
        door = None
        try:
            await server.start()
            if ssh_port is not None:
                from maas_tui.ssh.server import SshConfig, TuiFrontDoor
                from server.services.ssh_sessions import InProcessSshBackend

                door = TuiFrontDoor(InProcessSshBackend(server), SshConfig(host=config.host, port=ssh_port,
                                                                           data_dir=config.data_dir,
                                                                           max_sessions=ssh_max_sessions))
                await door.start()
            if not no_agent:
                agent = Agent(AgentConfig(server_url=server.url, token=server.cluster_token or "",
                                          data_dir=config.data_dir / "agent", name=socket.gethostname(),
                                          address="127.0.0.1", simulate_gpus=simulate_gpus,
                                          model_roots=config.local_model_roots()))
                await agent.start()
            _banner(server, agent is not None)
            settle_heap()  # started: what exists now lives as long as the process (server/heap.py)
            if door is not None:
                console.print(f"  TUI over SSH:    ssh -p {door.port} USER@{config.host}  (add a key: maas user add-key USER --key-file ~/.ssh/id_ed25519.pub)",
                              highlight=False, soft_wrap=True)
            await _wait_for_signal()
            console.print("stopping...")
        finally:
            if door is not None:
                await door.stop()
            if agent is not None:
                await agent.stop()
            await server.stop()

    try:
        _run_until_signal(main())
    except EmbeddedPostgresError as exc:
        print_error(str(exc))
        raise typer.Exit(1) from None
    except StoreInUse as exc:  # a second server on SQLite or MySQL: one line, nothing written
        print_error(str(exc))
        raise typer.Exit(2) from None
    except OSError as exc:
        if _database_error(exc, config):  # refused, or a TLS failure, while connecting to the database
            raise typer.Exit(1) from None
        print_error(f"cannot start the server on {config.host}:{config.port}: {exc.strerror or exc}")
        raise typer.Exit(1) from None
    except ValueError as exc:  # a bad --database-url (scheme, TLS options)
        print_error(str(exc))
        raise typer.Exit(2) from None
    except Exception as exc:
        if not _database_error(exc, config):
            raise
        raise typer.Exit(1) from None


def _database_error(exc: BaseException, config: Any) -> bool:
    """Print one line and say True when `exc` means the database cannot be reached or used."""
    from server.api.errors import database_unavailable

    if not database_unavailable(exc):
        return False
    reason = str(getattr(exc, "orig", None) or exc).splitlines()[0] or type(exc).__name__
    where = _without_password(config.database_url) if config.database_url else "(the embedded PostgreSQL)"
    print_error(f"cannot use the database {where}: {reason}")
    return True


def _without_password(url: str | None) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True) if url else ""


def _banner(server, with_agent: bool) -> None:
    config = server.config
    lines = [
        f"MaaS-Base {server.version} is up at {server.url}",
        f"  data folder:     {config.data_dir}",
        f"  database:        {'embedded PostgreSQL' if server.embedded else 'external: ' + _without_password(config.database_url)}",
        f"  admin password:  {server.admin_password_file}",
        f"  worker token:    {server.token_file}",
        f"  local agent:     {'running' if with_agent else 'off (--no-agent)'}",
        "",
        f"  log in:          maas login --server {server.url} --username admin --password \"$(cat {server.admin_password_file})\"",
        f"  add a worker:    maas agent --server-url {server.url} --token \"$(cat {server.token_file})\" --address <worker-ip>",
        f"  OpenAI API:      {server.url}/v1  (create a key: maas key create NAME)",
    ]
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)


def run_agent(*, server_url: str, token: str, name: str | None, address: str, port: int, data_dir: Path | None,
              simulate_gpus: str | None, runtime: str, log_level: str, drain_seconds: float = 5.0,
              drain_max_seconds: float = 120.0,
              labels: list[str] | None = None, port_range: str | None = None, model_cache: Path | None = None,
              ray_port_range: str | None = None, model_roots: list[str] | None = None,
              cache_limit: str | None = None) -> None:
    import platformdirs

    from agent.agent import Agent, AgentConfig, ServerRejected
    from agent.sources import env_model_roots
    from agent.devices import DeviceSpecError
    from agent.ports import DEFAULT_RANGE, DEFAULT_RAY_RANGE, PortRangeError, ephemeral_range, parse_port_range, \
        parse_ray_port_range

    from server.schemas import address_problem

    _setup_logging(log_level)
    if problem := address_problem(address):  # the rule of the wire contract, before anything starts
        print_error(f"--address: {problem}")
        raise typer.Exit(2)
    if runtime not in ("auto", "process", "docker"):
        print_error(f"--runtime must be auto, docker or process, not {runtime!r}")
        raise typer.Exit(2)
    try:
        worker_labels = parse_labels(labels or [])
    except ValueError as exc:
        print_error(f"--labels: {exc}")
        raise typer.Exit(2) from None
    try:
        ports = parse_port_range(port_range, ephemeral_range()) if port_range else DEFAULT_RANGE
    except PortRangeError as exc:
        print_error(f"--port-range: {exc}")
        raise typer.Exit(2) from None
    try:
        ray_ports = parse_ray_port_range(ray_port_range, ports, ephemeral_range()) if ray_port_range \
            else DEFAULT_RAY_RANGE
    except PortRangeError as exc:
        print_error(f"--ray-port-range: {exc}")
        raise typer.Exit(2) from None
    from agent.cache import parse_limit
    try:
        cache_bytes = parse_limit(cache_limit)
    except ValueError as exc:
        print_error(f"--cache-limit: {exc}")
        raise typer.Exit(2) from None
    worker_name = name or socket.gethostname()
    folder = data_dir or Path(platformdirs.user_data_dir("maas")) / f"agent-{worker_name}"
    try:
        config = AgentConfig(server_url=server_url.rstrip("/"), token=token, data_dir=folder, name=worker_name,
                             address=address, port=port, simulate_gpus=simulate_gpus, drain_seconds=drain_seconds,
                             drain_max_seconds=drain_max_seconds,
                             runtime=runtime, labels=worker_labels, port_range=ports, ray_port_range=ray_ports,
                             model_cache=model_cache.absolute() if model_cache else None,
                             model_roots=list(model_roots) if model_roots else env_model_roots(),
                             cache_limit=cache_bytes)
        agent = Agent(config)
    except DeviceSpecError as exc:
        print_error(f"--simulate-gpus: {exc}")
        raise typer.Exit(2) from None
    except Exception as exc:  # docker.errors.DockerException: --runtime docker without an engine
        if runtime != "docker":
            raise
        print_error(f"--runtime docker: no Docker engine answers here ({exc}); "
                    "use --runtime process or auto")
        raise typer.Exit(1) from None

    async def main() -> None:
        await agent.start()
        waiter = asyncio.create_task(_wait_for_signal())
        try:
            await asyncio.wait([waiter, agent.main_task], return_when=asyncio.FIRST_COMPLETED)
            if agent.main_task.done() and agent.main_task.exception():
                raise agent.main_task.exception()  # e.g. the server refused registration
        finally:
            waiter.cancel()
            await agent.stop()

    try:
        _run_until_signal(main())
    except ServerRejected as exc:
        print_error(str(exc))
        raise typer.Exit(1) from None
    except OSError as exc:
        print_error(str(exc))
        raise typer.Exit(1) from None
