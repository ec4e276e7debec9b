"""Is an origin available? Pure rules, no mitmproxy.

Two kinds of evidence, kept apart so that no client can take a site down:
- hard: active checks (rise/fall, HAProxy) and connect probes (a TCP connect the edge makes on
  its own). They say the origin cannot be reached, whatever any request asked for.
- soft: failures of client requests. Only failures that are the origin's count (a refused or
  timed-out connect, a connection closed before any response byte), never a client's cancel or
  a broken answer to one URL, and only `failures` of them in a row eject it (Envoy's outlier
  detection, nginx max_fails): any answer from the origin resets the count. At most
  `max_ejected` of a pool is ejected (Envoy max_ejection_percent; one origin alone never is,
  nginx's single-server rule), and when nothing of a pool chain is available but some origins
  are only ejected, requests still go to those (panic mode).
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

# The edge's own failure messages (mitmproxy reports the rest in its own words; see classify)
CONNECT_TIMEOUT = "connect timeout"      # route's timer cancelled a pending connect
READ_TIMEOUT = "read timeout"            # internals: the origin stopped sending for read_timeout

# mitmproxy 12.3's words when a pending upstream connect is cancelled from our side: the client
# went away ("client disconnected", proxy/server.py handle_client), a layer closed the stream's
# connection ("closed by command"), a cancel without a message ("connection cancelled"), or a
# server_connect hook refused it ("Connection killed: ...")
_CANCELLED = ("client disconnected", "closed by command", "connection cancelled")
# errno values that say the edge itself is out of something (descriptors, ports, memory)
_LOCAL_ERRNOS = frozenset({12, 23, 24, 99, 105})   # ENOMEM ENFILE EMFILE EADDRNOTAVAIL ENOBUFS
_ERRNO = re.compile(r"\[Errno (-?\d+)\]")


class Failure(enum.Enum):
    """Whose fault a failed upstream exchange was, and so what it may do to the origin."""
    CONNECT = "connect"      # refused, unreachable, timed out, TLS failed: the origin's
    CLOSED = "closed"        # closed or reset before any response byte: the origin's
    RESPONSE = "response"    # a malformed or cut answer: this request's 502, nothing more
    TIMEOUT = "timeout"      # read timeout: this request's 504 (one slow URL is no outage)
    CLIENT = "client"        # the client cancelled or went away: nothing to count, nobody to answer
    LOCAL = "local"          # the edge ran out of descriptors or ports: not the origin's

    @property
    def counts(self) -> bool:
        """Counts toward ejecting the origin, and is worth trying the next origin for."""
        return self in (Failure.CONNECT, Failure.CLOSED)


def classify(message: str, connecting: bool, client_gone: bool) -> Failure:
    """What a failure message from mitmproxy 12.3 (or the edge's own timers) means.
    `connecting`: the connection to the origin was never opened; `client_gone`: the client's
    connection has ended. Unknown answer-phase messages count for nothing: only failures known
    to be the origin's may take it out."""
    if client_gone or message in _CANCELLED or message == "Client disconnected.":
        return Failure.CLIENT
    if message.startswith("Connection killed"):
        return Failure.LOCAL
    if connecting:
        errnos = {int(n) for n in _ERRNO.findall(message)}
        if errnos and errnos <= _LOCAL_ERRNOS:
            return Failure.LOCAL
        return Failure.CONNECT       # OSError text, CONNECT_TIMEOUT, DNS, TLS handshake failures
    if message == READ_TIMEOUT:
        return Failure.TIMEOUT
    if message in ("server closed connection", "peer closed connection") \
            or message.startswith("HTTP/2 connection closed"):
        return Failure.CLOSED        # HTTP/1 (also a reset: mitmproxy reads both as EOF), HTTP/2
    return Failure.RESPONSE          # Cannot parse HTTP response, unexpected server response, ...


def ejection_allowed(ejected: int, size: int, max_ejected: float) -> bool:
    """May one more of a pool's `size` origins be ejected while `ejected` already are?"""
    return ejected + 1 <= math.floor(size * max_ejected + 1e-9)


@dataclass
class Health:
    rise: int = 2
    fall: int = 2
    up: bool = True             # active checks; optimistic at start, as nginx and HAProxy are
    successes: int = 0          # consecutive, while down
    failures: int = 0           # consecutive, while up
    unreachable_until: float = 0.0   # hard: a connect probe failed
    ejected_until: float = 0.0       # soft: client requests failed `failures` times in a row
    strikes: int = 0                 # consecutive origin failures of client requests
    server_errors: int = 0           # consecutive 502/503/504 answers (opt-in rule)
    doubt: bool = False              # its last request failed: probe it before the next one
    last_error: str = ""
    last_ok: float = float("-inf")   # last time the origin answered anything
    back_at: float = float("-inf")   # when it became (or will become) available again

    def suspect(self, now: float, quiet: float) -> bool:
        """Worth a connect probe before a client relies on it: not heard from for `quiet`
        seconds, or its last request failed."""
        return self.doubt or now - self.last_ok > quiet

    def reachable(self, now: float) -> bool:
        """Not shown unreachable by a check or a probe (it may still be ejected)."""
        return self.up and now >= self.unreachable_until

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def available(self, now: float) -> bool:
        return self.reachable(now) and not self.ejected(now)

    def share(self, now: float, slow_start: float) -> float:
        """Slow start (nginx, HAProxy): the fraction of its weight an origin gets, growing from
        a tenth to all of it over `slow_start` seconds after it came back, so a cold origin
        (empty caches, JIT, pools) is not handed a full share at once."""
        if slow_start <= 0 or now - self.back_at >= slow_start:
            return 1.0
        return max(0.1, (now - self.back_at) / slow_start)

    # -- hard evidence ------------------------------------------------------------------------------

    def check_passed(self, now: float) -> bool:
        """An active check succeeded. True if the origin just came back."""
        self.failures = 0
        if not self.available(now) and self.up:   # a mark is lifted by a passing check
            self.back_at = now
        self.unreachable_until = self.ejected_until = 0.0
        self.doubt = False
        if self.up:
            return False
        self.successes += 1
        if self.successes >= self.rise:
            self.up, self.successes, self.back_at = True, 0, now
            return True
        return False

    def check_failed(self, why: str) -> bool:
        """An active check failed. True if the origin just went down."""
        self.successes = 0
        self.last_error = why
        if not self.up:
            return False
        self.failures += 1
        if self.failures >= self.fall:
            self.up, self.failures = False, 0
            return True
        return False

    def adopt(self, up: bool, passed: bool, why: str, now: float) -> bool:
        """The verdict of the machine's health checker, another worker (addons/workers/checks.py):
        `up` after its rise/fall counting, `passed` its last check. The marks a check here would
        leave: a passing check lifts this worker's probe marks and ejections. True if the
        origin's state changed."""
        was = self.up
        if passed:
            self.check_passed(now)
            self.last_ok = now
        else:
            self.last_error = why
        self.successes = self.failures = 0
        self.up = up
        if up and not was:
            self.back_at = now
        return up != was

    def probe_failed(self, why: str, now: float, cooldown: float) -> bool:
        """A connect probe failed: unreachable for `cooldown`. True if it was available."""
        was = self.available(now)
        self.unreachable_until = now + cooldown
        self.back_at = max(self.back_at, self.unreachable_until)
        self.last_error = why
        return was

    def probe_passed(self, now: float) -> None:
        """A connect probe succeeded: reachable (an ejection stands: connecting is not answering)."""
        self.unreachable_until = 0.0
        self.doubt = False
        self.last_ok = now

    # -- client requests ----------------------------------------------------------------------------

    def origin_failed(self, why: str, now: float, failures: int, cooldown: float, may_eject: bool) -> bool:
        """A client request failed by the origin's fault (Failure.counts). True if this
        ejected it: the `failures`-th in a row, when `may_eject` (max_ejected has room)."""
        self.strikes = min(self.strikes + 1, failures)
        self.doubt = True
        self.last_error = why
        if self.strikes < failures or not may_eject:
            return False
        return self._eject(now, cooldown)

    def answered(self, status: int, now: float, consecutive_5xx: int = 0, cooldown: float = 0.0,
                 may_eject: bool = False) -> bool:
        """The origin answered a client: it is reachable, the failure count starts again and
        an ejection is lifted. With `consecutive_5xx` (opt-in), that many 502/503/504 answers
        in a row eject it; True if this answer did."""
        self.last_ok = now
        self.strikes = 0
        self.doubt = False
        if status not in (502, 503, 504) or not consecutive_5xx:
            self.server_errors = 0
            if self.ejected(now):
                self.ejected_until, self.back_at = 0.0, now
            return False
        self.server_errors = min(self.server_errors + 1, consecutive_5xx)
        if self.server_errors < consecutive_5xx or not may_eject:
            return False
        self.last_error = f"{consecutive_5xx} answers of {status} in a row"
        return self._eject(now, cooldown)

    def _eject(self, now: float, cooldown: float) -> bool:
        was = self.available(now)
        self.ejected_until = self.back_at = now + cooldown
        self.strikes = self.server_errors = 0
        return was

    def describe(self, now: float, slow_start: float = 0.0) -> str:
        if not self.up:
            return f"down ({self.last_error})"
        if now < self.unreachable_until:
            return f"unreachable {self.unreachable_until - now:.0f}s ({self.last_error})"
        if self.ejected(now):
            return f"ejected {self.ejected_until - now:.0f}s ({self.last_error})"
        share = self.share(now, slow_start)
        state = f"up, slow start {share:.0%}" if share < 1 else "up"
        if self.strikes:
            state += f", {self.strikes} failed in a row ({self.last_error})"
        return state
