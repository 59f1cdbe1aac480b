"""`maas doctor`: the checks an agent runs on its own host, each with a status and a one-line fix.

The server asks (POST /doctor on the agent's endpoint, with the agent's secret, as for instance logs)
and passes its clock and the other workers' addresses; `run_checks` answers with a list of
DoctorCheck. The judging functions are pure (inputs in, a DoctorCheck out) so they are tested as is;
`run_checks` gathers the inputs from this host: NVML, the Docker engine, /proc, the model cache's disk,
the server, the peers, the interpreters of the backends.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import aiohttp

from server.schemas.telemetry import DoctorCheck

GIB = 1 << 30
DISK_WARN_BYTES = 20 * GIB
DISK_FAIL_BYTES = 2 * GIB
SKEW_WARN_SECONDS = 2.0
SKEW_FAIL_SECONDS = 30.0
# Python packages each backend runs from (in the agent's interpreter or the backend's own).
BACKEND_PACKAGES = {"llama.cpp": "xllamacpp", "vllm": "vllm", "sglang": "sglang", "voxbox": "vox-box"}


def check(name: str, status: str, detail: str, fix: str = "") -> DoctorCheck:
    return DoctorCheck(name=name, status=status, detail=detail, fix=fix if status != "ok" else "")


# --- pure judges -----------------------------------------------------------------------------------


def judge_nvml(driver: str | None, gpus: int, error: str | None, simulated: bool) -> DoctorCheck:
    if simulated:
        return check("nvml", "ok", f"simulated GPUs ({gpus}); NVML is not used")
    if driver is not None:
        return check("nvml", "ok", f"driver {driver}, {gpus} GPU(s)")
    return check("nvml", "warn", f"NVML not available ({error or 'unknown error'}): this worker serves on CPU only",
                 "install the NVIDIA driver so that `nvidia-smi` works, or deploy CPU backends only here")


def judge_docker(runtime: str, engine: str | None, error: str | None, runtimes: Iterable[str], gpus: int) -> list[DoctorCheck]:
    """`engine`: the engine's version (None: no engine answered)."""
    if engine is None:
        if runtime == "docker":
            return [check("docker", "fail", f"no Docker engine answers ({error or 'no socket'}), and the runtime is docker",
                          "start dockerd (or set DOCKER_HOST), or run the agent with --runtime process")]
        return [check("docker", "ok", f"not used (runtime {runtime}); no engine answers here")]
    out = [check("docker", "ok", f"engine {engine} (runtime {runtime})")]
    names = set(runtimes)
    if "nvidia" in names:
        out.append(check("docker-nvidia", "ok", "NVIDIA container runtime registered"))
    elif gpus and runtime != "process":
        out.append(check("docker-nvidia", "fail", "no NVIDIA container runtime: containers cannot see the GPUs",
                         "install nvidia-container-toolkit and run `nvidia-ctk runtime configure --runtime=docker`"))
    else:
        out.append(check("docker-nvidia", "warn" if runtime != "process" else "ok",
                         f"no NVIDIA runtime (runtimes: {', '.join(sorted(names)) or 'none'}); "
                         f"{'no GPUs here' if not gpus else 'containers are not used'}",
                         "install nvidia-container-toolkit before running GPU containers here"))
    return out


def overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    low, high = max(a[0], b[0]), min(a[1], b[1])
    return (low, high) if low <= high else None


def listening_ports(proc_net_text: str) -> set[int]:
    """Local ports in LISTEN state (st 0A) in /proc/net/tcp or tcp6 text."""
    ports = set()
    for line in proc_net_text.splitlines()[1:]:
        parts = line.split()
        if len(parts) > 3 and parts[3] == "0A":
            try:
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
            except (IndexError, ValueError):
                continue
    return ports


