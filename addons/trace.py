"""The decision trace: every addon writes what it decided into `flow.metadata["edge"]`; this
module reads that one record into the JSON access log and, under mitmweb, a flow comment."""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import datetime, timezone
from typing import IO

from mitmproxy import http

logger = logging.getLogger("edge")


# Facts kept in the record for other addons that the log line already shows as its own fields.
FACTS = frozenset({"client", "public_base", "public_url"})


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
    else:
        status, size = None, 0
    out = {
        "time": datetime.fromtimestamp(req.timestamp_start, timezone.utc).isoformat(timespec="milliseconds"),
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


class Trace:
    """Writes the access log and annotates flows for mitmweb. Runs last in the chain."""

    def __init__(self) -> None:
        self.out: IO[str] | None = None
        self.annotate = False

    def apply(self, access_log: str | None, annotate: bool = False) -> None:
        self.close()
        self.annotate = annotate
        if access_log == "-":
            self.out = sys.stdout
        elif access_log:
            self.out = open(access_log, "a", buffering=1, encoding="utf-8")

    def close(self) -> None:
        if self.out is not None and self.out is not sys.stdout:
            self.out.close()
        self.out = None

    def done(self) -> None:
        self.close()

    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:     # else an addon answered for the origin: logged at `response`
            self._finish(flow)

    def write(self, record: dict) -> None:
        """An access-log line for an event without a flow (a connection the shield refused)."""
        if self.out is not None:
            record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **record}
            self.out.write(json.dumps(record, separators=(",", ":")) + "\n")

    def _finish(self, flow: http.HTTPFlow) -> None:
        if self.out is None and not self.annotate:
            return
        try:
            if self.out is not None:
                self.out.write(json.dumps(access_record(flow), separators=(",", ":")) + "\n")
            if self.annotate:
                rec = decisions(flow)
                flow.comment = summary(rec)
                if rec.get("failed") or flow.error:
                    flow.marked = ":warning:"
        except Exception:       # logging must never take the proxy down
            logger.exception("access log failed for flow %s", flow.id)
