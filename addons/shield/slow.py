"""Deadlines per client connection against slow clients (slowloris, slow POST, idle keep-alive).
Pure bookkeeping: the addon sweeps `expired()` and closes those connections.

mitmproxy's tcp_timeout is an idle timer that every received byte resets, so a client sending a
byte a second never hits it. These deadlines are absolute: a head must be complete within
`request_headers` of the connection (or of the previous response), a body within `request_body`
of its head, whatever trickles in meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Deadlines:
    request_headers: float
    request_body: float
    idle: float
    due: dict[str, tuple[float, str]] = field(default_factory=dict)    # connection id -> (when, why)

    def connected(self, conn: str, now: float) -> None:
        self.due[conn] = (now + self.request_headers, "request headers timeout")

    def head_received(self, conn: str, now: float, body_expected: bool) -> None:
        if body_expected:
            self.due[conn] = (now + self.request_body, "request body timeout")
        else:
            self.due.pop(conn, None)

    def body_received(self, conn: str) -> None:
        self.due.pop(conn, None)

    def answered(self, conn: str, now: float) -> None:
        """Keep-alive: the next request head must be complete within idle + request_headers."""
        self.due[conn] = (now + self.idle + self.request_headers, "idle timeout")

    def forget(self, conn: str) -> None:
        self.due.pop(conn, None)

    def expired(self, now: float) -> list[tuple[str, str]]:
        out = [(conn, why) for conn, (when, why) in self.due.items() if when <= now]
        for conn, _ in out:
            del self.due[conn]
        return out