def judge_ports(name: str, what: str, span: tuple[int, int], ephemeral: tuple[int, int] | None,
                taken: set[int]) -> DoctorCheck:
    size = span[1] - span[0] + 1
    busy = sum(1 for p in taken if span[0] <= p <= span[1])
    detail = f"{what} {span[0]}-{span[1]}: {size - busy} of {size} free"
    if ephemeral is not None:
        detail += f"; kernel ephemeral range {ephemeral[0]}-{ephemeral[1]}"
        shared = overlap(span, ephemeral)
        if shared:
            return check(name, "fail", detail + f" overlaps it at {shared[0]}-{shared[1]}: outgoing connections "
                         "take these ports at random", f"choose a {what} outside {ephemeral[0]}-{ephemeral[1]} (or "
                         "narrow net.ipv4.ip_local_port_range / reserve with ip_local_reserved_ports)")
    if busy * 10 > size:
        return check(name, "warn", detail + f" ({busy} taken by other programs)",
                     f"free ports in {span[0]}-{span[1]} or choose another {what}")
    return check(name, "ok", detail)


def judge_disk(path: Path, free: int | None, total: int | None) -> DoctorCheck:
    if free is None:
        return check("disk", "warn", f"cannot read the free space of {path}", "create the model cache folder")
    detail = f"{path}: {free / GIB:.1f} GiB free of {(total or 0) / GIB:.1f} GiB"
    if free < DISK_FAIL_BYTES:
        return check("disk", "fail", detail, "free space there or move the model cache (--model-cache)")
    if free < DISK_WARN_BYTES:
        return check("disk", "warn", detail + " (a 7B model needs ~15 GiB)",
                     "free space there or move the model cache (--model-cache)")
    return check("disk", "ok", detail)


def judge_clock(skew: float | None) -> DoctorCheck:
    if skew is None:
        return check("clock", "warn", "the server did not send its time", "update the server")
    detail = f"{skew:+.2f} s from the server"
    if abs(skew) >= SKEW_FAIL_SECONDS:
        return check("clock", "fail", detail, "synchronise the clocks (chrony or systemd-timesyncd) on both hosts")
    if abs(skew) >= SKEW_WARN_SECONDS:
        return check("clock", "warn", detail, "synchronise the clocks (chrony or systemd-timesyncd)")
    return check("clock", "ok", detail)


def judge_python(version: tuple[int, ...], packages: dict[str, str | None]) -> list[DoctorCheck]:
    text = ".".join(map(str, version[:3]))
    out = [check("python", "ok" if version >= (3, 11) else "fail", f"Python {text} ({sys.executable})",
                 "run the agent with Python 3.11 or newer")]
    for backend, found in sorted(packages.items()):
        if found:
            out.append(check(f"backend {backend}", "ok", found))
        else:
            out.append(check(f"backend {backend}", "skip", "not installed for this agent",
                             f"install {BACKEND_PACKAGES.get(backend, backend)} to serve {backend} here"))
    return out


# --- gathering on this host ------------------------------------------------------------------------


def nvml_status() -> tuple[str | None, int, str | None]:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            driver = pynvml.nvmlSystemGetDriverVersion()
            return (driver.decode() if isinstance(driver, bytes) else str(driver)), pynvml.nvmlDeviceGetCount(), None
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # NVMLError_LibraryNotFound and friends, or no pynvml
        return None, 0, f"{type(exc).__name__}: {exc}"


def docker_status() -> tuple[str | None, str | None, list[str]]:
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            info = client.info()
            return str(client.version().get("Version", "?")), None, list((info.get("Runtimes") or {}).keys())
        finally:
            client.close()
    except Exception as exc:
        return None, f"{type(exc).__name__}: {str(exc)[:160]}", []


