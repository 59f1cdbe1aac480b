"""agent/doctor.py's judges (pure: findings in, a status and a one-line fix out) and the parts that
read this host. The whole path (server -> agent -> CLI, the bundle) runs in tests/test_memory_drift.py."""

from __future__ import annotations

import sys
from pathlib import Path

from agent import doctor
from maas_tui.cli.top_cmds import redact

GIB = 1 << 30
PROC_NET_TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:4E21 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:4E22 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1
   2: 00000000:7531 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
"""


def test_listening_ports_reads_only_listeners():
    assert doctor.listening_ports(PROC_NET_TCP) == {0x4E21, 0x7531}  # 20001 and 30001; the connection is not


def test_ports_overlapping_the_ephemeral_range_fail_with_a_fix():
    clash = doctor.judge_ports("service ports", "port range", (30000, 40000), (32768, 60999), set())
    assert clash.status == "fail" and "32768-40000" in clash.detail and "ip_local_port_range" in clash.fix
    fine = doctor.judge_ports("service ports", "port range", (20000, 29999), (32768, 60999), {20001, 30001})
    assert fine.status == "ok" and "9999 of 10000 free" in fine.detail and fine.fix == ""
    busy = doctor.judge_ports("ray ports", "Ray port range", (30000, 30009), None, set(range(30000, 30005)))
    assert busy.status == "warn" and "5 of 10 free" in busy.detail


def test_nvml_docker_disk_clock_python_and_peers():
    assert doctor.judge_nvml(None, 0, "NVMLError_LibraryNotFound", False).status == "warn"
    assert doctor.judge_nvml("550.54", 8, None, False).detail == "driver 550.54, 8 GPU(s)"
    assert doctor.judge_nvml(None, 4, None, True).status == "ok"
    assert doctor.judge_docker("docker", None, "no socket", [], 0)[0].status == "fail"
    assert doctor.judge_docker("process", None, "no socket", [], 0)[0].status == "ok"
    with_gpus = doctor.judge_docker("docker", "24.0", None, ["runc"], 8)
    assert [c.status for c in with_gpus] == ["ok", "fail"] and "nvidia-ctk" in with_gpus[1].fix
    assert [c.status for c in doctor.judge_docker("docker", "24.0", None, ["runc", "nvidia"], 8)] == ["ok", "ok"]
    assert doctor.judge_disk(Path("/m"), 1 * GIB, 100 * GIB).status == "fail"
    assert doctor.judge_disk(Path("/m"), 10 * GIB, 100 * GIB).status == "warn"
    assert doctor.judge_disk(Path("/m"), 50 * GIB, 100 * GIB).status == "ok"
    assert doctor.judge_disk(Path("/m"), None, None).status == "warn"
    assert [doctor.judge_clock(s).status for s in (0.1, -3.0, 45.0, None)] == ["ok", "warn", "fail", "warn"]
    checks = doctor.judge_python((3, 10, 2), {"vllm": None, "llama.cpp": "xllamacpp 1.0"})
    assert [(c.name, c.status) for c in checks] == [("python", "fail"), ("backend llama.cpp", "ok"),
                                                    ("backend vllm", "skip")]
    assert doctor.judge_peers({}).status == "ok"
    failed = doctor.judge_peers({"10.0.0.2:7000": None, "10.0.0.3:7000": "Connection refused"})
    assert failed.status == "fail" and "10.0.0.3:7000 (Connection refused)" in failed.detail


async def test_this_host_findings():
    """Real readings: this interpreter's packages, a closed port, NVML as it is here."""
    assert doctor.package_version(None, "pydantic").startswith("pydantic ")
    assert doctor.package_version(sys.executable, "no-such-package-x") is None
    assert doctor.package_version("/nonexistent/python", "pydantic") is None
    assert await doctor.connect("127.0.0.1:1") is not None  # nothing listens on port 1
    driver, count, error = doctor.nvml_status()
    assert (driver is None) == (error is not None)


def test_bundle_redacts_credentials():
    assert redact({"server": "http://s", "token": "abc", "nested": [{"api_key": "k", "name": "n"}],
                   "password": ""}) == {"server": "http://s", "token": "<redacted>",
                                        "nested": [{"api_key": "<redacted>", "name": "n"}], "password": ""}
