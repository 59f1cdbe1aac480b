"""`maas worker add user@host`: bootstrap an agent on a remote host over SSH.

Steps, each one idempotent so that running the command twice changes nothing:
1. connect with asyncssh (the user's keys and known_hosts, or --identity);
2. check the remote Python (3.11 or newer);
3. make sure the remote venv holds the same MaaS-Base version: kept when it does,
   else created with `python3 -m venv` and filled with `pip install maas-base==VERSION`;
4. write the supervisor script (a shell loop that restarts the agent when it exits, in a
   session of its own, so it outlives the SSH connection) and start it, unless the same
   script already runs;
5. wait until the server reports the worker `ready`.
"""

from __future__ import annotations

import asyncio
import shlex
from dataclasses import dataclass, field
from typing import Any, Callable

import asyncssh

from server import __version__


class BootstrapError(Exception):
    pass


@dataclass
class WorkerTarget:
    user: str
    host: str
    port: int = 22
    identity: str | None = None
    known_hosts: Any = ()  # () : asyncssh's default (~/.ssh/known_hosts); None: no check


@dataclass
class AgentPlan:
    server_url: str
    cluster_token: str
    name: str
    address: str
    remote_dir: str = "~/.maas"
    venv: str = ""  # default: <remote_dir>/venv
    simulate_gpus: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    pip_args: list[str] = field(default_factory=list)
    version: str = __version__
    supervisor: str = "auto"  # auto: systemd where it runs and we are root, else a background process


def parse_target(text: str, port: int = 22) -> WorkerTarget:
    user, sep, host = text.rpartition("@")
    if not sep or not user or not host:
        raise ValueError(f"expected user@host, not {text!r}")
    if host.count(":") == 1:  # user@host:port
        host, _, number = host.partition(":")
        port = int(number)
    return WorkerTarget(user=user, host=host, port=port)


async def _run(conn: asyncssh.SSHClientConnection, command: str, check: bool = True,
               timeout: float = 600) -> asyncssh.SSHCompletedProcess:
    result = await asyncio.wait_for(conn.run(command, check=False), timeout)
    if check and result.exit_status != 0:
        tail = (str(result.stderr or "") + str(result.stdout or ""))[-2000:]
        raise BootstrapError(f"remote command failed ({result.exit_status}): {command}\n{tail}")
    return result


UNIT = "/etc/systemd/system/maas-agent.service"


