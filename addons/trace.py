"""The decision trace: every addon writes what it decided into `flow.metadata["edge"]`; this
module reads that one record into the access log (JSON lines, or the combined format log
analysers read) and the metrics' observations (under mitmweb, addons/console shows it on the
flow). The exchange with the origin (when the request left, the origin's status and time to its
head) and the request head as it arrived are noted on the flow by the hooks here and by Arrival."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from collections.abc import Callable
from typing import IO
from urllib.parse import urlsplit

from mitmproxy import http
from mitmproxy.connection import Client

from addons.tasks import Throttle, report
from addons.workers import runtime

logger = logging.getLogger("edge")


# Facts kept in the record for other addons that the log line already shows as its own fields.
FACTS = frozenset({"client", "public_base", "public_url"})
STREAMED = "edge.stream.sent"   # flow metadata: body bytes of a streamed response relayed (addons/stream)
STREAMED_IN = "edge.stream.received"    # flow metadata: body bytes of a streamed request so far (internals)
ARRIVED = "edge.arrived"        # flow metadata: the request head's size as received (Arrival)
SENT = "edge.upstream.sent"     # flow metadata: when the request was handed over for an origin
UPSTREAM = "edge.upstream"      # flow metadata: (origin's status, seconds to its response head)
FORWARDED_ID = "edge.request_id"    # flow metadata: a trusted proxy's X-Request-Id the origin got


def _worker() -> int | None:
    """The worker that answers (`workers:` above 1, edgecli/supervisor.py); None: a single edge
    (or an environment the chain refuses at start with its reason)."""
    try:
        rt = runtime.current()
    except runtime.RuntimeEnvError:
        return None
    return rt.index if rt is not None else None


WORKER = _worker()


def decisions(flow: http.HTTPFlow) -> dict:
    """The flow's decision record (JSON-safe values only), created on first use."""
    rec = flow.metadata.get("edge")
    if rec is None:
        rec = flow.metadata["edge"] = {}
    return rec


def body_size(flow: http.HTTPFlow) -> int:
    """Response body bytes sent: a streamed body's relayed bytes, else the body's length."""
    resp = flow.response
    if resp is None:
        return 0
    size = len(resp.raw_content) if resp.raw_content is not None else int(resp.headers.get("content-length", 0) or 0)
    return flow.metadata.get(STREAMED, size)      # a streamed body: what was relayed


def access_record(flow: http.HTTPFlow) -> dict:
    """One access-log line's worth of facts about a finished (or failed) flow."""
    req, resp, rec = flow.request, flow.response, decisions(flow)
    status, size = (resp.status_code if resp is not None else None), body_size(flow)
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
    out.update(observed(flow, size))
    if WORKER is not None:
        out["worker"] = WORKER
    if flow.error:
        out["error"] = flow.error.msg
    return out


def head_size(start_line: bytes, fields) -> int:
    """A head's length as HTTP/1 text: the start line, each `name: value`, CRLFs. HTTP/2 heads
    are counted as their HTTP/1 form (their HPACK bytes depend on the connection's history)."""
    return len(start_line) + 2 + sum(len(k) + len(v) + 4 for k, v in fields) + 2


def request_head_size(req: http.Request) -> int:
    data = req.data
    return head_size(b"%s %s %s" % (data.method, data.path, data.http_version), data.headers.fields)


def response_head_size(resp: http.Response) -> int:
    data = resp.data
    return head_size(b"%s %d %s" % (data.http_version, data.status_code, data.reason), data.headers.fields)


def request_body_size(flow: http.HTTPFlow) -> int:
    """Body bytes received: those held, or those a streamed body passed (internals counts them)."""
    req = flow.request
    if req.stream:
        return flow.metadata.get(STREAMED_IN, 0)
    return len(req.raw_content) if req.raw_content is not None else 0


def upstream_address(flow: http.HTTPFlow) -> str | None:
    """host:port of the origin connection the request went to, if one was made."""
    if SENT not in flow.metadata or "origin" not in decisions(flow):
        return None
    peer = flow.server_conn.peername
    if not peer:
        return None
    return f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"


def observed(flow: http.HTTPFlow, size: int) -> dict:
    """The access record's fields for operators: the request as received, the origin's part
    (None for hits and the edge's own answers), bytes both ways."""
    req, resp, conn = flow.request, flow.response, flow.client_conn
    upstream_status, upstream_seconds = flow.metadata.get(UPSTREAM, (None, None))
    out = {"protocol": req.http_version,
           "tls": conn.tls_version if conn.tls_established else None,
           "user_agent": req.headers.get("user-agent"),
           "referer": req.headers.get("referer"),
           "upstream_addr": upstream_address(flow),
           "upstream_status": upstream_status,
           "upstream_ms": round(upstream_seconds * 1000, 2) if upstream_seconds is not None else None,
           "bytes_in": flow.metadata.get(ARRIVED, 0) + request_body_size(flow),
           "bytes_out": (response_head_size(resp) + size) if resp is not None else 0}
    if FORWARDED_ID in flow.metadata:
        out["request_id"] = flow.metadata[FORWARDED_ID]
    return out


def request_facts(record: dict, rec: dict) -> dict:
    """What the metrics observe of a finished request, from its access record."""
    return {"site": rec.get("site") or "default", "pool": rec.get("pool") or "none", "status": record["status"],
            "seconds": record["ms"] / 1000, "upstream_status": record["upstream_status"],
            "upstream_seconds": record["upstream_ms"] / 1000 if record["upstream_ms"] is not None else None,
            "bytes_in": record["bytes_in"], "bytes_out": record["bytes_out"],
            "streamed": "response" in str(rec.get("stream", ""))}


# --- the combined format (Apache/nginx `combined`, what log analysers read) ----------------------

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
NO_ANSWER = 444         # combined needs a status: nginx's "closed without a response"


