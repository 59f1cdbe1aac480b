"""Workloads as host processes: one process group each, logs to a file, pidfiles to adopt them after an
agent restart (or stop them when they are no longer wanted)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from agent.backends import LaunchSpec, missing_requirement
from agent.progress import ProgressCallback
from agent.runtimes.base import StartRequest

log = logging.getLogger(__name__)


@dataclass
class ProcessHandle:
    key: str
    process: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode


@dataclass
class AdoptedHandle:
    """A process a previous agent started and this one took over: not our child, so it is polled."""

    key: str
    pid: int
    log_path: Path
    record: dict = field(default_factory=dict)
    returncode: int | None = None


class ProcessRuntime:
    """Implements agent/runtimes/base.py Runtime; `spawn` also runs other processes (Ray nodes)."""

    name = "process"
    runs_in_container = False

    def __init__(self, run_dir: Path, stop_grace: float = 10.0):
        self.run_dir = run_dir
        self.stop_grace = stop_grace
        run_dir.mkdir(parents=True, exist_ok=True)

    def _pidfile(self, key: str) -> Path:
        return self.run_dir / f"{key}.pid.json"

    def missing(self, backend: str, launch: LaunchSpec) -> str | None:
        return missing_requirement(backend, launch)

    async def start(self, request: StartRequest, on_progress: ProgressCallback | None = None) -> ProcessHandle:
        """The launch's command as a process (nothing to fetch first: `on_progress` is not called)."""
        launch = request.launch
        return await self.spawn(request.key, launch.command, launch.env, request.log_path, meta=request.record())

    def describe(self, handle: ProcessHandle | AdoptedHandle) -> str:
        return f"pid {handle.pid}"

    async def spawn(self, key: str, command: list[str], env: dict[str, str], log_path: Path,
                    meta: dict | None = None) -> ProcessHandle:
        """Run `command` in its own process group, its output into `log_path`, its pidfile keeping `meta`."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab", buffering=0) as log_file:
            process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,  # its own process group: a stop reaches its children too
            )
        try:
            create_time = psutil.Process(process.pid).create_time()
        except psutil.NoSuchProcess:
            create_time = 0.0  # it exited and was reaped already: no later process with this pid can match
        record = {**(meta or {}), "pid": process.pid, "create_time": create_time, "log_path": str(log_path)}
        self._pidfile(key).write_text(json.dumps(record))
        return ProcessHandle(key, process, log_path)

    async def wait(self, handle: ProcessHandle | AdoptedHandle) -> int | None:
        if isinstance(handle, AdoptedHandle):
            while _alive(handle.pid, handle.record.get("create_time")):
                await asyncio.sleep(0.5)
            self._pidfile(handle.key).unlink(missing_ok=True)
            return handle.returncode  # not our child: its exit status is unknown
        code = await handle.process.wait()
        self._pidfile(handle.key).unlink(missing_ok=True)
        return code

    async def stop(self, handle: ProcessHandle | AdoptedHandle) -> int | None:
        """SIGTERM to the group, SIGKILL after the grace period."""
        if isinstance(handle, AdoptedHandle):
            await asyncio.to_thread(self._stop_record, handle.record)
            self._pidfile(handle.key).unlink(missing_ok=True)
            return None
        if handle.returncode is None:
            _signal_group(handle.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(self.stop_grace):
                    await handle.process.wait()
            except TimeoutError:
                log.warning("%s did not stop in %.0f s; killing it", handle.key, self.stop_grace)
                _signal_group(handle.pid, signal.SIGKILL)
                await handle.process.wait()
        self._pidfile(handle.key).unlink(missing_ok=True)
        return handle.returncode

    def leftovers(self) -> list[tuple[str, dict[str, Any]]]:
        """Processes a previous agent left running: (key, its pidfile record). Stale pidfiles go."""
        found: dict[str, dict] = {}
        for pidfile in self.run_dir.glob("*.pid.json"):
            key = pidfile.name[:-len(".pid.json")]
            try:
                record = json.loads(pidfile.read_text())
                if _alive(int(record["pid"]), float(record["create_time"])):
                    found[key] = record
                    continue
            except (ValueError, KeyError, OSError, TypeError):
                pass
            pidfile.unlink(missing_ok=True)
        return list(found.items())

    def adopt(self, key: str, record: dict) -> AdoptedHandle:
        return AdoptedHandle(key, int(record["pid"]), Path(record.get("log_path", "")), record)

    def stop_leftover(self, key: str, record: dict) -> None:
        """Stop a left-over process nobody wants any more (blocking)."""
        self._stop_record(record)
        self._pidfile(key).unlink(missing_ok=True)

    def _stop_record(self, record: dict) -> None:
        pid = int(record["pid"])
        if not _alive(pid, record.get("create_time")):
            return
        _signal_group(pid, signal.SIGTERM)
        try:
            psutil.Process(pid).wait(self.stop_grace)
        except psutil.TimeoutExpired:
            _signal_group(pid, signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass

    def clean_up_leftovers(self) -> int:
        """Stop processes a previous agent left behind (it was killed before it could)."""
        stopped = 0
        for pidfile in self.run_dir.glob("*.pid.json"):
            try:
                record = json.loads(pidfile.read_text())
                process = psutil.Process(int(record["pid"]))
                if abs(process.create_time() - float(record["create_time"])) < 1:
                    _signal_group(process.pid, signal.SIGTERM)
                    try:
                        process.wait(self.stop_grace)
                    except psutil.TimeoutExpired:
                        _signal_group(process.pid, signal.SIGKILL)
                    stopped += 1
            except (psutil.NoSuchProcess, ValueError, KeyError, OSError):
                pass
            pidfile.unlink(missing_ok=True)
        return stopped


def _alive(pid: int, create_time: float | None) -> bool:
    try:
        process = psutil.Process(pid)
        if create_time is not None and abs(process.create_time() - float(create_time)) >= 1:
            return False  # the pid was reused
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
