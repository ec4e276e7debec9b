"""The admin endpoint: a small HTTP listener, separate from the client listener (like
HAProxy's stats socket or nginx's stub_status on a private port), that `edge status` reads.

GET /status answers the edge's snapshot as JSON; GET /metrics the same facts, the request counts
and latency histograms in Prometheus' text format (addons/metrics.py). It binds only where
`admin:` says (loopback in the example) and is off unless configured. POST requests go to the
write side (`edge reload`), which asks for a token (addons/lifecycle).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from addons.config import EdgeConfig

logger = logging.getLogger("edge")
HEAD_TIMEOUT = 5.0
MAX_HEAD = 8192


class Admin:
    def __init__(self, snapshot: Callable[[], dict], metrics: Callable[[], str]) -> None:
        self.snapshot = snapshot
        self.metrics = metrics
        self.address: tuple[str, int] | None = None
        self.server: asyncio.Server | None = None
        self.bound: tuple[str, int] | None = None       # the real address (port 0 picks one)
        # the write side (addons/lifecycle): (path, request head) -> (status, JSON body, header fields)
        self.write: Callable[[str, bytes], tuple[str, dict, dict]] | None = None

    def apply(self, config: EdgeConfig) -> None:
        self.address = config.admin

    async def running(self) -> None:
        if self.address is None or self.server is not None:
            return
        from addons.workers import runtime     # here: `edge status` imports this module for its format only
        try:
            self.server = await asyncio.start_server(self._serve, *self.address, limit=MAX_HEAD,
                                                     reuse_port=runtime.shares_listeners())
        except OSError as e:
            logger.error("edge: admin endpoint cannot listen on %s:%s: %s", *self.address, e.strerror)
            return
        self.bound = self.server.sockets[0].getsockname()[:2]
        logger.info("edge: admin endpoint on http://%s:%s/status", *self.bound)

    def done(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            method, target, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ") + ["", ""]
            path, kind, extra = target.split("?", 1)[0], "application/json", {}
            if method == "POST" and self.write is not None and path not in ("/status", "/metrics"):
                status, body, extra = self.write(path, head)
            elif method not in ("GET", "HEAD"):
                status, body = "405 Method Not Allowed", {"error": "read-only: GET /status or /metrics"}
            elif path == "/status":
                status, body = "200 OK", self.snapshot()
            elif path == "/metrics":
                status, body, kind = "200 OK", self.metrics(), "text/plain; version=0.0.4"
            else:
                status, body = "404 Not Found", {"error": "GET /status or /metrics"}
            payload = body.encode() if isinstance(body, str) else json.dumps(body, indent=1).encode() + b"\n"
            fields = "".join(f"{k}: {v}\r\n" for k, v in extra.items())
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(payload)}\r\n{fields}"
                         f"Cache-Control: no-store\r\nConnection: close\r\n\r\n".encode()
                         + (payload if method != "HEAD" else b""))
            await writer.drain()
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except Exception:          # never take the proxy down
            logger.exception("edge: admin endpoint failed")
        finally:
            writer.close()


def format_status(snapshot: dict) -> str:
    """The text `edge status` and the `edge.status` command print."""
    lines = []
    for name, pool in snapshot["pools"].items():
        extra = f", fallback {pool['fallback']}" if pool["fallback"] else ""
        default = ", default" if name == snapshot["default_pool"] else ""
        lines.append(f"pool {name} ({pool['balance']}{extra}{default})")
        for o in pool["origins"]:
            role = " backup" if o["backup"] else ""
            lines.append(f"  {o['url']} weight {o['weight']}{role}, {o['in_flight']} in flight: {o['state']}")
    for name, site in snapshot.get("sites", {}).items():
        lines.append(f"site {name} ({', '.join(site['hosts'])}): {site['requests']} requests, routes "
                     + " ".join(site["routes"]))
    if snapshot.get("sites"):
        lines.append(f"misdirected (no site for the host): {snapshot['misdirected']}, "
                     f"refused by route rate limits: {snapshot['route_rate_refusals']}")
    if snapshot.get("cluster"):
        part = snapshot["cluster"]
        lines.append(f"cluster node {part['node']}: {len(part['members'])} live members"
                     + ("" if part["connected"] else ", redis unreachable") + " (edge status --cluster)")
    if snapshot.get("shield"):
        lines.append("shield refusals: " + ", ".join(f"{k} {v}" for k, v in sorted(snapshot["shield"].items())))
    for w in snapshot.get("workers", ()):            # the workers of one machine (addons/workers)
        role = ", runs the health checks" if w["health_checks"] else ""
        stale = f", no snapshot for {w['snapshot_age']:.0f}s" if w["stale"] else ""
        lines.append(f"worker {w['index']} (pid {w['pid']}): up {w['uptime']:.0f}s, {w['in_flight']} in flight, "
                     f"{w['connections']} connections{role}{stale}")
    return "\n".join(lines)

