"""The forward proxy's addons: mitmproxy's hooks handed to policy.py.

Order of a request (Squid's peek and splice): the client is admitted by address (Guard); a
CONNECT is authenticated and decided on its host in `http_connect`, before any TLS; the
tunnel's first bytes are peeked in `next_layer`: the ClientHello's SNI is decided too when it
differs, then the tunnel is either passed through undecrypted (a TCP layer, counted for the
activity log), closed (blocked by SNI), or left to mitmproxy's TLS layers to decrypt (only
where a rule needs it, never for `intercept.never` hosts). Plain-HTTP and decrypted requests are
decided in `requestheaders` with their URL. mitmproxy's NextLayer must wait for a complete
ClientHello before it picks a layer: the forward master sets `ignore_hosts` to a pattern that
never matches, which makes it wait (it reads the ClientHello to test hosts against it).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import logging
import sys
import time
import weakref
from dataclasses import dataclass, field

import cachetools
from mitmproxy import connection, http, tcp
from mitmproxy.addons import proxyauth, tlsconfig
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.tls import ClientHello

from addons import failsafe
from addons.failsafe import fail_closed
from addons.client import split_host
from addons.forward import policy
from addons.forward.config import ForwardConfig
from addons.shield.limits import MemoryStore, retry_after_header
from addons.tasks import Throttle
from addons.trace import body_size

logger = logging.getLogger("edge")
FORWARD = "edge.forward"         # flow metadata: the Seen record of a request
NEVER_MATCHES = "(?!)"           # the ignore_hosts pattern that makes NextLayer wait for a ClientHello
CREDENTIALS_TTL = 300.0          # seconds a checked user:password is trusted (bcrypt costs milliseconds)
REALM = "edge forward proxy"


@dataclass
class Seen:
    """What the activity log says of one request or tunnel, filled as it is decided."""
    client: str
    method: str
    host: str
    port: int
    scheme: str                  # http | https | tunnel
    url: str | None = None
    user: str | None = None
    groups: tuple[str, ...] = ()
    decision: policy.Decision | None = None
    start: float = field(default_factory=time.time)
    bytes_in: int = 0
    bytes_out: int = 0
    decrypted: bool = False      # a tunnel: its requests are decided and logged one by one


class ForwardTlsConfig(tlsconfig.TlsConfig):
    """mitmproxy's TLS addon, signing with the forward config's CA (the master's confdir holds
    it as mitmproxy-ca.pem), without the `request` hook that answers a magic path with the
    CA's CRL inside every decrypted site."""
    name = "tlsconfig"
    request = None


class Refused(layer.Layer):
    """A tunnel closed at once: its ClientHello named a blocked site after the CONNECT was
    accepted, and its block page cannot be shown without decrypting."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            yield commands.CloseConnection(self.context.client)
        yield from ()


class ActivityLog:
    """The activity log: one JSON line per request, tunnel or refusal (policy.activity_line)."""

    def __init__(self) -> None:
        self.out = None
        self.path: str | None = None
        self.failures = Throttle()

    def apply(self, path: str | None) -> None:
        if path == self.path:
            return
        out = sys.stdout if path == "-" else open(path, "a", buffering=1, encoding="utf-8") if path else None
        self.done()                     # after the new one opened: should that fail, the old one stays
        self.out, self.path = out, path

    def reopen(self) -> None:
        """A reload: the file opened again by its name (logrotate moved the old one away)."""
        if self.path in (None, "-"):
            return
        out = open(self.path, "a", buffering=1, encoding="utf-8")
        old, self.out = self.out, out
        old.close()

    def write(self, seen: Seen, status: int | None, cache: str | None = None) -> None:
        if self.out is None:
            return
        decision = seen.decision
        record = policy.activity_line(
            when=seen.start, user=seen.user, group=decision.group if decision else (seen.groups or (None,))[0],
            client=seen.client, method=seen.method, host=seen.host, port=seen.port, url=seen.url,
            scheme=seen.scheme, decision=decision, status=status, bytes_in=seen.bytes_in, bytes_out=seen.bytes_out,
            duration=time.time() - seen.start, cache=cache)
        try:
            self.out.write(json.dumps(record, separators=(",", ":")) + "\n")
        except (OSError, ValueError) as e:
            if count := self.failures.occurred(time.monotonic()):
                logger.warning("edge: activity log write failed (%d times): %s", count, e)

    def done(self) -> None:
        if self.out is not None and self.out is not sys.stdout:
            self.out.close()
        self.out = None

    # the flows that reach the end: each one line
    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def _finish(self, flow: http.HTTPFlow) -> None:
        seen: Seen | None = flow.metadata.pop(FORWARD, None)     # popped: response then error is one line
        if seen is None:
            return
        seen.bytes_in = len(flow.request.raw_content or b"")
        seen.bytes_out = body_size(flow) if flow.response is not None else 0
        if flow.response is not None:
            status = flow.response.status_code
        else:           # mitmproxy answered 502 when the site could not be reached; else the client left
            status = 502 if flow.server_conn.timestamp_tcp_setup is None else None
        self.write(seen, status, cache_verdict(flow))


def cache_verdict(flow: http.HTTPFlow) -> str | None:
    """hit | stale | miss from the cache's record of the flow; None when it did not look."""
    state = flow.metadata.get("edge.cache")
    if state is None:
        return None
    status = state.status
    if status.hit:
        return "hit"
    if status.fwd == "stale":
        return "stale"
    return "miss" if status.fwd in ("uri-miss", "vary-miss", "miss") else None