def package_version(python: str | None, package: str) -> str | None:
    """The package's version in this interpreter, or in `python` (another venv) when given."""
    if python is None or python == sys.executable:
        try:
            return f"{package} {importlib.metadata.version(package)}"
        except importlib.metadata.PackageNotFoundError:
            return None
    try:
        done = subprocess.run([python, "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
                              capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return f"{package} {done.stdout.strip()} ({python})" if done.returncode == 0 else None


def read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


async def reach(http: aiohttp.ClientSession | None, url: str) -> DoctorCheck:
    if http is None:
        return check("server", "warn", "no HTTP client", "restart the agent")
    started = time.monotonic()
    try:
        async with http.get(f"{url}/healthz", timeout=aiohttp.ClientTimeout(total=5)) as response:
            if response.status < 500:
                return check("server", "ok", f"{url} answers in {(time.monotonic() - started) * 1000:.0f} ms")
            return check("server", "warn", f"{url}/healthz answered HTTP {response.status}", "see the server's log")
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        return check("server", "fail", f"{url} unreachable: {exc or type(exc).__name__}",
                     "check --server-url, the firewall and that the server runs")


async def connect(address: str, timeout: float = 3.0) -> str | None:
    """None when a TCP connection to host:port opens, else why not."""
    host, _, port = address.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), timeout)
        writer.close()
        return None
    except (OSError, ValueError, asyncio.TimeoutError) as exc:
        return str(exc) or type(exc).__name__


def judge_peers(results: dict[str, str | None]) -> DoctorCheck:
    if not results:
        return check("peers", "ok", "no other ready workers to reach")
    failed = {a: why for a, why in results.items() if why is not None}
    if not failed:
        return check("peers", "ok", f"{len(results)} other worker(s) reachable over TCP")
    shown = ", ".join(f"{a} ({why})" for a, why in list(failed.items())[:3])
    return check("peers", "fail", f"{len(failed)} of {len(results)} workers unreachable: {shown}",
                 "open the agent and Ray port ranges between workers (multi-host placements need them)")


async def run_checks(agent: Any, server_time: float | None, peers: list[str]) -> list[DoctorCheck]:
    """Every check on this host; `agent` gives the configuration (agent/agent.py Agent)."""
    config = agent.config
    skew = time.time() - server_time if server_time else None

    def blocking() -> list[DoctorCheck]:
        from agent.ports import ephemeral_range

        out: list[DoctorCheck] = []
        simulated = bool(config.simulate_gpus)
        driver, count, error = (None, 0, None) if simulated else nvml_status()
        gpus = len(agent.gpus.read()) if simulated else count
        out.append(judge_nvml(driver, gpus, error, simulated))
        runtime = agent.runtime.name  # agent/runtimes/base.py Runtime
        engine, docker_error, runtimes = docker_status()
        out.extend(judge_docker(runtime if config.runtime != "auto" else f"auto: {runtime}",
                                engine, docker_error, runtimes, gpus))
        ephemeral = ephemeral_range()
        taken = listening_ports(read_text("/proc/net/tcp") + "\n" + read_text("/proc/net/tcp6"))
        out.append(judge_ports("service ports", "port range", tuple(config.port_range), ephemeral, taken))
        out.append(judge_ports("ray ports", "Ray port range", tuple(config.ray_port_range), ephemeral, taken))
        cache = Path(config.model_cache or config.data_dir / "models")
        probe = cache if cache.exists() else config.data_dir
        try:
            usage = shutil.disk_usage(probe)
            out.append(judge_disk(cache, usage.free, usage.total))
        except OSError:
            out.append(judge_disk(cache, None, None))
        out.append(judge_clock(skew))
        packages = {b: package_version(config.backend_python.get(b), p) for b, p in BACKEND_PACKAGES.items()}
        out.extend(judge_python(sys.version_info, packages))
        out.append(check("platform", "ok", f"{platform.system()} {platform.release()} {platform.machine()}"))
        return out

    results = await asyncio.gather(*(connect(p) for p in peers))
    checks = await asyncio.to_thread(blocking)
    checks.insert(-1, await reach(agent.api.http, config.server_url))
    checks.insert(-1, judge_peers(dict(zip(peers, results))))
    return checks
