#!/usr/bin/env python3
"""A short check for a machine with NVIDIA GPUs: what the agent's NVML inventory reads, and whether a process
holding GPU memory shows up in it.

    python scripts/gpu-check.py [--gib 2] [--json OUT.json]

1. NVML detection through agent.devices.GPUInventory: name, UUID, memory, utilisation, temperature, power,
   MIG mode and processes per GPU.
2. A child process allocates --gib GiB on GPU 0 (with torch when installed, else straight through the CUDA
   driver, libcuda, which ships with the NVIDIA driver) and waits; the inventory is read again and must show
   GPU 0's used memory grown by about that much and a process holding it (NVML reports host PIDs, so in a
   container the PID may differ from the child's: the match is reported, not required).

Exit 0 when both hold; 1 with the reason otherwise. Prints a JSON summary (and writes it with --json).
"""

from __future__ import annotations

import argparse
import json
import select
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

GIB = 1024**3
CHILD_READY_SECONDS = 180

# The child: allocate, say so, hold until stdin closes.
CHILD = r"""
import sys
size = int(sys.argv[1])
try:
    import torch
    block = torch.empty(size, dtype=torch.uint8, device="cuda:0")
    block.fill_(1)
    torch.cuda.synchronize()
    how = f"torch {torch.__version__}"
except ImportError:
    import ctypes
    cuda = ctypes.CDLL("libcuda.so.1")
    def check(code, what):
        if code != 0:
            raise SystemExit(f"{what} failed with CUDA error {code}")
    device, context, pointer = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
    check(cuda.cuInit(0), "cuInit")
    check(cuda.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
    check(cuda.cuCtxCreate_v2(ctypes.byref(context), 0, device), "cuCtxCreate")
    check(cuda.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(size)), "cuMemAlloc")
    check(cuda.cuMemsetD8_v2(pointer, 1, ctypes.c_size_t(size)), "cuMemsetD8")
    how = "libcuda"
print(f"ready {how}", flush=True)
sys.stdin.read()
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0, help="GiB the child process allocates on GPU 0")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()
    summary: dict = {"ok": False}
    try:
        check(args.gib, summary)
    except Exception as exc:  # a failed check is the result: say why
        summary["error"] = f"{type(exc).__name__}: {exc}"
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if summary.get("ok") else 1


def check(gib: float, result: dict) -> None:
    """Fills `result` as it goes, so a failure still shows what was read."""
    import pynvml

    from agent.devices import GPUInventory

    started = time.monotonic()
    pynvml.nvmlInit()  # raises NVMLError_LibraryNotFound without the driver: that is the answer then
    driver = pynvml.nvmlSystemGetDriverVersion()
    inventory = GPUInventory()
    before = inventory.read()
    result.update({"driver": driver, "gpus": [g.model_dump(mode="json") for g in before],
                   "detect_seconds": round(time.monotonic() - started, 3)})
    if not before:
        raise RuntimeError("NVML loaded but the inventory has no GPU")
    missing = [g.index for g in before if not (g.name and g.uuid and g.memory_total > 0)]
    if missing:
        raise RuntimeError(f"GPUs {missing} lack a name, UUID or memory total")

    size = int(gib * GIB)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(size)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # CUDA initialisation can hang on a broken driver: bound the wait for the child's first line.
        if not select.select([child.stdout], [], [], CHILD_READY_SECONDS)[0]:
            raise RuntimeError(f"the allocating child said nothing in {CHILD_READY_SECONDS} s (CUDA init hung?)")
        line = child.stdout.readline().strip()
        if not line.startswith("ready"):
            raise RuntimeError(f"the allocating child failed: {line or child.stderr.read()[-2000:]}")
        result["allocated_with"] = line.removeprefix("ready ").strip()
        result["child_pid"] = child.pid
        grown, holder, after = 0, None, None
        deadline = time.monotonic() + 20  # NVML's process list can lag the allocation a little
        while time.monotonic() < deadline:
            after = inventory.read()[0]
            grown = after.memory_used - before[0].memory_used
            holder = next((p for p in after.processes if p.used_memory and p.used_memory >= size), None)
            if grown >= 0.9 * size and holder is not None:
                break
            time.sleep(0.5)
        result["gpu0_after"] = after.model_dump(mode="json") if after else None
        result["memory_used_grew_bytes"] = grown
        result["holder"] = holder.model_dump(mode="json") if holder else None
        result["holder_pid_matches_child"] = bool(holder and holder.pid == child.pid)
        if grown < 0.9 * size:
            raise RuntimeError(f"GPU 0 used memory grew by {grown} bytes, expected about {size}")
        if holder is None:
            raise RuntimeError(f"no process on GPU 0 holds {size} bytes: {after.processes}")
        result["ok"] = True
    finally:
        child.stdin.close()
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


if __name__ == "__main__":
    sys.exit(main())
