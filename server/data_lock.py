"""One server per data folder: `maas start` holds an exclusive lock on `<data-dir>/server.lock`.

A second `maas start` on a live data folder stops at the lock, before it looks at the embedded
PostgreSQL, the token or anything else there (it used to adopt the running cluster and then stop
it on its way out). The kernel drops the lock when the holder exits, kill -9 included.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from server.leader import StoreInUse

LOCK_NAME = "server.lock"


class DataDirInUse(StoreInUse):
    """Another server runs on this data folder (`maas start` says so in one line and exits 2)."""


class DataDirLock:
    def __init__(self, data_dir: Path):
        self.path = Path(data_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise DataDirInUse; the holder's PID is written into the file."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            who = f" (PID {holder})" if holder.isdigit() else ""
            raise DataDirInUse(f"the data folder {self.path.parent} is in use by another MaaS server{who}; "
                               "stop it first, or pass another --data-dir") from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None
