"""The decision trace: every addon writes what it decided into `flow.metadata["edge"]`; this
module reads that one record into the JSON access log and, under mitmweb, a flow comment."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from typing import IO

from mitmproxy import http

from addons.tasks import Throttle, report

logger = logging.getLogger("edge")


# Facts kept in the record for other addons that the log line already shows as its own fields.
FACTS = frozenset({"client", "public_base", "public_url"})
STREAMED = "edge.stream.sent"   # flow metadata: body bytes of a streamed response relayed (addons/stream)


def decisions(flow: http.HTTPFlow) -> dict:
    """The flow's decision record (JSON-safe values only), created on first use."""
    rec = flow.metadata.get("edge")
    if rec is None:
        rec = flow.metadata["edge"] = {}
    return rec


def access_record(flow: http.HTTPFlow) -> dict:
    """One access-log line's worth of facts about a finished (or failed) flow."""
    req, resp, rec = flow.request, flow.response, decisions(flow)
    if resp is not None:
        status = resp.status_code
        size = len(resp.raw_content) if resp.raw_content is not None else int(resp.headers.get("content-length", 0) or 0)
        size = flow.metadata.get(STREAMED, size)      # a streamed body: what was relayed
    else:
        status, size = None, 0
    out = {
        "time": datetime.fromtimestamp(req.timestamp_start, timezone.utc).isoformat(timespec="milliseconds"),
        "id": flow.id,                      # the request id on the edge's own answers
        "client": rec.get("client") or flow.client_conn.peername[0],
        "method": req.method,
        "url": rec.get("public_url") or req.pretty_url,
        "status": status,
        "bytes": size,
        "ms": round((time.time() - req.timestamp_start) * 1000, 2),
        "edge": {k: v for k, v in rec.items() if k not in FACTS},
    }
    if flow.error:
        out["error"] = flow.error.msg
    return out


def _short(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return "/".join(str(v) for v in value.values() if v is not None)
    return str(value)


def summary(rec: dict) -> str:
    """A short human line for mitmweb's comment column."""
    return " ".join(f"{k}={_short(v)}" for k, v in rec.items() if k not in FACTS and v not in (None, [], ""))


def cache_verdict(rec: dict) -> str:
    """`hit`, or what the cache forwarded for (`uri-miss`, `stale`, ...), or `none`."""
    status = rec.get("cache")
    if not status:
        return "none"
    first = status.split(";", 1)[0].strip()
    return first.removeprefix("fwd=") if first.startswith("fwd=") else first


class Trace:
    """Writes the access log, annotates flows for mitmweb, and counts what it writes (the
    metrics endpoint reads the counts). Runs last in the chain. A line that cannot be written
    (a full disk, an I/O error, a closed file) is counted and reported once a minute, never
    raised: the hook or background task that logs goes on."""

    def __init__(self) -> None:
        self.out: IO[str] | None = None
        self.annotate = False
        self.answered: Counter[tuple[str, str]] = Counter()     # (status class, cache verdict)
        self.served_by: Counter[tuple[str, str]] = Counter()    # (pool, origin) that answered
        self.failures = Throttle()
        self.lost = 0                   # lines not written since writes last worked

    def apply(self, access_log: str | None, annotate: bool = False) -> None:
        self.close()
        self.annotate = annotate
        if access_log == "-":
            self.out = sys.stdout
        elif access_log:
            self.out = open(access_log, "a", buffering=1, encoding="utf-8")

    def close(self) -> None:
        out, self.out = self.out, None
        if out is not None and out is not sys.stdout:
            try:
                out.close()             # flushes: may fail like any write
            except (OSError, ValueError) as e:
                report(self.failures, "access log", e)

    def done(self) -> None:
        self.close()

    def reopen(self) -> None:
        """The access log's path opened anew (SIGUSR1): after logrotate's `mv`, lines go to a
        new file at the path, not on into the renamed one (no copytruncate needed). If the
        path cannot be opened, the log goes on where it was."""
        old = self.out
        if old is None or old is sys.stdout:
            return
        try:
            self.out = open(old.name, "a", buffering=1, encoding="utf-8")
        except OSError as e:
            report(self.failures, "access log reopen", e)
            return
        try:
            old.close()
        except (OSError, ValueError) as e:
            report(self.failures, "access log", e)

    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        # else an addon answered for the origin: logged at `response`; a streamed response cut
        # short gets no `response`
        if flow.response is None or flow.response.stream:
            self._finish(flow)

    def write(self, record: dict) -> None:
        """An access-log line for an event without a flow (a connection the shield refused)."""
        if self.out is not None:
            self._emit({"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **record})

    def _emit(self, record: dict) -> None:
        try:
            self.out.write(json.dumps(record, separators=(",", ":")) + "\n")
        except (OSError, ValueError) as e:      # ValueError: the file was closed
            self.lost += 1
            report(self.failures, "access log", e)
            return
        if self.lost:
            logger.warning("edge: access log writes work again; %d line%s lost",
                           self.lost, "" if self.lost == 1 else "s")
            self.lost, self.failures = 0, Throttle()

    def _finish(self, flow: http.HTTPFlow) -> None:
        rec = decisions(flow)
        status = flow.response.status_code if flow.response is not None else None
        self.answered[(f"{status // 100}xx" if status else "error", cache_verdict(rec))] += 1
        shield = rec.get("shield", "")
        refused = bool(shield) and not shield.startswith(("detect", "allow"))   # the edge answered
        if "origin" in rec and not refused:
            self.served_by[(rec.get("pool", ""), rec["origin"])] += 1
        if self.out is None and not self.annotate:
            return
        try:
            if self.out is not None:
                self._emit(access_record(flow))
            if self.annotate:
                rec = decisions(flow)
                flow.comment = summary(rec)
                if rec.get("failed") or flow.error:
                    flow.marked = ":warning:"
        except Exception as e:      # logging must never take the proxy down
            report(self.failures, f"access log (flow {flow.id})", e)
