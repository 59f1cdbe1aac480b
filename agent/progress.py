"""A blocking transfer (a hub download, an image pull) followed from the event loop, with progress reports."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Awaitable, Callable, TypeVar

T = TypeVar("T")
ProgressCallback = Callable[[float], Awaitable[None]]


async def run_with_progress(work: Callable[[], T], fraction: Callable[[], float | None],
                            on_progress: ProgressCallback | None, every: float, name: str,
                            check: Callable[[], None] | None = None) -> T:
    """Run `work` in a daemon thread of its own and return its result (or raise what it raised).

    Every `every` seconds: `check()` (which raises to give up, e.g. on a stall), then `on_progress(fraction())`
    when the fraction is known and has moved by a whole percent since the last report; 1.0 once at the end.
    A daemon thread, not the default executor: work abandoned (given up, or the caller cancelled) finishes or
    times out on its own and never holds the executor or the interpreter's exit.
    """
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[T] = loop.create_future()

    def settle(setter: Callable[[Any], None], value: Any) -> None:
        if not outcome.done():
            setter(value)

    def run() -> None:
        try:
            result: tuple[Callable[[Any], None], Any] = (outcome.set_result, work())
        except BaseException as exc:  # handed to the event loop, which explains it
            result = (outcome.set_exception, exc)
        try:
            loop.call_soon_threadsafe(settle, *result)
        except RuntimeError:  # the loop is gone (the agent stopped): nobody waits for this work
            pass

    threading.Thread(target=run, name=name, daemon=True).start()
    reported: float | None = None
    # asyncio.wait, not a timeout around the future: a TimeoutError the work itself raised must end the wait
    # (as the error it is), not read as "not done yet".
    while not (await asyncio.wait({outcome}, timeout=every))[0]:
        if check is not None:
            check()
        moved = fraction()
        if on_progress is not None and moved is not None and (reported is None or moved - reported >= 0.01):
            reported = moved
            await on_progress(moved)
    value = outcome.result()
    if on_progress is not None and reported != 1.0:
        await on_progress(1.0)
    return value
