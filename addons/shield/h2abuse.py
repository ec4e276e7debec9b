"""HTTP/2 connection abuse accounting: how many frames of each costly-but-useless kind one client
connection may send before it is closed with GOAWAY ENHANCE_YOUR_CALM. Pure.

The attacks are cheap for the client and not for us: HEADERS+RST_STREAM pairs (rapid reset,
CVE-2023-44487) start a request the client never waits for; SETTINGS and PING floods
(CVE-2019-9512/9515) make us answer each; PRIORITY, empty DATA and WINDOW_UPDATE floods
(CVE-2019-9513/9518) cost a parse and bookkeeping each. nginx, HAProxy and Envoy answered
them by counting per connection and closing the connection past a threshold; so does this:
a token bucket per kind (`burst` at once, refilled at `rate` per second), the same bucket as
the rate limits use.
"""

from __future__ import annotations

from addons.config import FrameBudget, Http2Limits
from addons.shield.limits import take

KINDS = ("resets", "settings", "pings", "priorities", "empty_frames", "window_updates")


class FrameBudgets:
    """One connection's buckets. `spend(kind, now)` is None while the client stays within its
    budget, else why the connection is to be closed (and it stays exhausted)."""

    def __init__(self, limits: Http2Limits, now: float) -> None:
        self.budgets: dict[str, FrameBudget] = {kind: getattr(limits, kind) for kind in KINDS}
        self.buckets: dict[str, tuple[float, float]] = {kind: (float(b.burst), now) for kind, b in self.budgets.items()}
        self.spent: dict[str, int] = dict.fromkeys(KINDS, 0)     # frames of each kind so far

    def spend(self, kind: str, now: float) -> str | None:
        budget = self.budgets[kind]
        tokens, stamp = self.buckets[kind]
        verdict, tokens = take(tokens, stamp, now, budget.rate, budget.burst)
        self.buckets[kind] = (tokens, now)
        self.spent[kind] += 1
        if verdict.allowed:
            return None
        return f"too many {kind.replace('_', ' ')} ({self.spent[kind]}; allowed {budget.burst}, then {budget.rate:g}/s)"
