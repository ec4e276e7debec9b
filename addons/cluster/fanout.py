"""Purge fan-out, pure: the removals this node still has to announce, the order of stream ids,
what a node does on reconnecting, and the one log line per Redis outage.

Every removal is appended to a capped Redis stream (its id orders it) and published on a
channel with that id, both by one script, so the channel's order is the stream's. A node
applies what the channel brings; after a disconnection it reads the stream from the last id it
applied. If that id is gone (trimmed away, or Redis restarted and lost the stream) what was
missed is unknown, and the node empties its memory tier instead."""

from __future__ import annotations

import logging
from collections import deque

logger = logging.getLogger("edge")
EVERYTHING = "*"
MAX_PENDING = 10_000        # removals kept while Redis is away; past it, one `*` stands for them


def stream_id(text: str | bytes) -> tuple[int, int]:
    """`MS-SEQ` as a comparable pair."""
    if isinstance(text, bytes):
        text = text.decode()
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class Outbox:
    """Removals made here, not yet in Redis: in order, bounded (past `limit` they collapse into
    one `*`: the other nodes then empty their memory, which is what they would have to do).
    Each has a number, so the one sent leaves only if it is still the first (not collapsed)."""

    def __init__(self, limit: int = MAX_PENDING) -> None:
        self.items: deque[tuple[int, str]] = deque()
        self.limit = limit
        self.count = 0

    def add(self, key: str) -> None:
        if self.items and self.items[-1][1] == key:
            return
        if key == EVERYTHING or len(self.items) >= self.limit:
            self.items.clear()
            key = EVERYTHING
        self.count += 1
        self.items.append((self.count, key))

    def first(self) -> tuple[int, str]:
        return self.items[0]

    def sent(self, number: int) -> None:
        if self.items and self.items[0][0] == number:
            self.items.popleft()

    def __len__(self) -> int:
        return len(self.items)


def resync_plan(last: str | None, still_there: bool, missed_since_start: bool) -> str:
    """On (re)connecting: `read` the stream after `last`; `empty` the memory tier (what was
    missed is unknown); `start` (first connection, nothing could be missed: read from now)."""
    if last is None:
        return "empty" if missed_since_start else "start"
    return "read" if still_there else "empty"


FLAP = 10.0                 # seconds: a failure this soon after a recovery is the same outage


class Link:
    """The state of this node's connection to Redis, shared by its background tasks: one
    warning when an outage starts (whichever task saw it first) and one when it ends. A
    failure right after a recovery (a connection left over from before a Redis restart) is
    not a new outage: it is retried silently."""

    def __init__(self, name: str) -> None:
        self.name = name                     # the Redis, as the log names it
        self.down_since: float | None = None  # monotonic
        self.last_error = ""
        self.ever_up = False
        self.recovered_at: float | None = None
        self.quiet = False                   # the current outage is a flap: not logged

    def failed(self, error: BaseException, now: float, what: str = "") -> bool:
        """Record a failure; True when it starts an outage (it was logged)."""
        self.last_error = f"{what}: {type(error).__name__}: {error}" if what else f"{type(error).__name__}: {error}"
        if self.down_since is not None:
            return False
        self.down_since = now
        if self.recovered_at is not None and now - self.recovered_at < FLAP:
            self.quiet = True
            return False
        logger.warning("edge: cluster: redis %s unreachable (%s): serving alone meanwhile (purges stay local and "
                       "are sent when it is back; members age out)", self.name, self.last_error)
        return True

    def up(self, now: float) -> bool:
        """Record a success; True when it ends an outage (it was logged)."""
        self.ever_up = True
        if self.down_since is None:
            return False
        quiet, self.quiet = self.quiet, False
        if not quiet:
            logger.warning("edge: cluster: redis %s answers again after %.1f s", self.name, now - self.down_since)
            self.recovered_at = now
        self.down_since = None
        return not quiet

    def down_for(self, now: float) -> float:
        return 0.0 if self.down_since is None else now - self.down_since
