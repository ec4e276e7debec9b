"""Is an origin available? Active checks with rise/fall thresholds (HAProxy) and passive
marks with a cool-down after a failed connection (nginx max_fails/fail_timeout). Pure."""

from __future__ import annotations

from dataclasses import dataclass

PASSIVE_COOLDOWN = 10.0     # seconds an origin that refused a connection is left alone
PASSIVE_5XX = 5             # consecutive 502/503/504 answers that do the same


@dataclass
class Health:
    rise: int = 2
    fall: int = 2
    up: bool = True             # optimistic at start, as nginx and HAProxy are
    successes: int = 0          # consecutive, while down
    failures: int = 0           # consecutive, while up
    down_until: float = 0.0     # passive mark
    last_error: str = ""
    last_ok: float = float("-inf")   # last time the origin answered anything
    server_errors: int = 0           # consecutive 502/503/504 answers
    back_at: float = float("-inf")   # when it became (or will become) available again

    def suspect(self, now: float, quiet: float) -> bool:
        """Not heard from for `quiet` seconds: worth a connect probe before a client relies on it."""
        return now - self.last_ok > quiet

    def available(self, now: float) -> bool:
        return self.up and now >= self.down_until

    def share(self, now: float, slow_start: float) -> float:
        """Slow start (nginx, HAProxy): the fraction of its weight an origin gets, growing from
        a tenth to all of it over `slow_start` seconds after it came back, so a cold origin
        (empty caches, JIT, pools) is not handed a full share at once."""
        if slow_start <= 0 or now - self.back_at >= slow_start:
            return 1.0
        return max(0.1, (now - self.back_at) / slow_start)

    def check_passed(self, now: float) -> bool:
        """An active check succeeded. True if the origin just came back."""
        self.failures = 0
        if self.down_until > now:           # a passive mark is lifted by a passing check
            self.back_at = now
        self.down_until = 0.0
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

    def request_failed(self, why: str, now: float, cooldown: float = PASSIVE_COOLDOWN) -> bool:
        """A client request could not reach the origin. True if it was available until now."""
        was = self.available(now)
        self.down_until = self.back_at = now + cooldown
        self.last_error = why
        return was

    def answered(self, status: int, now: float) -> bool:
        """The origin answered a client. True if this answer took it out: the origin says it
        is overloaded or broken (502/503/504) PASSIVE_5XX times in a row."""
        self.last_ok = now
        if status not in (502, 503, 504):
            self.server_errors = 0
            return False
        self.server_errors += 1
        if self.server_errors < PASSIVE_5XX:
            return False
        self.server_errors = 0
        return self.request_failed(f"{PASSIVE_5XX} answers of {status} in a row", now)

    def describe(self, now: float, slow_start: float = 0.0) -> str:
        if not self.up:
            return f"down ({self.last_error})"
        if now < self.down_until:
            return f"cooling down {self.down_until - now:.0f}s ({self.last_error})"
        share = self.share(now, slow_start)
        return f"up, slow start {share:.0%}" if share < 1 else "up"
