"""GPU inventory: the NVML translation (name, UUID, memory, utilisation, temperature, power, MIG mode,
processes) checked with nvidia-ml-py's own structures and errors, and the real NVML path on this GPU-less
machine. scripts/gpu-check.py runs the same reading against a real GPU."""

from __future__ import annotations

import pynvml
import pytest

from agent.devices import GPUInventory, read_nvml_device
from agent.metrics import families
from server.schemas import GPUDevice, HostInfo, WorkerHeartbeat


def _process(pid: int, used: int | None):
    """What pynvml returns per process: its ctypes structure, made friendly, None for an unknown amount."""
    raw = pynvml.c_nvmlProcessInfo_v2_t(pid=pid, usedGpuMemory=used if used is not None else
                                        pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value)
    friendly = pynvml.nvmlStructToFriendlyObject(raw)
    if friendly.usedGpuMemory == pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value:
        friendly.usedGpuMemory = None  # as pynvml's nvmlDeviceGet*RunningProcesses do
    return friendly


class DriverDouble:
    """Stands in for libnvidia-ml behind pynvml's function names (no GPU here): each call answers with the
    structure or NVMLError that pynvml itself returns or raises."""

    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_DEVICE_MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE

    def __init__(self, gpus: list[dict]):
        self.gpus = gpus

    def _get(self, handle: int, key: str):
        value = self.gpus[handle][key]
        if isinstance(value, int) and key == "error":
            raise pynvml.NVMLError(value)
        if value is NotImplemented:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return value

    def nvmlDeviceGetCount(self): return len(self.gpus)
    def nvmlDeviceGetHandleByIndex(self, index): return index
    def nvmlDeviceGetName(self, h): return self._get(h, "name")
    def nvmlDeviceGetUUID(self, h): return self._get(h, "uuid")

    def nvmlDeviceGetMemoryInfo(self, h):
        total, used = self._get(h, "memory")
        return pynvml.c_nvmlMemory_t(total=total, free=total - used, used=used)

    def nvmlDeviceGetUtilizationRates(self, h):
        return pynvml.c_nvmlUtilization_t(gpu=self._get(h, "util"), memory=0)

    def nvmlDeviceGetTemperature(self, h, sensor):
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._get(h, "temperature")

    def nvmlDeviceGetPowerUsage(self, h): return self._get(h, "milliwatts")
    def nvmlDeviceGetMigMode(self, h): return self._get(h, "mig")
    def nvmlDeviceGetComputeRunningProcesses(self, h): return [_process(*p) for p in self._get(h, "compute")]
    def nvmlDeviceGetGraphicsRunningProcesses(self, h): return [_process(*p) for p in self._get(h, "graphics")]


H100 = {"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-4c1f0a9e-8d3b-4f0e-9a51-1e2d3c4b5a69",
        "memory": (85520809984, 1073741824 + 524288000), "util": 37, "temperature": 41, "milliwatts": 123456,
        "mig": [0, 0], "compute": [(4242, 1073741824), (5151, None)], "graphics": [(4242, 1073741824), (777, 524288000)]}


def test_nvml_translation_of_a_full_gpu():
    gpu = read_nvml_device(DriverDouble([H100]), 0)
    assert gpu.name == "NVIDIA H100 80GB HBM3" and gpu.uuid == H100["uuid"] and gpu.vendor == "nvidia"
    assert (gpu.memory_total, gpu.memory_used) == (85520809984, 1598029824)
    assert gpu.utilization == 37.0 and gpu.temperature == 41.0 and gpu.power_watts == pytest.approx(123.456)
    assert gpu.mig_mode is False and not gpu.simulated
    # 4242 has compute and graphics contexts: listed once, as compute; 5151's amount is unknown to the driver.
    assert [(p.pid, p.kind, p.used_memory) for p in gpu.processes] == [
        (777, "graphics", 524288000), (4242, "compute", 1073741824), (5151, "compute", None)]


def test_nvml_values_a_gpu_does_not_support_are_absent():
    old = H100 | {"name": b"Tesla T4", "uuid": b"GPU-00000000-1111-2222-3333-444444444444",
                  "mig": NotImplemented, "milliwatts": NotImplemented, "temperature": NotImplemented,
                  "util": NotImplemented, "compute": NotImplemented, "graphics": []}
    gpu = read_nvml_device(DriverDouble([old]), 0)
    assert gpu.name == "Tesla T4" and gpu.uuid.startswith("GPU-0000")  # bytes from older drivers
    assert gpu.mig_mode is None and gpu.power_watts is None and gpu.temperature is None
    assert gpu.utilization == 0.0 and gpu.processes == []


def test_nvml_mig_enabled():
    assert read_nvml_device(DriverDouble([H100 | {"mig": [1, 1]}]), 0).mig_mode is True


def test_inventory_reads_every_gpu_and_keeps_power_for_metrics():
    inventory = GPUInventory(simulate=None)
    inventory._nvml = DriverDouble([H100, H100 | {"uuid": "GPU-2", "milliwatts": NotImplemented}])
    gpus = inventory.read()
    assert [g.index for g in gpus] == [0, 1] and inventory.power_watts == {0: pytest.approx(123.456)}
    # The heartbeat carries the details; /metrics exports power per GPU.
    body = WorkerHeartbeat(gpus=gpus, host=HostInfo()).model_dump(mode="json")
    assert body["gpus"][0]["processes"][1] == {"pid": 4242, "used_memory": 1073741824, "kind": "compute"}
    power = next(f for f in families(HostInfo(), gpus, [], "w1") if f.name == "maas_gpu_power_watts")
    assert [s.value for s in power.samples] == [pytest.approx(123.456)]


def test_no_nvidia_driver_here_means_no_gpus():
    with pytest.raises(pynvml.NVMLError_LibraryNotFound):
        pynvml.nvmlInit()  # the fact the inventory relies on (FIELD-NOTES)
    assert GPUInventory().read() == []


def test_gpu_schema_defaults_keep_old_agents_readable():
    old = GPUDevice.model_validate({"index": 0, "name": "L4", "memory_total": 24 * 10**9})
    assert old.processes == [] and old.mig_mode is None and old.power_watts is None