def target_authority(req: http.Request) -> str:
    """host[:port] of the request's target, as a Host field says it."""
    host = f"[{req.host}]" if ":" in req.host else req.host
    return host if req.port == {"http": 80, "https": 443}.get(req.scheme) else f"{host}:{req.port}"


class Guard:
    """Never an open proxy: clients outside allow_clients are disconnected on arrival, and no
    connection goes to the proxy's own listener (a request for itself would loop)."""

    def __init__(self) -> None:
        self.config = ForwardConfig()
        self.refused = Throttle()

    def apply(self, config: ForwardConfig) -> None:
        self.config = config

    def client_connected(self, client: connection.Client) -> None:
        ip = client.peername[0]
        if policy.client_allowed(ip, self.config.allow_clients):
            return
        client.error = "refused: the client is not in allow_clients"
        if count := self.refused.occurred(time.monotonic()):
            logger.warning("edge: forward proxy refused %d client connection(s) outside allow_clients (last %s)",
                           count, ip)

    async def server_connect(self, data) -> None:
        server = data.server
        if server.address is None or server.address[1] != self.config.listen[1]:
            return              # another port: never the proxy (the common case costs no lookup)
        host, port = server.address[:2]
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port)
            resolved = [info[4][0] for info in infos]
        except OSError:
            resolved = []
        if policy.is_own_address(host, port, self.config.listen, resolved):
            server.error = "refused: the proxy does not forward to itself"


