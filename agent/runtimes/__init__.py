"""Runtimes start, stop and log workloads: Docker containers (docker.py) or host processes (process.py)."""

from agent.runtimes.process import AdoptedHandle, ProcessHandle, ProcessRuntime

__all__ = ["AdoptedHandle", "ProcessHandle", "ProcessRuntime"]
