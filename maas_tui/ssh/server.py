"""Serve the TUI over SSH: `ssh -p 2222 ops@head-node` lands in the cluster's TUI.

- Public-key authentication only, against the keys registered for that user
  (`maas user add-key`); passwords and keyboard-interactive are off.
- The host key is generated once and kept in the data folder.
- Each session runs `maas tui` as a subprocess on its own PTY, as the logged-in user:
  the front door mints a session token for that user (recorded as an SSH login event),
  passes it in MAAS_SERVER / MAAS_API_KEY, and revokes it when the session ends.
- Window-size changes go to the PTY (the kernel sends SIGWINCH to the TUI); the session
  ends when the TUI quits (its exit status goes back to the client) or the client drops
  (the TUI's process group is hung up, then killed).
- A cap on concurrent sessions.

Where users, keys and tokens come from is a `Backend`: server/services/ssh_sessions.py's
`InProcessSshBackend` inside the server process, `ApiBackend` (an admin token over REST) when run on its own.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import asyncssh

log = logging.getLogger("maas.ssh")

HOST_KEY_NAME = "ssh_host_ed25519_key"


class Backend(Protocol):
    server_url: str

    async def authorized_keys(self, username: str) -> list[str]: ...
    async def open_session(self, username: str, fingerprint: str, peer: str) -> tuple[str, str]: ...  # (token, prefix)
    async def close_session(self, username: str, prefix: str, reason: str) -> None: ...


class ApiBackend:
    """On its own: the server's REST API with an admin token."""

    def __init__(self, server_url: str, admin_token: str):
        from maas_tui.client import MaasClient

        self.server_url = server_url.rstrip("/")
        self.client = MaasClient(self.server_url, admin_token)

    async def authorized_keys(self, username: str) -> list[str]:
        from maas_tui.client import ApiClientError

        try:
            return await self.client.ssh_authorized_keys(username)
        except ApiClientError as exc:
            if exc.status == 404:
                return []
            raise

    async def open_session(self, username: str, fingerprint: str, peer: str) -> tuple[str, str]:
        out = await self.client.open_ssh_session(username, fingerprint=fingerprint, peer=peer)
        return out.token, out.prefix

    async def close_session(self, username: str, prefix: str, reason: str) -> None:
        await self.client.close_ssh_session(username, prefix, reason)

    async def close(self) -> None:
        await self.client.close()


def load_host_key(data_dir: Path) -> asyncssh.SSHKey:
    """The server's host key: generated on first use, then always the same one."""
    path = Path(data_dir) / HOST_KEY_NAME
    if path.exists():
        return asyncssh.read_private_key(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    key = asyncssh.generate_private_key("ssh-ed25519", comment="maas-base host key")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.export_private_key())
    path.with_name(HOST_KEY_NAME + ".pub").write_bytes(key.export_public_key())
    log.info("generated the SSH host key %s (%s)", path, key.get_fingerprint("sha256"))
    return key


@dataclass
class SshConfig:
    host: str = "127.0.0.1"
    port: int = 2222
    data_dir: Path = field(default_factory=lambda: Path("."))
    max_sessions: int = 16
    command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "maas_tui", "tui"])
    login_grace: float = 30.0


class TuiFrontDoor:
    """The asyncssh server and the bookkeeping of its sessions."""

    def __init__(self, backend: Backend, config: SshConfig):
        self.backend = backend
        self.config = config
        self.sessions: set[TuiSession] = set()
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self.port = 0
        self._revocations: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        host_key = load_host_key(self.config.data_dir)
        self._acceptor = await asyncssh.create_server(
            lambda: _Server(self), self.config.host, self.config.port, server_host_keys=[host_key],
            session_factory=None, login_timeout=self.config.login_grace, encoding=None,
            allow_scp=False, agent_forwarding=False, x11_forwarding=False, sftp_factory=None,
            keepalive_interval=30, keepalive_count_max=3)
        self.port = self._acceptor.sockets[0].getsockname()[1]
        log.info("TUI over SSH on %s:%d (host key %s)", self.config.host, self.port,
                 host_key.get_fingerprint("sha256"))

    def revoke_later(self, username: str, prefix: str, reason: str, first_delay: float = 1.0) -> None:
        """Revoke a session token whose revocation failed, retrying with backoff until it succeeds:
        a session that ended while the database was down must not leave a valid token behind."""
        async def retry() -> None:
            delay = first_delay
            while True:
                await asyncio.sleep(delay)
                try:
                    await self.backend.close_session(username, prefix, reason)
                except Exception:
                    delay = min(delay * 2, 30.0)
                    continue
                log.info("revoked the session token of %s now that the server answers again", username)
                return

        task = asyncio.ensure_future(retry())
        self._revocations.add(task)
        task.add_done_callback(self._revocations.discard)

    async def stop(self) -> None:
        for session in list(self.sessions):
            await session.terminate("the server is stopping")
        for task in list(self._revocations):  # the server is stopping: pending retries end with it
            task.cancel()
        if self._acceptor is not None:
            self._acceptor.close()
            await self._acceptor.wait_closed()
            self._acceptor = None


