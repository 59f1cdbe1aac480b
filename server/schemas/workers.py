"""The wire contract of workers: registration (and the approval of a taken name), heartbeats with their
GPUs, host and per-instance usage, and what the API says of a worker. Re-exported by `server.schemas`."""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import Field, field_validator

from server.schemas import Schema


class GPUProcess(Schema):
    pid: int
    used_memory: int | None = Field(default=None, ge=0, description="bytes; None where the driver does not say")
    kind: Literal["compute", "graphics"] = "compute"


class GPUDevice(Schema):
    index: int
    name: str
    vendor: str = "nvidia"
    uuid: str | None = None
    memory_total: int = Field(ge=0, description="bytes")
    memory_used: int = Field(default=0, ge=0, description="bytes")
    utilization: float = Field(default=0.0, ge=0, le=100)
    temperature: float | None = None
    power_watts: float | None = Field(default=None, ge=0, description="power draw (NVML)")
    mig_mode: bool | None = Field(default=None, description="MIG enabled (None: not supported or unknown)")
    processes: list[GPUProcess] = Field(default_factory=list, description="processes using this GPU (NVML)")
    simulated: bool = False


class HostInfo(Schema):
    hostname: str = ""
    os: str = ""
    cpu_count: int = Field(default=0, ge=0)
    cpu_percent: float = Field(default=0.0, ge=0)
    memory_total: int = Field(default=0, ge=0, description="bytes")
    memory_used: int = Field(default=0, ge=0, description="bytes")


class WorkerState(StrEnum):
    ready = "ready"
    not_ready = "not_ready"


# A DNS name: dot-separated labels of letters, digits and inner hyphens, 63 characters at most each.
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def address_problem(address: str) -> str | None:
    """Why `address` is not an IP address or a DNS name (None when it is one). The server, the gateway
    and Ray put it into URLs and command lines, so nothing else may pass."""
    if "%" in address:  # an IPv6 zone takes any text after the %
        return f"{address[:80]!r}: an IPv6 zone (%...) is not taken; give the address without it"
    try:
        ipaddress.ip_address(address)
        return None
    except ValueError:
        pass
    name = address[:-1] if address.endswith(".") else address
    if not name or len(name) > 253 or not all(_DNS_LABEL.match(label) for label in name.split(".")):
        return f"{address[:80]!r} is neither an IP address nor a DNS name"
    if name.replace(".", "").isdigit():
        return f"{address[:80]!r} is neither an IP address nor a DNS name (all digits)"
    return None


class WorkerRegister(Schema):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    address: str = Field(min_length=1, max_length=255,
                         description="where the server and gateway reach this worker: an IP address or a DNS name")
    agent_port: int = Field(ge=1, le=65535)
    labels: dict[str, str] = Field(default_factory=dict)
    gpus: list[GPUDevice] = Field(default_factory=list)
    host: HostInfo = Field(default_factory=HostInfo)
    token: str | None = Field(default=None, max_length=200, description=(
        "the worker's current token, when it registers again under its name (a restarted agent keeps "
        "its identity); without it a taken name waits for `maas worker approve NAME`"))

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if problem := address_problem(value):
            raise ValueError(problem)
        return value


class InstanceUsage(Schema):
    """What an instance's processes really use on its worker (agent/usage.py), sent with heartbeats and
    compared with the claim by the server (server/memory_drift.py)."""

    instance_id: int = Field(ge=1)
    ram_bytes: int = Field(default=0, ge=0, description="resident memory of the process tree (host RSS)")
    gpu_bytes: dict[int, int] = Field(default_factory=dict, description="GPU index -> bytes its processes use (NVML)")


class WorkerHeartbeat(Schema):
    gpus: list[GPUDevice] = Field(default_factory=list)
    host: HostInfo = Field(default_factory=HostInfo)
    usage: list[InstanceUsage] = Field(default_factory=list, max_length=4096)


class WorkerOut(Schema):
    id: int
    name: str
    address: str
    agent_port: int
    labels: dict[str, str]
    state: WorkerState
    state_message: str = ""
    cordoned: bool = False
    draining: bool = False
    gpus: list[GPUDevice]
    host: HostInfo
    last_heartbeat_at: datetime | None = None
    created_at: datetime
    updated_at: datetime


class WorkerRegistrationRequest(Schema):
    """A registration under a taken worker name that did not present the worker's current token."""

    address: str
    agent_port: int
    requested_at: datetime


class WorkerApproval(Schema):
    """A worker name's takeover: the registration waiting for approval, and the approval once given
    (it lets the next registration under the name through, once, until `approved_until`)."""

    worker: str
    pending: WorkerRegistrationRequest | None = None
    approved_by: str = ""
    approved_until: datetime | None = None


class WorkerRegistered(Schema):
    worker: WorkerOut
    token: str = Field(description="the worker's own credential for heartbeats, status and the watch")
    agent_secret: str = Field(description="what the server presents when it calls the agent (logs)")
