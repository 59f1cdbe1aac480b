"""Ports for workloads, from a range below the kernel's ephemeral range (32768+) and above Ray's (10002-19999)."""

from __future__ import annotations

import socket

DEFAULT_RANGE = (20000, 29999)


class PortAllocator:
    def __init__(self, host: str, low: int = DEFAULT_RANGE[0], high: int = DEFAULT_RANGE[1]):
        self.host = host
        self.low, self.high = low, high
        self.in_use: set[int] = set()
        self._next = low

    def allocate(self) -> int:
        span = self.high - self.low + 1
        for _ in range(span):
            port = self._next
            self._next = self.low + (self._next - self.low + 1) % span
            if port in self.in_use or not _bindable(self.host, port):
                continue
            self.in_use.add(port)
            return port
        raise RuntimeError(f"no free port in {self.low}-{self.high} on {self.host}")

    def release(self, port: int | None) -> None:
        self.in_use.discard(port)


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