class _Server(asyncssh.SSHServer):
    def __init__(self, door: TuiFrontDoor):
        self.door = door
        self.conn: asyncssh.SSHServerConnection | None = None
        self.peer = ""
        self.allowed: set[str] = set()
        self.fingerprint = ""

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("", 0)
        self.peer = f"{peer[0]}:{peer[1]}"

    async def begin_auth(self, username: str) -> bool:
        self.allowed = set()
        try:
            keys = await self.door.backend.authorized_keys(username)
        except Exception:  # the server is away: nobody gets in
            log.exception("cannot fetch the SSH keys of %s", username)
            keys = []
        for line in keys:
            try:
                self.allowed.add(asyncssh.import_public_key(line).get_fingerprint("sha256"))
            except (asyncssh.KeyImportError, ValueError):
                log.warning("ignoring a stored SSH key of %s that does not parse", username)
        return True  # authentication is always required

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # asyncssh verifies the signature itself; this says whether the key may log in.
        fingerprint = key.get_fingerprint("sha256")
        if fingerprint in self.allowed:
            self.fingerprint = fingerprint
            return True
        log.info("refused SSH key %s for %r from %s", fingerprint, username, self.peer)
        return False

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def session_requested(self) -> "TuiSession":
        assert self.conn is not None
        return TuiSession(self.door, self.conn.get_extra_info("username"), self.peer, self.fingerprint)


