"""Active health checks once per machine, not once per worker.

One worker leads: the one holding a non-blocking flock(2) on EDGE_RUNTIME_DIR/health.lock. It
runs the checks (addons/route) and after each round writes every origin's verdict to
health.json (atomically: a temporary file renamed into place). The others try the lock once a
round and otherwise read the verdicts, at most once a round, adopting each new one
(Health.adopt). The kernel releases the lock when its holder dies, however it dies, so another
worker leads from its next round on. A leader that is alive but stuck (its verdicts older than
stale_after) holds the lock and says nothing: the others then check for themselves until it
writes again; so do they for an origin the verdicts do not name (a rolling reload added it).
Passive health (what requests see) stays each worker's own."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os

from addons.workers.runtime import Runtime
from addons.workers.snapshots import write_atomically

LOCK, VERDICTS = "health.lock", "health.json"


def stale_after(interval: float, timeout: float) -> float:
    """Verdicts older than this come from a stuck leader: three rounds, at least five seconds."""
    return max(5.0, 3 * (interval + timeout))


def checks_here(leads: bool, verdicts: dict | None, now: float, stale: float) -> bool:
    """Does this worker run the checks this round? The leader does; another only while the
    leader's verdicts are missing or stale."""
    return leads or verdicts is None or now - verdicts["at"] > stale


def to_adopt(verdicts: dict | None, adopted: tuple | None) -> bool:
    """A round of verdicts this worker has not adopted yet (rounds are named by leader and number)."""
    return verdicts is not None and (verdicts["pid"], verdicts["round"]) != adopted


def origin_key(host: str, port: int) -> str:
    return f"{host}:{port}"


def parse_verdicts(data: bytes) -> dict | None:
    """health.json, or None for anything that is not one (a worker never trusts a half file)."""
    try:
        value = json.loads(data)
        if not isinstance(value["pid"], int) or not isinstance(value["round"], int):
            return None
        value["at"] = float(value["at"])
        origins = value["origins"]
        if not isinstance(origins, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("up"), bool) and isinstance(v.get("passed"), bool)
                and isinstance(v.get("why"), str) for v in origins.values()):
            return None
        return value
    except (ValueError, KeyError, TypeError):
        return None


class SharedChecks:
    """The leader's lock and the verdicts file of one worker."""

    def __init__(self, runtime: Runtime) -> None:
        self.lock_path, self.path = runtime.path(LOCK), runtime.path(VERDICTS)
        self.fd: int | None = None
        self.leads = False
        self.round = 0
        self.adopted: tuple | None = None   # (leader pid, round) last adopted

    def lead(self) -> bool:
        """Take the lead if nobody holds it; once taken it is kept until close() or death."""
        if self.leads:
            return True
        try:
            if self.fd is None:
                self.fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.leads = True
        return True

    def read(self) -> dict | None:
        try:
            with open(self.path, "rb") as f:
                return parse_verdicts(f.read())
        except OSError:
            return None

    def publish(self, origins: dict[str, dict], now: float) -> None:
        """The leader's round: origin key -> {"up", "passed", "why"}."""
        self.round += 1
        write_atomically(self.path, json.dumps({"pid": os.getpid(), "round": self.round, "at": now,
                                                "origins": origins}).encode())

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)           # the lock goes with it
            self.fd, self.leads = None, False
