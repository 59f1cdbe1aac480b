"""Host and GPU inventory: NVML where it loads, simulated GPUs on request, CPU and RAM always."""

from __future__ import annotations

import logging
import platform
import re
import socket
import uuid

import psutil

from server.schemas import GPUDevice, HostInfo

log = logging.getLogger(__name__)
GB = 1000**3
_SIMULATED = re.compile(r"^(\d+)x([A-Za-z0-9.]+)-(\d+)GB$")


class DeviceSpecError(ValueError):
    pass


def parse_simulated(spec: str) -> list[GPUDevice]:
    """`4xH100-80GB,2xL4-24GB` -> simulated GPUs, indexed in order. Always labelled simulated."""
    gpus: list[GPUDevice] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        match = _SIMULATED.match(part)
        if not match:
            raise DeviceSpecError(f"cannot read {part!r}: write COUNTxNAME-MEMGB, e.g. 4xH100-80GB,2xL4-24GB")
        count, name, memory_gb = int(match[1]), match[2], int(match[3])
        if not 1 <= count <= 64 or not 1 <= memory_gb <= 4096:
            raise DeviceSpecError(f"{part!r}: count must be 1..64 and memory 1..4096 GB")
        for _ in range(count):
            index = len(gpus)
            gpus.append(GPUDevice(index=index, name=f"{name} (simulated)", vendor="simulated",
                                  uuid=f"SIM-{uuid.uuid5(uuid.NAMESPACE_OID, f'{socket.gethostname()}-{index}')}",
                                  memory_total=memory_gb * GB, simulated=True))
    return gpus


class GPUInventory:
    """Reads GPUs each heartbeat. NVML is initialised once; a host without it has no GPUs (said once)."""

    def __init__(self, simulate: str | None = None):
        self.simulated = parse_simulated(simulate) if simulate else None
        self._nvml = None
        self.power_watts: dict[int, float] = {}  # from the last read (for /metrics; not on the wire)
        if self.simulated is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception as exc:  # NVMLError_LibraryNotFound on hosts without the NVIDIA driver
                log.info("no NVIDIA GPUs usable here (%s); serving from CPU and RAM", exc)

    def read(self) -> list[GPUDevice]:
        if self.simulated is not None:
            return [g.model_copy() for g in self.simulated]
        if self._nvml is None:
            return []
        nv = self._nvml
        gpus = []
        for index in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            memory = nv.nvmlDeviceGetMemoryInfo(handle)
            try:
                utilization = float(nv.nvmlDeviceGetUtilizationRates(handle).gpu)
            except nv.NVMLError:
                utilization = 0.0
            try:
                temperature = float(nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU))
            except nv.NVMLError:
                temperature = None
            try:
                self.power_watts[index] = nv.nvmlDeviceGetPowerUsage(handle) / 1000.0  # milliwatts
            except nv.NVMLError:
                self.power_watts.pop(index, None)
            name = nv.nvmlDeviceGetName(handle)
            gpus.append(GPUDevice(
                index=index, name=name.decode() if isinstance(name, bytes) else name, vendor="nvidia",
                uuid=_text(nv.nvmlDeviceGetUUID(handle)), memory_total=int(memory.total), memory_used=int(memory.used),
                utilization=utilization, temperature=temperature))
        return gpus


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def host_info() -> HostInfo:
    memory = psutil.virtual_memory()
    return HostInfo(hostname=socket.gethostname(), os=f"{platform.system()} {platform.release()}",
                    cpu_count=psutil.cpu_count() or 0, cpu_percent=psutil.cpu_percent(interval=None),
                    memory_total=memory.total, memory_used=memory.total - memory.available)