class TuiSession(asyncssh.SSHServerSession):
    def __init__(self, door: TuiFrontDoor, username: str, peer: str, fingerprint: str):
        self.door = door
        self.username = username
        self.peer = peer
        self.fingerprint = fingerprint
        self.chan: asyncssh.SSHServerChannel | None = None
        self.term_type = "xterm-256color"
        self.size = (80, 24)
        self.has_pty = False
        self.command: str | None = None
        self.master: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._exited: asyncio.Future[int] | None = None
        self.prefix = ""
        self._task: asyncio.Task[None] | None = None
        self._ended = False

    # --- asyncssh callbacks -----------------------------------------------------

    def connection_made(self, chan: asyncssh.SSHServerChannel) -> None:
        self.chan = chan

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int], term_modes: Any) -> bool:
        self.has_pty = True
        self.term_type = term_type or self.term_type
        if term_size[0] and term_size[1]:
            self.size = (term_size[0], term_size[1])
        return True

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        self.command = command  # answered with a hint: only the TUI is served here
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        return False

    def session_started(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def data_received(self, data: bytes, datatype: Any) -> None:
        if self.master is not None:
            try:
                os.write(self.master, data)
            except OSError:
                pass

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        if width and height:
            self.size = (width, height)
            if self.master is not None:
                _set_winsize(self.master, width, height)

    def eof_received(self) -> bool:
        return True  # keep the channel; the TUI decides when it is done

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._ended:
            asyncio.ensure_future(self.terminate("the client went away"))

    # --- the TUI subprocess -------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._serve()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the SSH session of %s failed", self.username)
            await self._finish(1, "an internal error")

    def _refuse(self, message: str, status: int) -> None:
        assert self.chan is not None
        self._ended = True
        self.chan.write(message.encode())
        self.chan.exit(status)

    async def _serve(self) -> None:
        assert self.chan is not None
        if self.command is not None:
            self._refuse("MaaS-Base serves only its TUI over SSH: connect without a command. "
                         "For scripts, install the CLI and use 'maas ...' against the server's API.\r\n", 2)
            return
        if not self.has_pty:
            self._refuse("MaaS-Base serves its TUI here and needs a terminal: connect with 'ssh -t'.\r\n", 1)
            return
        if len(self.door.sessions) >= self.door.config.max_sessions:
            self._refuse(f"Too many sessions ({self.door.config.max_sessions}); try again later.\r\n", 1)
            return
        self.door.sessions.add(self)
        try:
            token, self.prefix = await self.door.backend.open_session(self.username, self.fingerprint, self.peer)
        except Exception as exc:
            log.exception("cannot open a session for %s", self.username)
            self.door.sessions.discard(self)
            self._refuse(f"cannot open a session: {exc}\r\n", 1)
            return
        log.info("SSH session for %s from %s", self.username, self.peer)
        master, slave = pty.openpty()
        _set_winsize(master, *self.size)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
        env.update(TERM=self.term_type, MAAS_SERVER=self.door.backend.server_url, MAAS_API_KEY=token,
                   MAAS_CONFIG=os.devnull, COLUMNS=str(self.size[0]), LINES=str(self.size[1]),
                   LANG=env.get("LANG") or "C.UTF-8", USER=self.username, LOGNAME=self.username,
                   MAAS_TUI_REMOTE="1")  # the TUI runs here, not at the client: it writes no files
        env.pop("TEXTUAL", None)
        try:
            # subprocess rather than the loop's subprocess support: the fds are in place before
            # preexec_fn runs (uvloop, which `maas start` uses, differs there).
            self.process = subprocess.Popen(self.door.config.command, stdin=slave, stdout=slave, stderr=slave,
                                            env=env, start_new_session=True, preexec_fn=_take_controlling_tty,
                                            close_fds=True)
        except (OSError, subprocess.SubprocessError) as exc:
            os.close(master)
            os.close(slave)
            await self._finish(1, f"cannot start the TUI: {exc}")
            return
        os.close(slave)
        self.master = master
        os.set_blocking(master, False)
        loop = asyncio.get_running_loop()
        drained = asyncio.Event()

        def readable() -> None:
            try:
                data = os.read(master, 65536)
            except BlockingIOError:
                return
            except OSError:  # EIO: every process on the PTY has closed it
                data = b""
            if not data:
                loop.remove_reader(master)
                drained.set()
                return
            if self.chan is not None and not self._ended:
                self.chan.write(data)

        loop.add_reader(master, readable)
        self._exited = exit_status(self.process)
        status = await asyncio.shield(self._exited)
        try:
            await asyncio.wait_for(drained.wait(), 2.0)  # what the TUI wrote last (restoring the screen)
        except TimeoutError:
            pass
        if self.master == master:  # else _finish closed it already, and the number may be another fd's now
            loop.remove_reader(master)
        await self._finish(status if status >= 0 else 128 - status, "the TUI exited")

    async def terminate(self, reason: str) -> None:
        """Hang up the TUI's process group, kill it if it lingers, and end the session."""
        process = self.process
        if process is not None and self._exited is not None and not self._exited.done():
            for sig, wait in ((signal.SIGHUP, 2.0), (signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    await asyncio.wait_for(asyncio.shield(self._exited), wait)
                    break
                except TimeoutError:
                    continue
        if self._task is not None and not self._task.done() and process is None:
            self._task.cancel()
        await self._finish(255, reason)

    async def _finish(self, status: int, reason: str) -> None:
        if self._ended:
            return
        self._ended = True
        self.door.sessions.discard(self)
        if self.master is not None:
            try:
                asyncio.get_running_loop().remove_reader(self.master)
                os.close(self.master)
            except OSError:
                pass
            self.master = None
        if self.prefix:
            try:
                await self.door.backend.close_session(self.username, self.prefix, reason)
            except Exception as exc:  # the database or the server is away: revoke it once it is back
                log.warning("cannot revoke the session token of %s now (%s); retrying until it is revoked",
                            self.username, str(exc) or type(exc).__name__)
                self.door.revoke_later(self.username, self.prefix, reason)
        log.info("SSH session of %s ended: %s (status %d)", self.username, reason, status)
        if self.chan is not None:
            try:
                self.chan.exit(status)
            except Exception:  # the channel is already gone
                pass


def exit_status(process: subprocess.Popen[bytes]) -> asyncio.Future[int]:
    """The child's exit status, waited for on the event loop (a pidfd), never by a thread of the
    default executor: that pool has cpu+4 threads, and one held per session starved logins and the
    embedded PostgreSQL's watchdog with a handful of sessions open."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[int] = loop.create_future()
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # no pidfd (old kernel): a thread of its own, not the pool's
        def wait() -> None:
            status = process.wait()
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(status))

        threading.Thread(target=wait, name=f"wait-{process.pid}", daemon=True).start()
        return future

    def readable() -> None:  # the pidfd turns readable once the child has exited
        status = process.poll()
        if status is None:
            return
        loop.remove_reader(pidfd)
        os.close(pidfd)
        if not future.done():
            future.set_result(status)

    loop.add_reader(pidfd, readable)
    readable()  # it may have exited already
    return future


def _set_winsize(fd: int, columns: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


def _take_controlling_tty() -> None:
    # In the child, after setsid(): make the PTY (on fd 0) its controlling terminal, so that
    # the kernel delivers SIGWINCH on resizes and SIGHUP when the session ends.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


async def serve_forever(backend: Backend, config: SshConfig) -> None:
    door = TuiFrontDoor(backend, config)
    await door.start()
    try:
        await asyncio.Event().wait()
    finally:
        await door.stop()
