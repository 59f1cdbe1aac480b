"""Runtimes start, stop and log workloads: Docker containers (docker.py) or host processes (process.py),
both implementing the Runtime protocol of base.py; choice.py picks one per instance."""

from agent.runtimes.base import Runtime, StartRequest
from agent.runtimes.process import AdoptedHandle, ProcessHandle, ProcessRuntime

__all__ = ["AdoptedHandle", "ProcessHandle", "ProcessRuntime", "Runtime", "StartRequest"]
