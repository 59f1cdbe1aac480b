"""Runtimes start, stop and log workloads. Without a Docker engine the process runtime is used."""

from agent.runtimes.process import ProcessHandle, ProcessRuntime

__all__ = ["ProcessHandle", "ProcessRuntime"]
