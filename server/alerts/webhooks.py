"""Sending alerts to webhooks: one JSON body per alert change (schemas.alerts.AlertNotification), signed,
retried with exponential backoff (bounded), one task per webhook so a slow receiver delays no other.

Headers: `X-MaaS-Timestamp` (Unix seconds), `X-MaaS-Delivery` (the same on every retry of one delivery: a
receiver drops duplicates by it) and, when the webhook has a secret, `X-MaaS-Signature:
sha256=<hex>`, HMAC-SHA256 with the secret over `<timestamp>.<raw body>`. A receiver recomputes it and refuses
a timestamp older than a few minutes, so a captured request cannot be replayed later.

Retried: connection errors, timeouts, 429 and 5xx answers. Any other 4xx is final (the receiver refuses
the body; sending it again will not help).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import aiohttp

from server.db import tables
from server.db.errors import first_line
from server.services.alerts import secret_box

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-MaaS-Signature"
TIMESTAMP_HEADER = "X-MaaS-Timestamp"
DELIVERY_HEADER = "X-MaaS-Delivery"


def signature(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify(secret: str, headers: Any, body: bytes, now: float | None = None, tolerance: float = 300.0) -> bool:
    """What a receiver does (tests use it too): the signature matches and the timestamp is recent."""
    timestamp = headers.get(TIMESTAMP_HEADER, "")
    if not timestamp.isdigit() or abs((now or time.time()) - int(timestamp)) > tolerance:
        return False
    return hmac.compare_digest(signature(secret, timestamp, body), headers.get(SIGNATURE_HEADER, ""))


def _retryable(status: int) -> bool:
    return status == 429 or status >= 500


class WebhookSender:
    def __init__(self, server: Any, settings: Any):
        self.server = server
        self.settings = settings
        self._tasks: set[asyncio.Task[None]] = set()
        self._http: aiohttp.ClientSession | None = None

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    async def send(self, notification: dict[str, Any]) -> None:
        """Queue `notification` (an AlertNotification dict) for every webhook."""
        async with self.server.db.session() as s:
            hooks = (await s.execute(tables.AlertWebhook.__table__.select())).all()
            box = await secret_box(self.server, s) if any(h.secret_ciphertext for h in hooks) else None
        body = json.dumps(notification, separators=(",", ":")).encode()
        for hook in hooks:
            try:
                secret = box.unseal(hook.secret_ciphertext) if hook.secret_ciphertext else None
            except Exception as exc:  # SecretsUnavailable: say so on the webhook, send nothing unsigned
                await self._note(hook.id, f"not sent: {first_line(exc)}"[:300])
                continue
            task = asyncio.create_task(self._deliver(hook.id, hook.url, secret, body), name=f"webhook-{hook.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, hook_id: int, url: str, secret: str | None, body: bytes) -> None:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.settings.webhook_timeout))
        delivery = uuid.uuid4().hex
        delay = self.settings.webhook_backoff
        outcome = ""
        for attempt in range(1, self.settings.webhook_attempts + 1):
            timestamp = str(int(time.time()))
            headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: timestamp, DELIVERY_HEADER: delivery,
                       "User-Agent": "maas-alerts"}
            if secret:
                headers[SIGNATURE_HEADER] = signature(secret, timestamp, body)
            try:
                async with self._http.post(url, data=body, headers=headers, allow_redirects=False) as response:
                    status = response.status
                outcome = f"HTTP {status} (attempt {attempt})"
                if status < 300 or not _retryable(status):
                    break
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                outcome = f"{type(exc).__name__}: {first_line(exc)} (attempt {attempt})"
            if attempt < self.settings.webhook_attempts:
                await asyncio.sleep(delay)
                delay = min(self.settings.webhook_backoff_max, delay * 2)
        if not outcome.startswith("HTTP 2"):
            log.warning("alert webhook %s: %s", url, outcome)
        await self._note(hook_id, outcome[:300])

    async def _note(self, hook_id: int, outcome: str) -> None:
        try:
            async with self.server.db.session() as s:
                hook = await s.get(tables.AlertWebhook, hook_id)
                if hook is not None:
                    hook.last_status, hook.last_delivered_at = outcome, datetime.now(UTC)
                    await s.commit()
        except Exception as exc:  # the database may be down; the delivery itself is done
            log.warning("could not record the outcome of webhook %s: %s", hook_id, first_line(exc))