def _quoted(value) -> str:
    """A combined-format string field: `-` when absent; `"`, `\\` and bytes outside printable
    ASCII escaped as nginx does (\\xHH), so a client's User-Agent cannot end the field."""
    if value is None or value == "":
        return '"-"'
    out = []
    for b in str(value).encode("utf-8", "surrogateescape"):
        if b in (0x22, 0x5C):
            out.append("\\" + chr(b))
        elif 0x20 <= b <= 0x7E:
            out.append(chr(b))
        else:
            out.append(f"\\x{b:02X}")
    return '"' + "".join(out) + '"'


def combined_line(record: dict) -> str:
    """`client - - [10/Oct/2026:13:55:36 +0000] "GET /a?b HTTP/1.1" 200 2326 "referer" "agent" "id"`:
    the combined format, with the request id appended as one more quoted field."""
    t = datetime.fromisoformat(record["time"]).astimezone(timezone.utc)
    stamp = f"[{t.day:02d}/{MONTHS[t.month - 1]}/{t.year}:{t:%H:%M:%S} +0000]"
    line = "-"
    if record.get("method"):
        parts = urlsplit(record.get("url") or "")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        line = f"{record['method']} {target} {record.get('protocol') or 'HTTP/1.1'}"
    status = record.get("status") or NO_ANSWER
    client = record.get("client") or "-"
    return (f"{client} - - {stamp} {_quoted(line)} {status} {int(record.get('bytes') or 0)} "
            f"{_quoted(record.get('referer'))} {_quoted(record.get('user_agent'))} {_quoted(record.get('id'))}")


def render(record: dict, log_format: str = "json") -> str:
    """One access-log line (without its newline) in the configured format."""
    if log_format == "combined":
        return combined_line(record)
    return json.dumps(record, separators=(",", ":"))


class Arrival:
    """First in the chain: the request head's size as it arrived, before any addon changes it
    (when something records it: the access log or the metrics)."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if self.trace.recording:
            flow.metadata[ARRIVED] = request_head_size(flow.request)


def cache_verdict(rec: dict) -> str:
    """`hit`, or what the cache forwarded for (`uri-miss`, `stale`, ...), or `none`."""
    status = rec.get("cache")
    if not status:
        return "none"
    first = status.split(";", 1)[0].strip()
    verdict = first.removeprefix("fwd=") if first.startswith("fwd=") else first
    return verdict if re.fullmatch(r"[a-z-]{1,20}", verdict) else "none"     # a metrics label: a few words


class Trace:
    """Writes the access log and counts what it writes (the
    metrics endpoint reads the counts). Runs last in the chain. A line that cannot be written
    (a full disk, an I/O error, a closed file) is counted and reported once a minute, never
    raised: the hook or background task that logs goes on."""

    def __init__(self) -> None:
        self.out: IO[str] | None = None
        self.answered: Counter[tuple[str, str]] = Counter()     # (status class, cache verdict)
        self.served_by: Counter[tuple[str, str]] = Counter()    # (pool, origin) that answered
        self.failures = Throttle()
        self.lost = 0                   # lines not written since writes last worked
        self.log_format = "json"
        self.observer: Callable[[dict], None] | None = None     # the metrics (request_facts)
        self.open_clients: dict[str, Client] = {}              # for the connection gauge

    def apply(self, access_log: str | None) -> None:
        self.close()
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

    def _record(self, flow: http.HTTPFlow, rec: dict) -> None:
        record = access_record(flow)
        if self.observer is not None:
            self.observer(request_facts(record, rec))
        if self.out is not None:
            self._emit(record)

    # -- what the record needs from the exchange with the origin, and the open connections -----

    @property
    def recording(self) -> bool:
        """Something reads the records: the access log, or the metrics (once they exist)."""
        return self.out is not None or self.observer is not None

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is None and flow.request.stream and self.recording:    # its head goes to the origin now
            flow.metadata[SENT] = time.time()

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is None and self.recording:            # no addon answered: off to the origin
            flow.metadata.setdefault(SENT, time.time())

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """The origin's status and time to its head, before the cache may answer for it (a 304
        becomes the stored 200). Hits, the StoreOrigin and answers made in a request hook have
        no origin in the record or were never sent."""
        sent = flow.metadata.get(SENT)
        if sent is None:                                # not sent, or nothing records it
            return
        from addons.failsafe import made_by_edge      # failsafe imports this module
        if "origin" not in decisions(flow) or flow.response is None or made_by_edge(flow.response):
            return
        began = max(sent, flow.server_conn.timestamp_start or 0.0)     # failover: from the connect that answered
        flow.metadata[UPSTREAM] = (flow.response.status_code, max(0.0, flow.response.timestamp_start - began))

    def client_connected(self, client: Client) -> None:
        if not client.error:                # refused by the shield: never open
            self.open_clients[client.id] = client

    def client_disconnected(self, client: Client) -> None:
        self.open_clients.pop(client.id, None)

    def connections(self) -> dict[str, int]:
        """Open client connections by protocol (a TLS one before its handshake counts as http1)."""
        counts = Counter("http2" if c.alpn == b"h2" else "http1" for c in self.open_clients.values())
        return {"http1": counts["http1"], "http2": counts["http2"]}

    def write(self, record: dict) -> None:
        """An access-log line for an event without a flow (a connection the shield refused)."""
        if self.out is not None:
            self._emit({"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **record})

    def _emit(self, record: dict) -> None:
        try:
            self.out.write(render(record, self.log_format) + "\n")
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
        if self.out is None and self.observer is None:
            return
        try:
            self._record(flow, rec)
        except Exception as e:      # logging must never take the proxy down
            report(self.failures, f"access log (flow {flow.id})", e)
