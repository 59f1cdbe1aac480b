"""`maas worker add user@host`: an agent bootstrapped over SSH through OpenSSH's sshd on a loopback port."""

from __future__ import annotations

import asyncio
import getpass
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import asyncssh
import pytest
from typer.testing import CliRunner

from conftest import eventually, free_port
from maas_tui.cli.main import app
from maas_tui.client import MaasClient

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
pytestmark = pytest.mark.skipif(SSHD is None or shutil.which("ssh-keygen") is None,
                                reason="OpenSSH's sshd is not installed (Debian: apt-get install openssh-server)")


@pytest.fixture
async def sshd(tmp_path: Path):
    """A private sshd on 127.0.0.1 that accepts one generated key for the current user."""
    folder = tmp_path / "sshd"
    folder.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "host_key")], check=True)
    key = asyncssh.generate_private_key("ssh-ed25519")
    identity = folder / "id_ed25519"
    identity.write_bytes(key.export_private_key())
    identity.chmod(0o600)
    (folder / "authorized_keys").write_bytes(key.export_public_key())
    port = free_port()
    (folder / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {folder / 'host_key'}
PidFile {folder / 'sshd.pid'}
AuthorizedKeysFile {folder / 'authorized_keys'}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
""")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation folder
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(folder / "sshd_config")], stdout=subprocess.DEVNULL,
                            stderr=open(folder / "sshd.log", "wb"))

    async def listening() -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return proc.poll() is not None  # stop waiting when it died
        writer.close()
        return True
    await eventually(listening, timeout=10, message="sshd")
    if proc.poll() is not None:
        pytest.skip(f"sshd does not start here: {(folder / 'sshd.log').read_text()[-500:]}")
    try:
        yield port, identity
    finally:
        proc.terminate()
        proc.wait(10)


async def test_worker_add_over_ssh(server, admin: MaasClient, sshd, tmp_path: Path) -> None:
    port, identity = sshd
    remote = tmp_path / "remote"
    args = ["worker", "add", f"{getpass.getuser()}@127.0.0.1", "--port", str(port), "--identity", str(identity),
            "--no-host-key-check", "--name", "remote-1", "--remote-dir", str(remote),
            "--venv", sys.prefix,  # this host already has this version: nothing to install
            "--simulate-gpus", "2xL4-24GB", "--labels", "zone=lab,rack=7", "--timeout", "60"]
    env = {"MAAS_SERVER": server.url, "MAAS_API_KEY": admin.token, "MAAS_TOKEN": server.cluster_token or "",
           "MAAS_CONFIG": str(tmp_path / "config.json")}
    runner = CliRunner()
    try:
        result = await asyncio.to_thread(runner.invoke, app, args, env=env)
        assert result.exit_code == 0, result.output
        assert "already installed" in result.output and "agent started" in result.output
        assert "worker remote-1 is ready" in result.output
        worker = await admin.get_worker("remote-1")
        assert worker.state == "ready" and len(worker.gpus) == 2
        assert worker.labels == {"zone": "lab", "rack": "7"}
        pid = (remote / "agent.pid").read_text().strip()

        # Twice: nothing changes, the same supervisor keeps running.
        result = await asyncio.to_thread(runner.invoke, app, args, env=env)
        assert result.exit_code == 0, result.output
        assert "already runs" in result.output
        assert (remote / "agent.pid").read_text().strip() == pid

        # The supervisor restarts an agent that dies.
        children = subprocess.run(["pgrep", "-P", pid], capture_output=True, text=True).stdout.split()
        assert children
        os.kill(int(children[0]), signal.SIGKILL)

        async def restarted() -> bool:
            now = subprocess.run(["pgrep", "-P", pid], capture_output=True, text=True).stdout.split()
            return bool(now) and now != children and (await admin.get_worker("remote-1")).state == "ready"
        await eventually(restarted, timeout=30, message="the agent to be restarted by its supervisor")

        # Remove with --uninstall: the supervisor and its agent stop, the worker goes.
        result = await asyncio.to_thread(runner.invoke, app, [
            "worker", "remove", "remote-1", "--uninstall", f"{getpass.getuser()}@127.0.0.1:{port}",
            "--identity", str(identity), "--no-host-key-check", "--remote-dir", str(remote)], env=env)
        assert result.exit_code == 0, result.output
        assert not (remote / "agent.pid").exists() and not (remote / "run-agent.sh").exists()
        assert subprocess.run(["kill", "-0", pid], capture_output=True).returncode != 0
        assert [w.name for w in await admin.list_workers()] == []
    finally:
        pidfile = remote / "agent.pid"
        if pidfile.exists():
            try:
                os.killpg(int(pidfile.read_text().strip()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
