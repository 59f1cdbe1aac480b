"""How long an agent waits before calling the server again: the server's Retry-After when it gave
one (429/503 under load), else exponential; always with jitter, so a thousand agents refused at
once do not come back at once. Shared by the agent and `maas simulate`."""

from __future__ import annotations

import random
from typing import Mapping

BUSY = (429, 503)


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from a Retry-After header (the delta-seconds form), or None."""
    value = (headers or {}).get("Retry-After", "")
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds <= 3600 else None


def delay(attempt: int, headers: Mapping[str, str] | None = None, base: float = 0.5, cap: float = 10.0) -> float:
    """Wait before try `attempt + 1` (attempt counts from 0): Retry-After or base * 2**attempt
    (capped), stretched by a random 0-50 %."""
    wait = retry_after(headers)
    if wait is None:
        wait = min(cap, base * 2 ** min(attempt, 16))
    return wait * (1 + random.random() * 0.5)
