"""Service ports: the configured range, checked against the kernel's ephemeral range, free before use,
never handed out twice while held; the `maas agent --port-range` flag; the Ray range (--ray-port-range)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.agent import Agent, AgentConfig
from agent.ports import PortAllocator, PortRangeError, ephemeral_range, parse_port_range, parse_ray_port_range
from conftest import free_port
from maas_tui.cli.main import app as cli_app


def test_ephemeral_range_is_read_from_proc(tmp_path: Path):
    proc = tmp_path / "ip_local_port_range"
    proc.write_text("32768\t60999\n")
    assert ephemeral_range(proc) == (32768, 60999)
    assert ephemeral_range(tmp_path / "missing") is None
    proc.write_text("garbage\n")
    assert ephemeral_range(proc) is None
    assert ephemeral_range() is not None  # this Linux machine has one


@pytest.mark.parametrize("text, expected", [("20000-29999", (20000, 29999)), (" 5000 - 5000 ", (5000, 5000))])
def test_parse_port_range(text: str, expected: tuple[int, int]):
    assert parse_port_range(text, (32768, 60999)) == expected


@pytest.mark.parametrize("text, message", [
    ("20000", "write LOW-HIGH"),
    ("a-b", "write LOW-HIGH"),
    ("30000-20000", "LOW <= HIGH"),
    ("80-1000", "1024-65535"),
    ("60000-70000", "1024-65535"),
    ("30000-40000", "overlaps the kernel's ephemeral range 32768-60999"),
    ("60999-61000", "overlaps the kernel's ephemeral range 32768-60999"),
])
def test_bad_port_ranges_are_refused_clearly(text: str, message: str):
    with pytest.raises(PortRangeError, match=message):
        parse_port_range(text, (32768, 60999))


def test_a_port_is_never_handed_out_twice_while_held():
    port = free_port()
    ports = PortAllocator("127.0.0.1", port, port)
    assert ports.allocate() == port
    # Still free on the host (nothing listens yet), but held: not handed out again.
    with pytest.raises(RuntimeError, match=f"no free port in {port}-{port} on 127.0.0.1 \\(1 held"):
        ports.allocate()
    ports.release(port)
    assert ports.allocate() == port  # only a released port comes back


def test_a_port_in_use_by_someone_else_is_skipped():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        taken.listen(1)
        ports = PortAllocator("127.0.0.1", port, port)
        with pytest.raises(RuntimeError, match="no free port"):
            ports.allocate()
    assert PortAllocator("127.0.0.1", port, port).allocate() == port  # free again once the other let go


def test_reserved_ports_are_held(tmp_path: Path):
    port = free_port()
    ports = PortAllocator("127.0.0.1", port, port)
    ports.reserve(port)  # an adopted workload's port: free on the host until it binds again, yet held
    with pytest.raises(RuntimeError, match="no free port"):
        ports.allocate()


def test_agent_refuses_a_range_inside_the_ephemeral_range(tmp_path: Path):
    low, high = ephemeral_range()
    with pytest.raises(PortRangeError, match="ephemeral"):
        Agent(AgentConfig(server_url="http://127.0.0.1:1", token="t", data_dir=tmp_path, port_range=(low, low + 10)))
    agent = Agent(AgentConfig(server_url="http://127.0.0.1:1", token="t", data_dir=tmp_path, port_range=(21000, 21009)))
    assert (agent.ports.low, agent.ports.high) == (21000, 21009)


def test_cli_port_range_flag_and_environment(tmp_path: Path):
    low, _high = ephemeral_range()
    args = ["agent", "--server-url", "http://127.0.0.1:1", "--token", "t", "--data-dir", str(tmp_path)]
    flag = CliRunner().invoke(cli_app, [*args, "--port-range", f"{low}-{low + 5}"])
    assert flag.exit_code == 2 and "--port-range" in flag.output and "ephemeral" in flag.output
    env = CliRunner().invoke(cli_app, args, env={"MAAS_AGENT_PORT_RANGE": "nonsense"})
    assert env.exit_code == 2 and "write LOW-HIGH" in env.output


@pytest.mark.parametrize("text, service, expected", [
    ("30000-32767", (20000, 29999), (30000, 32767)),
    ("10000-10039", (20000, 29999), (10000, 10039)),  # exactly one node's block
    ("20000-20999", (21000, 29999), (20000, 20999)),  # beside the service range
])
def test_parse_ray_port_range(text: str, service: tuple[int, int], expected: tuple[int, int]):
    assert parse_ray_port_range(text, service, (32768, 60999)) == expected


@pytest.mark.parametrize("text, message", [
    ("30000", "Ray port range '30000': write LOW-HIGH, e.g. 30000-32767"),
    ("500-2000", "1024-65535"),
    ("31000-30000", "LOW <= HIGH"),
    ("30000-30039x", "write LOW-HIGH"),
    ("30000-30038", "has 39 ports; one Ray node needs 40"),
    ("32000-33000", "Ray port range 32000-33000 overlaps the kernel's ephemeral range 32768-60999"),
    ("29000-30999", "overlaps the service port range 20000-29999 \\(--port-range\\)"),
    ("15000-20000", "overlaps the service port range"),
])
def test_bad_ray_port_ranges_are_refused_clearly(text: str, message: str):
    with pytest.raises(PortRangeError, match=message):
        parse_ray_port_range(text, (20000, 29999), (32768, 60999))


def test_agent_refuses_a_ray_range_over_its_service_ports(tmp_path: Path):
    with pytest.raises(PortRangeError, match="overlaps the service port range 21000-21999"):
        Agent(AgentConfig(server_url="http://127.0.0.1:1", token="t", data_dir=tmp_path, port_range=(21000, 21999),
                          ray_port_range=(21900, 22999)))
    agent = Agent(AgentConfig(server_url="http://127.0.0.1:1", token="t", data_dir=tmp_path,
                              port_range=(21000, 21999), ray_port_range=(22000, 22079)))
    assert (agent.ray.ports.low, agent.ray.ports.high) == (22000, 22079)


def test_cli_ray_port_range_flag_and_environment(tmp_path: Path):
    low, _high = ephemeral_range()
    args = ["agent", "--server-url", "http://127.0.0.1:1", "--token", "t", "--data-dir", str(tmp_path)]
    flag = CliRunner().invoke(cli_app, [*args, "--ray-port-range", f"{low}-{low + 100}"])
    assert flag.exit_code == 2 and "--ray-port-range" in flag.output and "ephemeral" in flag.output
    # Checked against the --port-range given beside it, not the default one.
    both = CliRunner().invoke(cli_app, [*args, "--port-range", "21000-21999", "--ray-port-range", "21500-22500"])
    assert both.exit_code == 2 and "overlaps the service port range 21000-21999" in both.output
    env = CliRunner().invoke(cli_app, args, env={"MAAS_AGENT_RAY_PORT_RANGE": "30000-30010"})
    assert env.exit_code == 2 and "--ray-port-range" in env.output and "one Ray node needs 40" in env.output
