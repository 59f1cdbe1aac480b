"""Ports for workloads, from a configured range (default 20000-29999: below the kernel's ephemeral range,
32768+ on Linux, and above Ray's worker ports, 10002-19999).

A range must not overlap the kernel's ephemeral range: the kernel hands those ports to outgoing
connections at any time, so a workload could find its port taken between the check and its bind.
Every port is checked free (bindable) before it is handed out, and never handed out twice while held.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

DEFAULT_RANGE = (20000, 29999)
# Ray nodes of multi-host placements (agent/ray.py): above the service ports, below the ephemeral range,
# taken in blocks of RAY_BLOCK ports, one block per node.
DEFAULT_RAY_RANGE = (30000, 32767)
RAY_BLOCK = 40
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_RANGE = re.compile(r"^\s*(\d{1,5})\s*-\s*(\d{1,5})\s*$")


class PortRangeError(ValueError):
    pass


def ephemeral_range(path: Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int] | None:
    """The kernel's ephemeral port range (two numbers in the /proc file), or None where there is none."""
    try:
        low, high = (int(part) for part in path.read_text().split())
    except (OSError, ValueError):  # not Linux, or an unexpected format: nothing to check against
        return None
    return low, high


def _split(text: str, example: tuple[int, int], what: str) -> tuple[int, int]:
    match = _RANGE.match(text or "")
    if not match:
        raise PortRangeError(f"{what} {text!r}: write LOW-HIGH, e.g. {example[0]}-{example[1]}")
    return int(match[1]), int(match[2])


def parse_port_range(text: str, ephemeral: tuple[int, int] | None = None) -> tuple[int, int]:
    """`20000-29999` -> (20000, 29999), checked: ports 1024-65535, low <= high, clear of the ephemeral range."""
    return validate_port_range(*_split(text, DEFAULT_RANGE, "port range"), ephemeral)


def validate_port_range(low: int, high: int, ephemeral: tuple[int, int] | None = None, what: str = "port range",
                        example: tuple[int, int] = DEFAULT_RANGE) -> tuple[int, int]:
    if not 1024 <= low <= high <= 65535:
        raise PortRangeError(f"{what} {low}-{high}: ports must lie in 1024-65535 with LOW <= HIGH")
    if ephemeral is not None and low <= ephemeral[1] and ephemeral[0] <= high:
        raise PortRangeError(
            f"{what} {low}-{high} overlaps the kernel's ephemeral range {ephemeral[0]}-{ephemeral[1]} "
            f"({EPHEMERAL_RANGE_FILE}), whose ports outgoing connections take at any time; choose a range "
            f"outside it (e.g. {example[0]}-{example[1]})")
    return low, high


def parse_ray_port_range(text: str, service: tuple[int, int] = DEFAULT_RANGE,
                         ephemeral: tuple[int, int] | None = None) -> tuple[int, int]:
    """`30000-32767` -> (30000, 32767), checked like a service range, and also: room for one Ray node's
    block of ports, and no port shared with the service range `service` (a workload and a Ray node
    would take the same port)."""
    return validate_ray_port_range(*_split(text, DEFAULT_RAY_RANGE, "Ray port range"), service, ephemeral)


def validate_ray_port_range(low: int, high: int, service: tuple[int, int] = DEFAULT_RANGE,
                            ephemeral: tuple[int, int] | None = None) -> tuple[int, int]:
    validate_port_range(low, high, ephemeral, what="Ray port range", example=DEFAULT_RAY_RANGE)
    if high - low + 1 < RAY_BLOCK:
        raise PortRangeError(f"Ray port range {low}-{high} has {high - low + 1} ports; one Ray node needs "
                             f"{RAY_BLOCK} (give {RAY_BLOCK} per node this worker may run)")
    if low <= service[1] and service[0] <= high:
        raise PortRangeError(f"Ray port range {low}-{high} overlaps the service port range {service[0]}-{service[1]} "
                             f"(--port-range); choose ranges apart (e.g. {DEFAULT_RAY_RANGE[0]}-{DEFAULT_RAY_RANGE[1]})")
    return low, high


class PortAllocator:
    def __init__(self, host: str, low: int = DEFAULT_RANGE[0], high: int = DEFAULT_RANGE[1]):
        self.host = host
        self.low, self.high = low, high
        self.in_use: set[int] = set()  # handed out and not released: never handed out again meanwhile
        self._next = low

    def allocate(self) -> int:
        span = self.high - self.low + 1
        for _ in range(span):
            port = self._next
            self._next = self.low + (self._next - self.low + 1) % span
            if port in self.in_use or not bindable(self.host, port):
                continue
            self.in_use.add(port)
            return port
        raise RuntimeError(f"no free port in {self.low}-{self.high} on {self.host} "
                           f"({len(self.in_use)} held by this agent's workloads)")

    def reserve(self, port: int) -> None:
        """A port already in use by a workload this agent took over (adopted after a restart)."""
        self.in_use.add(port)

    def release(self, port: int | None) -> None:
        self.in_use.discard(port)


def bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
