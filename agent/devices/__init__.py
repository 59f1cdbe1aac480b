"""Host and GPU inventory: NVML where it loads, simulated GPUs on request, CPU and RAM always."""

from __future__ import annotations

import logging
import platform
import re
import socket
import uuid
from typing import Any

import psutil

from server.schemas import GPUDevice, GPUProcess, HostInfo

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
        self.power_watts: dict[int, float] = {}  # from the last read, by GPU index (each GPUDevice has it too)
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
        gpus = [read_nvml_device(self._nvml, index) for index in range(self._nvml.nvmlDeviceGetCount())]
        self.power_watts = {g.index: g.power_watts for g in gpus if g.power_watts is not None}
        return gpus


def _optional(nv: Any, function: str, *args: Any) -> Any:
    """A value NVML may not have on this GPU or driver (NotSupported, NoPermission...), or a function an
    older nvidia-ml-py lacks: None then."""
    call = getattr(nv, function, None)
    if call is None:
        return None
    try:
        return call(*args)
    except nv.NVMLError:
        return None


def read_nvml_device(nv: Any, index: int) -> GPUDevice:
    """One GPU from NVML (`nv` is the pynvml module): the values every GPU has, then the optional ones."""
    handle = nv.nvmlDeviceGetHandleByIndex(index)
    memory = nv.nvmlDeviceGetMemoryInfo(handle)
    rates = _optional(nv, "nvmlDeviceGetUtilizationRates", handle)
    temperature = _optional(nv, "nvmlDeviceGetTemperature", handle, nv.NVML_TEMPERATURE_GPU)
    milliwatts = _optional(nv, "nvmlDeviceGetPowerUsage", handle)
    mig = _optional(nv, "nvmlDeviceGetMigMode", handle)  # [current, pending]; NotSupported before Ampere
    processes: dict[int, GPUProcess] = {}
    for kind, function in (("graphics", "nvmlDeviceGetGraphicsRunningProcesses"),
                           ("compute", "nvmlDeviceGetComputeRunningProcesses")):
        for proc in _optional(nv, function, handle) or []:
            used = proc.usedGpuMemory  # None where the driver cannot tell (WDDM, some MIG setups)
            # A process with both contexts is listed once, as compute (what serving uses).
            processes[int(proc.pid)] = GPUProcess(pid=int(proc.pid), kind=kind,
                                                  used_memory=int(used) if used is not None else None)
    return GPUDevice(
        index=index, name=_text(nv.nvmlDeviceGetName(handle)), vendor="nvidia", uuid=_text(nv.nvmlDeviceGetUUID(handle)),
        memory_total=int(memory.total), memory_used=int(memory.used),
        utilization=float(rates.gpu) if rates is not None else 0.0,
        temperature=float(temperature) if temperature is not None else None,
        power_watts=milliwatts / 1000.0 if milliwatts is not None else None,
        mig_mode=(mig[0] == nv.NVML_DEVICE_MIG_ENABLE) if mig is not None else None,
        processes=sorted(processes.values(), key=lambda p: p.pid))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def host_info() -> HostInfo:
    memory = psutil.virtual_memory()
    return HostInfo(hostname=socket.gethostname(), os=f"{platform.system()} {platform.release()}",
                    cpu_count=psutil.cpu_count() or 0, cpu_percent=psutil.cpu_percent(interval=None),
                    memory_total=memory.total, memory_used=memory.total - memory.available)
