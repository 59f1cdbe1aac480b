"""The Docker tier's machinery (tests/test_docker_engine.py, `make test-docker`): a private Docker engine, a
registry on loopback, a slow link to it, and a small llama.cpp image built here.

- The engine is Debian's `dockerd` (scripts/ensure-docker.sh installs it), started on a socket, data root,
  exec root and pidfile of its own under /tmp, with `--iptables=false --bridge=none`: it never touches
  /var/run/docker.sock (which every other test's `--runtime auto` would ask) nor the iptables FORWARD policy
  (which the Ray tier's network namespaces need), and it is stopped and its folder removed afterwards.
  Containers use the host's network, as the agent runs them.
- The registry is Debian's `docker-registry` (distribution 2.8) on 127.0.0.1 with its own storage folder.
  Pulls go through `throttle` (this file run as a script): a TCP relay that passes the registry's answers at
  a few MB/s, so that a pull lasts long enough for `maas instance list` to show its percentage (on loopback
  the whole pull would take a fraction of a second). The registry, the engine and the pull are real.
- The image holds what the llama.cpp backend needs and nothing else, taken from this machine (no public
  registry is reachable): the Python interpreter of the test run (its standard library, without tests and
  tkinter), the `xllamacpp` package, the shared libraries `ldd` names for them, and
  agent/backends/llamacpp_server.py as the entrypoint. That wrapper takes llama-server's flags, so the agent
  runs this image exactly as it runs the official `ghcr.io/ggml-org/llama.cpp:server` (MAAS_LLAMACPP_IMAGE
  names it). It is one `docker import`ed layer of about 150 MB (about 50 MB compressed).
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
PREFIX = "/opt/python"  # where the interpreter lives in the image
ENTRYPOINT = [f"{PREFIX}/bin/python3", "/opt/maas/llamacpp_server.py"]
# Parts of the standard library the wrapper never imports (most of its size, and Tk's and X11's libraries).
STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "site-packages", "pydoc_data",
               "__pycache__"}
STDLIB_SKIP_PREFIXES = ("config-", "_tkinter", "_test", "_xxtestfuzz", "xxlimited", "_ctypes_test")


def why_not() -> str | None:
    """None when the tier can run here, else why it is skipped."""
    if os.environ.get("MAAS_TEST_DOCKER") != "1":
        return "the Docker tier runs with `make test-docker` (MAAS_TEST_DOCKER=1): it starts its own dockerd"
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux (it starts its own dockerd)"
    for tool in ("dockerd", "containerd", "runc", "docker-registry", "ldd"):
        if shutil.which(tool, path=SBIN_PATH) is None:
            return f"{tool} is not installed (scripts/ensure-docker.sh installs docker.io and docker-registry as root)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until(check, timeout: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            break
        try:
            if check():
                return
        except Exception:  # not up yet
            pass
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not come up in {timeout:g} s:\n{tail}")


def _stop(process: subprocess.Popen, grace: float) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


class PrivateEngine:
    """dockerd on a socket of its own; `stop()` leaves nothing behind."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="maas-docker-", dir="/tmp"))  # short: a socket path has a limit
        self.host = f"unix://{self.root}/docker.sock"
        self.log = self.root / "dockerd.log"
        self.process: subprocess.Popen | None = None
        self._made_run_docker = not Path("/run/docker").exists()  # dockerd makes /run/docker/plugins

    def start(self) -> None:
        import docker

        (self.root / "daemon.json").write_text("{}")  # not the machine's /etc/docker/daemon.json
        command = [shutil.which("dockerd", path=SBIN_PATH), "-H", self.host, "--data-root", str(self.root / "data"),
                   "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "docker.pid"),
                   "--config-file", str(self.root / "daemon.json"), "--iptables=false", "--ip-masq=false",
                   "--bridge=none", "--log-level=warn"]
        env = {**os.environ, "PATH": SBIN_PATH}
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)

        def connected() -> bool:  # the client asks the engine's API version as it is made
            self.client = docker.DockerClient(base_url=self.host, timeout=120)
            return self.client.ping()

        _wait_until(connected, 60, "dockerd", self.process, self.log)

    def env(self) -> dict[str, str]:
        return {"DOCKER_HOST": self.host}

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process, 30)  # dockerd stops its containers and its containerd
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if len(line.split()) > 1 and line.split()[1].startswith(str(self.root))]
        for mount in sorted(mounts, reverse=True):  # left only by a dockerd that had to be killed
            subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
        if self._made_run_docker:
            shutil.rmtree("/run/docker", ignore_errors=True)


class LocalRegistry:
    """docker-registry on 127.0.0.1 (the engine trusts loopback registries over plain HTTP)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.processes: list[subprocess.Popen] = []

    def start(self) -> None:
        import urllib.request

        config = self.root / "registry.yml"
        config.write_text(f"""version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {self.root / 'registry'}
  delete:
    enabled: true
http:
  addr: {self.address}