def _unit(plan: AgentPlan, home: str) -> str:
    return (
        "[Unit]\n"
        f"Description=MaaS-Base {plan.version} agent (written by 'maas worker add')\n"
        "After=network-online.target\nWants=network-online.target\n\n"
        "[Service]\n"
        f"ExecStart=/bin/sh {home}/run-agent.sh\n"
        "Restart=always\nRestartSec=2\nKillMode=control-group\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )


async def _use_systemd(conn: asyncssh.SSHClientConnection, plan: AgentPlan) -> bool:
    if plan.supervisor == "process":
        return False
    probe = await _run(conn, 'test -d /run/systemd/system && test "$(id -u)" = 0', check=False)
    if plan.supervisor == "systemd" and probe.exit_status != 0:
        raise BootstrapError("--supervisor systemd: no systemd on the remote host, or not root")
    return probe.exit_status == 0


def _supervisor(plan: AgentPlan, venv: str, home: str) -> str:
    args = [f"{venv}/bin/maas", "agent", "--server-url", plan.server_url, "--name", plan.name,
            "--address", plan.address, "--data-dir", f"{home}/agent"]
    if plan.simulate_gpus:
        args += ["--simulate-gpus", plan.simulate_gpus]
    if plan.labels:
        args += ["--labels", ",".join(f"{k}={v}" for k, v in sorted(plan.labels.items()))]
    return (
        "#!/bin/sh\n"
        f"# MaaS-Base {plan.version} agent, written by 'maas worker add'. Restarts the agent when it exits.\n"
        f"export MAAS_TOKEN={shlex.quote(plan.cluster_token)}\n"
        "trap 'kill -TERM $child 2>/dev/null; wait $child; exit 0' TERM INT HUP\n"
        "while :; do\n"
        f"  {' '.join(shlex.quote(a) for a in args)} &\n"
        "  child=$!\n"
        "  wait $child\n"
        "  sleep 2\n"
        "done\n"
    )


async def _connect(target: WorkerTarget) -> asyncssh.SSHClientConnection:
    options: dict[str, Any] = {"username": target.user, "port": target.port}
    if target.identity:
        options["client_keys"] = [target.identity]
    if target.known_hosts != ():
        options["known_hosts"] = target.known_hosts
    try:
        async with asyncio.timeout(30):
            return await asyncssh.connect(target.host, **options)
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        raise BootstrapError(f"cannot connect to {target.user}@{target.host}:{target.port}: {exc}") from None


async def bootstrap(target: WorkerTarget, plan: AgentPlan, wait_ready: Callable[[], Any] | None = None,
                    say: Callable[[str], None] = print) -> str:
    """Install and start the agent; returns 'started', 'restarted' or 'unchanged'."""
    async with await _connect(target) as conn:
        home = (await _run(conn, f"mkdir -p {plan.remote_dir} && cd {plan.remote_dir} && pwd")).stdout.strip()
        venv = plan.venv or f"{home}/venv"
        python = (await _run(conn, "command -v python3 || true")).stdout.strip()
        if not python:
            raise BootstrapError("no python3 on the remote host (MaaS-Base needs Python 3.11 or newer)")
        version = (await _run(conn, f"{python} -c 'import sys; print(*sys.version_info[:2])'")).stdout.split()
        say(f"remote Python {'.'.join(version)} at {python}")

        installed = await _run(conn, f"{shlex.quote(venv)}/bin/python -c 'import server; print(server.__version__)'",
                               check=False)
        if installed.exit_status == 0 and str(installed.stdout).strip() == plan.version:
            say(f"MaaS-Base {plan.version} already installed in {venv}")
        else:
            if tuple(int(v) for v in version) < (3, 11):
                raise BootstrapError(f"the remote Python is {'.'.join(version)}; MaaS-Base needs 3.11 or newer")
            say(f"installing MaaS-Base {plan.version} into {venv}")
            await _run(conn, f"{python} -m venv {shlex.quote(venv)}")
            pip = " ".join(shlex.quote(a) for a in plan.pip_args)
            await _run(conn, f"{shlex.quote(venv)}/bin/pip install --quiet {pip} 'maas-base=={plan.version}'")

        script = _supervisor(plan, venv, home)
        if await _use_systemd(conn, plan):
            outcome = await _systemd(conn, plan, home, script)
            where = "systemd unit maas-agent; journalctl -u maas-agent"
        else:
            outcome = await _background(conn, home, script, say)
            where = f"log: {home}/agent.log"
        say("the agent already runs with this configuration" if outcome == "unchanged"
            else f"agent {outcome} on {target.host} ({where})")
    if wait_ready is not None:
        await wait_ready()
    return outcome


async def _write(conn: asyncssh.SSHClientConnection, path: str, text: str, mode: int) -> None:
    async with conn.start_sftp_client() as sftp:
        async with sftp.open(path, "w") as handle:
            await handle.write(text)
        await sftp.chmod(path, mode)


async def _systemd(conn: asyncssh.SSHClientConnection, plan: AgentPlan, home: str, script: str) -> str:
    unit = _unit(plan, home)
    current = (await _run(conn, f"cat {home}/run-agent.sh 2>/dev/null; echo ---; cat {UNIT} 2>/dev/null; true")).stdout
    active = (await _run(conn, "systemctl is-active --quiet maas-agent", check=False)).exit_status == 0
    if active and current == f"{script}---\n{unit}":
        return "unchanged"
    await _write(conn, f"{home}/run-agent.sh", script, 0o700)
    await _write(conn, UNIT, unit, 0o644)
    await _run(conn, "systemctl daemon-reload && systemctl enable maas-agent && systemctl restart maas-agent")
    return "restarted" if active else "started"


async def _background(conn: asyncssh.SSHClientConnection, home: str, script: str, say: Callable[[str], None]) -> str:
    current = await _run(conn, f"cat {home}/run-agent.sh 2>/dev/null || true")
    alive = (await _run(conn, f"test -f {home}/agent.pid && kill -0 $(cat {home}/agent.pid) 2>/dev/null",
                        check=False)).exit_status == 0
    if alive and current.stdout == script:
        return "unchanged"
    if alive:
        await _stop_background(conn, home)
    await _write(conn, f"{home}/run-agent.sh", script, 0o700)
    # setsid: a session of its own, so the agent outlives this connection; its pid is the group's.
    await _run(conn, f"cd {home} && (setsid sh ./run-agent.sh >> agent.log 2>&1 < /dev/null & echo $! > agent.pid)")
    return "restarted" if alive else "started"


async def _stop_background(conn: asyncssh.SSHClientConnection, home: str) -> None:
    await _run(conn, f"if test -f {home}/agent.pid; then pid=$(cat {home}/agent.pid); kill -TERM -$pid 2>/dev/null; "
                     f"for i in 1 2 3 4 5 6 7 8 9 10; do kill -0 $pid 2>/dev/null || break; sleep 0.5; done; "
                     f"kill -KILL -$pid 2>/dev/null; rm -f {home}/agent.pid; fi; true")


async def uninstall(target: WorkerTarget, remote_dir: str = "~/.maas", say: Callable[[str], None] = print) -> None:
    """Stop the agent (systemd unit or background process) and remove what `bootstrap` wrote."""
    async with await _connect(target) as conn:
        found = await _run(conn, f"cd {remote_dir} 2>/dev/null && pwd", check=False)
        if found.exit_status != 0:
            say(f"nothing installed in {remote_dir} on {target.host}")
            return
        home = str(found.stdout).strip()
        await _run(conn, f"if test -f {UNIT} && test \"$(id -u)\" = 0; then systemctl disable --now maas-agent; "
                         f"rm -f {UNIT}; systemctl daemon-reload; fi; true")
        await _stop_background(conn, home)
        await _run(conn, f"rm -rf {home}/run-agent.sh {home}/agent {home}/venv")
        say(f"agent stopped and removed from {target.host} ({home}; its log stays in agent.log)")