class Gate:
    """Authentication, the policy, per-user rate limits, the Host a forwarded request keeps,
    and Alt-Svc without HTTP/3."""

    def __init__(self, log: ActivityLog) -> None:
        self.log = log
        self.config = ForwardConfig()
        self.validator: proxyauth.Validator | None = None
        self.checked: cachetools.TTLCache = cachetools.TTLCache(4096, CREDENTIALS_TTL)
        self.authenticated: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # client -> user (CONNECT)
        self.tunnels: dict[str, Seen] = {}          # server connection id of a CONNECT -> its tunnel
        self.by_client: dict[str, set[str]] = {}    # client connection id -> its tunnels' keys
        self.limits: MemoryStore | None = None
        # Squid's loop detection: our own pseudonym in a request's Via means it came round
        self.via = f"1.1 edge-{secrets.token_hex(6)}"

    def apply(self, config: ForwardConfig) -> None:
        """Raises ValueError (nothing changed) when the users' file or server cannot be used."""
        self.validator = self._validator(config.users)
        self.config = config
        self.checked.clear()
        limit = config.rate_limit
        if limit is None:
            self.limits = None
        elif self.limits is None:
            self.limits = MemoryStore(limit.rate, limit.burst)
        else:
            self.limits = self.limits.retuned(limit.rate, limit.burst)

    @staticmethod
    def _validator(users) -> proxyauth.Validator | None:
        if users is None:
            return None
        try:
            if users.htpasswd is not None:
                return proxyauth.Htpasswd("@" + users.htpasswd)
            return proxyauth.Ldap(users.ldap)       # binds now: a wrong password is said at start
        except Exception as e:
            what = f"cannot read {users.htpasswd}" if users.htpasswd else "cannot bind to the LDAP server"
            raise ValueError(f"users: {what}: {e}") from None

    # -- who ------------------------------------------------------------------------------------

    def _user(self, flow: http.HTTPFlow) -> tuple[bool, str | None]:
        """(authenticated, user): always (True, None) without users:. Proxy-Authorization is
        taken off the request (the origin never sees the user's password)."""
        value = flow.request.headers.pop("proxy-authorization", "")
        if self.validator is None:
            return True, None
        if flow.client_conn in self.authenticated:          # a request inside an authenticated tunnel
            return True, self.authenticated[flow.client_conn]
        key = hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()     # no password kept
        user = self.checked.get(key)
        if user is not None:
            return True, user
        try:
            _, name, password = proxyauth.parse_http_basic_auth(value)
            valid = self.validator(name, password)
        except Exception:           # malformed header, LDAP unreachable: not authenticated (fail closed)
            valid = False
        if not valid:
            return False, None
        self.checked[key] = name
        return True, name

    def _refuse_auth(self, flow: http.HTTPFlow) -> None:
        flow.response = failsafe.edge_answer(flow, 407, "proxy authentication is required",
                                             {"Proxy-Authenticate": f'Basic realm="{REALM}"'})

    def _limited(self, flow: http.HTTPFlow, seen: Seen) -> bool:
        if self.limits is None:
            return False
        verdict = self.limits.take(seen.user or seen.client, time.monotonic())
        if verdict.allowed:
            return False
        flow.response = failsafe.edge_answer(flow, 429, "too many requests from this user",
                                             {"Retry-After": retry_after_header(verdict.retry_after)})
        return True

    def _decide(self, seen: Seen, host: str, url: str | None) -> policy.Decision:
        return policy.decide(self.config.policy, self.config.lists, host, url, seen.groups)

    def _decrypts(self, decision: policy.Decision, *hosts: str) -> bool:
        return decision.decrypts and self.config.intercept.ca is not None and \
            not any(policy.never_decrypted(h, self.config.intercept.never) for h in hosts if h)

    # -- CONNECT --------------------------------------------------------------------------------

    @fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        req = flow.request
        seen = Seen(flow.client_conn.peername[0], "CONNECT", req.host.lower(), req.port, "tunnel")
        ok, seen.user = self._user(flow)
        if not ok:
            self._refuse_auth(flow)
            self.log.write(seen, 407)
            return
        seen.groups = policy.groups_of(seen.user, self.config.users.groups if self.config.users else {})
        if self._limited(flow, seen):
            self.log.write(seen, 429)
            return
        if policy.is_own_address(seen.host, seen.port, self.config.listen):
            flow.response = failsafe.edge_answer(flow, 403, "the proxy does not forward to itself")
            self.log.write(seen, 403)
            return
        if seen.port not in self.config.connect_ports:
            ports = ", ".join(map(str, self.config.connect_ports))
            flow.response = failsafe.edge_answer(flow, 403, f"CONNECT is allowed to port {ports} only")
            self.log.write(seen, 403)
            return
        seen.decision = self._decide(seen, seen.host, None)
        if seen.decision.blocked and not self._decrypts(seen.decision, seen.host):
            flow.response = failsafe.edge_answer(flow, 403, f"{seen.host}: {seen.decision.reason()}")
            self.log.write(seen, 403)
            return
        if self.validator is not None:
            self.authenticated[flow.client_conn] = seen.user
        self.tunnels[flow.server_conn.id] = seen
        self.by_client.setdefault(flow.client_conn.id, set()).add(flow.server_conn.id)

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """The tunnel's first bytes: pass through, close, or leave to mitmproxy to decrypt.
        Should the decision fail, the tunnel is closed (never decrypted nor passed unjudged)."""
        if nextlayer.layer is not None:
            return
        seen = self.tunnels.get(nextlayer.context.server.id)
        if seen is None or seen.decrypted or nextlayer.context.client.tls_established:
            return
        try:
            self._choose_layer(nextlayer, seen)
        except Exception:
            logger.exception("edge: forward tunnel to %s:%d: no decision; closed", seen.host, seen.port)
            self.tunnels.pop(nextlayer.context.server.id, None)
            nextlayer.layer = Refused(nextlayer.context)

    def _choose_layer(self, nextlayer: layer.NextLayer, seen: Seen) -> None:
        data = nextlayer.data_client()
        sni = None
        if data[:1] == b"\x16" and len(data) < 3:
            # a TLS record in slivers: mitmproxy would pick a layer before the ClientHello is
            # read, so its SNI would go unjudged; no client splits its first three bytes
            seen.decision = policy.Decision("block", None, None, seen.decision.group)
        elif starts_like_tls_record(data):
            try:
                hello = layers.tls.parse_client_hello(data)
            except ValueError:
                hello = None            # not a ClientHello after all: the bytes pass as they are
            else:
                if hello is None:
                    return              # incomplete: asked again with more (NextLayer waits too)
            sni = hello.sni.lower().rstrip(".") if isinstance(hello, ClientHello) and hello.sni else None
            if sni and sni != seen.host:
                seen.decision = policy.stricter(seen.decision, self._decide(seen, sni, None))
        elif not data:
            return
        decision = seen.decision
        if self._decrypts(decision, seen.host, sni):
            seen.decrypted = True       # mitmproxy's own layers: TLS, then HTTP, each request decided
            del self.tunnels[nextlayer.context.server.id]
            return
        if decision.blocked:
            del self.tunnels[nextlayer.context.server.id]
            nextlayer.layer = Refused(nextlayer.context)
            self.log.write(seen, None)
            return
        nextlayer.layer = layers.TCPLayer(nextlayer.context)

    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        seen = self.tunnels.get(flow.server_conn.id)
        message = flow.messages[-1]
        if seen is not None:
            if message.from_client:
                seen.bytes_in += len(message.content)
            else:
                seen.bytes_out += len(message.content)
        flow.messages.clear()           # a tunnel's bytes are relayed, never kept

    def tcp_end(self, flow: tcp.TCPFlow) -> None:
        seen = self.tunnels.pop(flow.server_conn.id, None)
        if seen is not None:
            self.log.write(seen, 200)

    def tcp_error(self, flow: tcp.TCPFlow) -> None:
        seen = self.tunnels.pop(flow.server_conn.id, None)
        if seen is not None:
            self.log.write(seen, 502 if flow.server_conn.timestamp_tcp_setup is None else 200)

    def client_disconnected(self, client: connection.Client) -> None:
        """Tunnels of this client that ended before any layer was chosen (no byte sent)."""
        for key in self.by_client.pop(client.id, ()):
            seen = self.tunnels.pop(key, None)
            if seen is not None and not seen.decrypted:
                self.log.write(seen, 200)

    # -- plain HTTP and decrypted requests ------------------------------------------------------

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error:
            return
        req = flow.request
        inside = flow.client_conn.tls_established      # a decrypted tunnel's request
        if any(self.via in value for value in req.headers.get_all("via")):
            flow.response = failsafe.edge_answer(flow, 508, "forwarding loop: the request came back to this proxy")
            return
        req.headers.add("Via", self.via)
        seen = Seen(flow.client_conn.peername[0], req.method, req.host.lower(), req.port,
                    "https" if inside else "http", req.url)
        flow.metadata[FORWARD] = seen
        ok, seen.user = self._user(flow)
        if not ok:
            self._refuse_auth(flow)
            return
        seen.groups = policy.groups_of(seen.user, self.config.users.groups if self.config.users else {})
        if inside:
            asked = split_host(req.host_header or seen.host)
            if asked != seen.host.strip("[]"):
                # the tunnel goes to the CONNECT's host: a Host naming another would be decided
                # (and cached) as a site it is not sent to
                flow.response = failsafe.edge_answer(flow, 421, "this connection is for another host")
                return
        elif req.http_version.startswith("HTTP/1"):
            req.headers["Host"] = target_authority(req)     # RFC 9112 3.2.2: the URI's, not the client's Host
        if self._limited(flow, seen):
            return
        if policy.is_own_address(seen.host, seen.port, self.config.listen):
            flow.response = failsafe.edge_answer(flow, 403, "the proxy does not forward to itself")
            return
        seen.decision = self._decide(seen, seen.host, seen.url)
        if seen.decision.blocked:
            response = failsafe.edge_answer(flow, 403, seen.decision.reason())
            response.content = policy.block_page(seen.host, seen.url, seen.decision, flow.id)
            response.headers["Content-Type"] = "text/html; charset=utf-8"
            flow.response = response
            return
        if req.headers.get("transfer-encoding") and not req.stream:
            req.stream = True            # a body of unknown length is relayed, not held

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(FORWARD) is None:
            return
        headers = flow.response.headers
        if "alt-svc" in headers:
            kept = policy.without_h3(", ".join(headers.get_all("alt-svc")))
            if kept is None:
                del headers["alt-svc"]
            else:
                headers["Alt-Svc"] = kept