""")
        log = self.root / "registry.log"
        with open(log, "ab") as out:
            self.processes.append(subprocess.Popen([shutil.which("docker-registry", path=SBIN_PATH), "serve",
                                                    str(config)], stdout=out, stderr=subprocess.STDOUT,
                                                   start_new_session=True))
        _wait_until(lambda: urllib.request.urlopen(f"http://{self.address}/v2/", timeout=2).status == 200, 30,
                    "docker-registry", self.processes[0], log)

    def slow_link(self, bytes_per_second: int) -> str:
        """host:port of a relay to the registry that passes its answers at `bytes_per_second`."""
        port = free_port()
        self.processes.append(subprocess.Popen([sys.executable, __file__, "throttle", str(port), str(self.port),
                                                str(bytes_per_second)], start_new_session=True))
        _wait_until(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() is None, 15,
                    "the throttling relay", self.processes[-1])
        return f"127.0.0.1:{port}"

    def stop(self) -> None:
        for process in self.processes:
            _stop(process, 10)


# --- the image ------------------------------------------------------------------------------


def _libraries(binaries: list[str]) -> set[str]:
    """The shared libraries (and the ELF interpreter) `ldd` names for `binaries`, as absolute paths."""
    found: set[str] = set()
    for chunk in range(0, len(binaries), 50):
        done = subprocess.run(["ldd", *binaries[chunk:chunk + 50]], capture_output=True, text=True)
        for line in done.stdout.splitlines():
            parts = line.split()
            if "=>" in parts and len(parts) > parts.index("=>") + 1 and parts[parts.index("=>") + 1].startswith("/"):
                found.add(parts[parts.index("=>") + 1])
            elif parts and parts[0].startswith("/") and "(" in line:  # /lib64/ld-linux-x86-64.so.2 (0x...)
                found.add(parts[0])
    return found


def image_files() -> dict[str, Path]:
    """Path in the image -> file on this machine."""
    base = Path(sys.base_prefix)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    files: dict[str, Path] = {f"{PREFIX}/bin/python3": Path(os.path.realpath(sys.executable)),
                              "/opt/maas/llamacpp_server.py": ROOT / "agent" / "backends" / "llamacpp_server.py"}
    stdlib = base / "lib" / version
    for path in stdlib.rglob("*"):
        relative = path.relative_to(stdlib)
        if path.is_file() and not STDLIB_SKIP.intersection(relative.parts) and path.suffix != ".pyc" \
                and not any(part.startswith(STDLIB_SKIP_PREFIXES) for part in relative.parts):
            files[f"{PREFIX}/lib/{version}/{relative}"] = path
    package = Path(importlib.util.find_spec("xllamacpp").submodule_search_locations[0])
    for path in package.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            files[f"{PREFIX}/lib/{version}/site-packages/xllamacpp/{path.relative_to(package)}"] = path
    binaries = [str(files[f"{PREFIX}/bin/python3"])] + [str(p) for p in files.values() if p.suffix == ".so"]
    for library in _libraries(binaries):
        real = Path(os.path.realpath(library))
        inside = Path(library).is_relative_to(base)
        files[f"{PREFIX}/{Path(library).relative_to(base)}" if inside else library] = real
    return files


def write_rootfs(target: Path) -> int:
    """The image's root filesystem as a tar file; returns its size."""
    files = image_files()
    folders = {str(parent) for name in files for parent in Path(name).parents if str(parent) != "/"}
    with tarfile.open(target, "w") as tar:
        for folder in sorted(folders | {"/tmp", "/etc", "/root"}):
            info = tarfile.TarInfo(folder.lstrip("/"))
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if folder == "/tmp" else 0o755
            tar.addfile(info)
        for name, source in sorted(files.items()):
            info = tar.gettarinfo(str(source), name.lstrip("/"))
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            with open(source, "rb") as handle:
                tar.addfile(info, handle)
        for name, text in {"etc/passwd": "root:x:0:0:root:/root:/bin/sh\n", "etc/group": "root:x:0:\n"}.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return target.stat().st_size


def build_image(client, repository: str, tag: str, workdir: Path) -> str:
    """Build the llama.cpp image with `docker import` (no registry, no Dockerfile); returns `repository:tag`."""
    rootfs = workdir / "rootfs.tar"
    write_rootfs(rootfs)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    changes = [f"ENTRYPOINT {ENTRYPOINT!r}".replace("'", '"'), f"ENV LD_LIBRARY_PATH={PREFIX}/lib",
               f"ENV PATH={PREFIX}/bin:/usr/bin:/bin", f"ENV PYTHONHOME={PREFIX}",
               f"LABEL org.opencontainers.image.title=maas-test-llamacpp-{version}"]
    client.api.import_image_from_file(str(rootfs), repository=repository, tag=tag, changes=changes)
    rootfs.unlink()
    return f"{repository}:{tag}"


# --- the slow link: `python tests/docker_tier.py throttle LISTEN_PORT TARGET_PORT BYTES_PER_SECOND` ---------


async def _relay(listen: int, target: int, rate: int) -> None:
    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limited: bool) -> None:
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
                if limited:
                    await asyncio.sleep(len(chunk) / rate)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def serve(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(pump(client_reader, upstream_writer, False), pump(upstream_reader, client_writer, True))

    server = await asyncio.start_server(serve, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__" and sys.argv[1:2] == ["throttle"]:
    asyncio.run(_relay(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
