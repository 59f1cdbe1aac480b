"""Adopting a PostgreSQL that already runs on the embedded cluster's directory (another MaaS process
started it, or one was left behind) instead of starting a second one, and telling a live postmaster
from a stale ``postmaster.pid`` (after kill -9 or a reboot). Used by server/db/embedded.py."""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

from server.db import pg_messages


def port_accepts(port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def pid_is_postgres(pid: int) -> bool:
    """Best effort: False only when /proc proves ``pid`` is a zombie or another program
    (after kill -9 the dead postmaster may linger as a zombie; after a reboot its PID may
    belong to anything)."""
    proc = Path(f"/proc/{pid}")
    try:
        stat_line = (proc / "stat").read_text()
        cmdline = (proc / "cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # no such pid, or no /proc at all
    except OSError:
        return True
    state = stat_line.rsplit(") ", 1)[-1][:1]
    if state in ("Z", "X"):
        return False
    return b"postgres" in cmdline or b"postmaster" in cmdline


def pidfile_lines(cluster_dir: Path) -> list[str]:
    try:
        return (cluster_dir / "postmaster.pid").read_text().splitlines()
    except OSError:
        return []


def adopt_running(cluster_dir: Path, timeout: float, status: Callable[[], str],
                  run: Callable[..., subprocess.CompletedProcess], log: logging.Logger,
                  log_tail: Callable[[], str]) -> int | None:
    """The port of an already running postmaster on this cluster, or None. `status` is ``pg_ctl status``
    ('running', 'stopped', 'missing'), `run` runs a command as the cluster's owner; a postmaster that
    runs but is not ready within `timeout` seconds is an error."""
    deadline = time.monotonic() + timeout
    while True:
        if status() != "running":
            return None
        lines = pidfile_lines(cluster_dir)
        if not lines:
            return None
        try:
            pid = int(lines[0])
        except ValueError:
            pid = 0
        if pid and not pid_is_postgres(pid):
            # a stale postmaster.pid whose PID now belongs to another program
            log.warning("removing stale %s (PID %d is not a running PostgreSQL)",
                        cluster_dir / "postmaster.pid", pid)
            run(["rm", "-f", str(cluster_dir / "postmaster.pid")], timeout=30)
            return None
        state = lines[7].strip() if len(lines) > 7 else ""
        if len(lines) > 3 and lines[3].strip().isdigit() and state == "ready":
            port = int(lines[3].strip())
            if port_accepts(port):
                log.info("reusing the PostgreSQL already running on %s (PID %d, port %d)",
                         cluster_dir, pid, port)
                return port
        if time.monotonic() > deadline:
            raise pg_messages.running_not_ready(pid, cluster_dir, timeout, state, log_tail())
        time.sleep(0.2)
