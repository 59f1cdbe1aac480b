"""Per-instance keys: what the gateway presents to a backend that takes one (llama.cpp, vLLM), so a
backend reached on its worker's address without the gateway answers nobody (no bypass of API keys,
team rules or metering).

A key is derived, never stored per instance: HMAC-SHA256 of one cluster secret (a settings row, so
every server derives the same keys) over the instance id. So the instance row and its wire form
(REST, `maas instance get`, the watch, events) never carry it; the gateway computes it per target;
the agent asks for the key of an instance placed on it (GET /v2/agent/instances/{id}/backend-key).
One key per instance, not per run: a backend adopted by a restarted agent keeps serving with it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from server.db import tables

SECRET_SETTING = "backend-key-secret"
# Backends that take a key (LLAMA_API_KEY / VLLM_API_KEY, set by the agent; agent/backends).
KEYED_BACKENDS = frozenset({"llama.cpp", "vllm"})


async def load_secret(session) -> str:
    """The cluster's secret, made on the first start (in the caller's transaction)."""
    row = await session.get(tables.Setting, SECRET_SETTING)
    if row is None:
        row = tables.Setting(key=SECRET_SETTING, value=secrets.token_hex(32))
        session.add(row)
    return row.value


class BackendKeys:
    def __init__(self, secret: str):
        self._secret = secret.encode()
        self._headers: dict[int, bytes] = {}

    def key(self, instance_id: int) -> str:
        digest = hmac.new(self._secret, f"instance/{instance_id}".encode(), hashlib.sha256).hexdigest()
        return f"maasb_{digest[:48]}"

    def header(self, instance_id: int) -> bytes:
        """The request header line the gateway sends to the instance's backend."""
        line = self._headers.get(instance_id)
        if line is None:
            if len(self._headers) > 100_000:
                self._headers.clear()
            line = self._headers[instance_id] = b"Authorization: Bearer %s\r\n" % self.key(instance_id).encode()
        return line
