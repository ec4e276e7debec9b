"""Background work that must not die: a periodic job whose exception is logged (at most once a
period, with a count) before the next round runs, and the same throttle for any repeated
failure worth reporting (an access log on a full disk). A dead sweeper or checker fails
silently and for good: slow clients are never closed again, origins never come back."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

logger = logging.getLogger("edge")
REPORT_EVERY = 60.0         # seconds between two reports of the same failure


class Throttle:
    """Counts occurrences of one failure and says when to report them: the first at once,
    then at most once every `period` seconds with the number seen since. Pure: time is given."""

    def __init__(self, period: float = REPORT_EVERY) -> None:
        self.period = period
        self.unreported = 0
        self.last: float | None = None

    def occurred(self, now: float) -> int:
        """Count one; the number to report now (this one included), or 0 to stay quiet."""
        self.unreported += 1
        if self.last is not None and now - self.last < self.period:
            return 0
        count, self.unreported, self.last = self.unreported, 0, now
        return count


def report(throttle: Throttle, what: str, error: BaseException) -> None:
    """Log that `what` failed, throttled; the first time with the traceback."""
    first = throttle.last is None
    count = throttle.occurred(time.monotonic())
    if count == 0:
        return
    if first:
        logger.error("edge: %s failed: %s; going on", what, error, exc_info=error)
    else:
        logger.error("edge: %s failed %d time%s since the last report (last: %s); going on",
                     what, count, "" if count == 1 else "s", error)


async def every(interval: float, job: Callable[[], Awaitable[None] | None], what: str) -> None:
    """Run `job` every `interval` seconds until cancelled; an exception in one round is
    reported (throttled) and the next round runs."""
    throttle = Throttle()
    while True:
        await asyncio.sleep(interval)
        try:
            result = job()
            if result is not None:
                await result
        except asyncio.CancelledError:
            raise
        except Exception as e:
            report(throttle, what, e)
