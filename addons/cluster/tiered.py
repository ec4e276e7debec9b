"""The tiered cache (origin shield) over the nodes of a cluster: a cache miss whose key another
live node owns (tier.owner) is fetched from that node instead of the origin, so the origin
sees one fetch per object per cluster, and the answer is stored here too as the cache's
policy says. Two addons, one state:

- PeerArrival (early, before the shield): every Edge-Peer field is taken off every request,
  so none reaches an origin. A valid one (tier.verify) marks the request a peer's: it is never
  sent to another peer (no loop), and the trace gets the client and public base it signed (the
  shield, the logs, X-Forwarded-For and the cache key are the real client's, not the peer's).
  An invalid or forged one is dropped (logged, throttled) and the request is a plain client's.
  It also keeps the client's request head as it arrived, for the owner.
- Tiered (after the cache, before routing): sends an eligible miss (tier.why_not_shared) to
  the owner's address with the client's path and head (less forwarding and override headers;
  the Accept-Encoding this node asks origins with) and a fresh signature, so the owner routes it
  through its own sites, routes and cache. Once the answer's head is in, this node's request is
  put back as its own pipeline made it (the cache stores with it). A peer that cannot be
  reached, or closes before answering, is left alone for COOLDOWN seconds and this request goes
  to the origin at once (route's failover hook); an owner answers a peer's request it could not
  serve itself (its own 5xx) by closing the connection, so the sender falls back the same way.

Members and the signing key come from callables (the cluster addon's live() and secret(), once
wired), or from a static `cluster.peers` list and `cluster.secret_file`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from mitmproxy import ctx, http
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from addons import internals
from addons.cache.addon import META as CACHE, SITE, Cache, header_map
from addons.cache.serve import FROM_STORE
from addons.client import client_of, public_base
from addons.cluster.tier import HEADER, Peer, owner, sign, verify, why_not_shared
from addons.config import EdgeConfig
from addons.failsafe import made_by_edge
from addons.route.addon import ELSEWHERE, Route, _cancel_if_connecting
from addons.route.health import Failure, classify
from addons.scrub.forwarding import forwardable
from addons.scrub.request import RequestScrub
from addons.sites.addon import SITE_OF
from addons.tasks import Throttle
from addons.trace import decisions

logger = logging.getLogger("edge")
FROM_PEER = "edge.cluster.from_peer"    # the node that signed this request: never sent on to a peer
SENT_TO = "edge.cluster.sent_to"        # (the owner, the request as this node's pipeline made it)
ARRIVED = "edge.cluster.arrived"        # the client's (path, fields) as they arrived
COOLDOWN = 10.0                 # seconds a peer that failed is not asked
CONNECT_TIMEOUT = 1.0           # peers are near: a connect that takes longer falls back to the origin
_NAME = HEADER.lower().encode()


class Tiered:
    def __init__(self, cache: Cache, route: Route, request_scrub: RequestScrub,
                 members: Callable[[], Sequence] | None = None, secret: Callable[[], bytes | None] | None = None) -> None:
        self.cache, self.route, self.request_scrub = cache, route, request_scrub
        self.live, self.shared_secret = members, secret
        self.active = False             # a cluster is configured: Edge-Peer is read and dropped
        self.sharing = False            # cluster.tiered: misses go to their owner
        self.node = ""
        self.peers: list[Peer] = []     # a static list (cluster.peers), else self.live()
        self.key_file: bytes | None = None
        self.down: dict[str, float] = {}                # peer name -> when it may be asked again
        self.addresses: set[tuple[str, int]] = set()    # where peers were reached: connect timeout
        self.invalid = Throttle()
        self.read_timeout = 60.0

    def apply(self, config: EdgeConfig) -> None:
        cluster = config.cluster
        self.active = cluster is not None
        self.sharing = cluster is not None and cluster.tiered
        self.node = cluster.node if cluster else ""
        self.peers = [Peer(name, host, port) for name, (host, port) in cluster.peers.items()] if cluster else []
        self.key_file = None
        if cluster is not None and cluster.secret_file is not None:
            with open(cluster.secret_file, "rb") as f:
                self.key_file = f.read().strip()
        # an owner may wait for its origin as long as its pools allow: never cut it sooner
        self.read_timeout = max((p.read_timeout for p in config.pools.values()), default=60.0)

    def members(self) -> Sequence:
        return self.peers if self.peers or self.live is None else self.live()

    def secret(self) -> bytes | None:
        return self.key_file if self.key_file or self.shared_secret is None else self.shared_secret()

    # -- on this node's misses ---------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not self.sharing or flow.response or FROM_PEER in flow.metadata or FROM_STORE in flow.metadata \
                or flow.is_replay or ARRIVED not in flow.metadata:
            return
        state = flow.metadata.get(CACHE)
        if state is None or state.status.fwd not in ("uri-miss", "vary-miss") or state.bypass \
                or state.entry is not None or state.key in self.cache.uncacheable:
            return
        req = flow.request
        choice = flow.metadata.get(SITE)
        why = why_not_shared(req.data.method.decode("latin-1"), header_map(req.headers.fields),
                             flow.client_conn.tls_established, flow.metadata.get(SITE_OF),
                             choice.route if choice is not None else None)
        if why is not None:
            return
        now = time.monotonic()
        target = owner(state.key, self.members(), lambda m: self.down.get(m.name, 0.0) <= now)
        secret = self.secret()
        if target is None or target.name == self.node or not secret:
            return
        self._send(flow, target, secret)

    def _send(self, flow: http.HTTPFlow, target, secret: bytes) -> None:
        """The client's request, signed, to the owner; this node's own request kept to put back."""
        req = flow.request
        path, fields = flow.metadata[ARRIVED]
        base = public_base(flow, self.route.trusted)
        value = sign(secret, self.node, client_of(flow, self.route.trusted), base, req.data.method.decode("latin-1"),
                     req.host_header or "", path.decode("latin-1"), time.time())
        if value is None:
            return
        sent, _ = forwardable(fields, self.request_scrub.drop_untrusted)
        coding = tuple(f for f in req.headers.fields if f[0].lower() == b"accept-encoding")
        sent = tuple(f for f in sent if f[0].lower() != b"accept-encoding") + coding + \
            ((HEADER.encode(), value.encode("latin-1")),)
        flow.metadata[SENT_TO] = (target, req.data.path, req.headers.fields)
        flow.metadata[ELSEWHERE] = True
        data = req.data
        data.path, data.headers.fields = path, sent
        data.scheme, data.host, data.port = b"http", target.host, target.port
        self.addresses.add((target.host, target.port))
        internals.read_timeouts[(target.host, target.port)] = self.read_timeout
        rec = decisions(flow)
        rec["peer"] = f"to {target.name}"
        rec["origin"] = f"http://{target.host}:{target.port}"

    def _put_back(self, flow: http.HTTPFlow) -> tuple | None:
        """This node's request as its own pipeline made it (the cache stores with it)."""
        sent = flow.metadata.pop(SENT_TO, None)
        if sent is not None:
            target, path, fields = sent
            flow.request.data.path, flow.request.data.headers.fields = path, fields
            return target
        return None

    def server_connect(self, data: ServerConnectionHookData) -> None:
        """A peer that does not accept at once is not waited for (route's connect timeout,
        for peers). mitmproxy's loop guard (proxyserver, before us) refuses any connect to
        127.0.0.1 at this node's listening port, also when this node listens on 127.0.0.2 and
        the peer on 127.0.0.1 (one port, several loopback addresses): a peer that is not one
        of this node's own sockets is let through."""
        if data.server.address not in self.addresses:
            return
        if data.server.error is not None and not self._is_me(*data.server.address[:2]):
            data.server.error = None
        asyncio.get_running_loop().call_later(CONNECT_TIMEOUT, _cancel_if_connecting, asyncio.current_task(),
                                              data.server)

    @staticmethod
    def _is_me(host: str, port: int) -> bool:
        """`host`:`port` reaches one of this process's own listeners."""
        local = ("localhost", "127.0.0.1", "::1")
        for listen_host, listen_port, *_ in ctx.master.addons.get("proxyserver").listen_addrs():
            if listen_port == port and (listen_host in (host, "0.0.0.0", "::", "")
                                        or (host in local and listen_host in local)):
                return True
        return False

    def failover(self, flow: http.HTTPFlow, error: str, sent: bool) -> bool:
        """The internals' reroute hook: a peer that failed before answering is left alone for a
        while and the request goes to the origin; any other flow is route's to fail over."""
        if SENT_TO not in flow.metadata:
            return self.route.failover(flow, error, sent)
        target = self._put_back(flow)
        failure = classify(error, connecting=not sent, client_gone=flow.client_conn.timestamp_end is not None)
        if failure is Failure.CLIENT:
            return False
        if failure is not Failure.LOCAL:
            self.down[target.name] = time.monotonic() + COOLDOWN
            logger.warning("edge: peer %s failed (%s): asked again in %.0fs; its keys go elsewhere",
                           target.name, error, COOLDOWN)
        decisions(flow)["peer"] = f"{target.name} failed ({failure.value}): from the origin"
        decisions(flow).pop("origin", None)
        return self.route.to_origin(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if SENT_TO in flow.metadata:
            self._put_back(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        if SENT_TO in flow.metadata:
            self._put_back(flow)

    # -- at the owner -------------------------------------------------------------------------------

    def response(self, flow: http.HTTPFlow) -> None:
        """A peer's request this node could not serve (its own 5xx): the connection is closed
        without an answer, so the peer takes the origin itself."""
        if FROM_PEER in flow.metadata and flow.response.status_code >= 500 and made_by_edge(flow.response):
            flow.kill()

    def arrived(self, flow: http.HTTPFlow) -> None:
        """PeerArrival's work: see the module docstring."""
        req = flow.request
        fields = req.data.headers.fields
        if any(k.lower() == _NAME for k, _ in fields):
            theirs = [v for k, v in fields if k.lower() == _NAME]
            fields = req.data.headers.fields = tuple(f for f in fields if f[0].lower() != _NAME)
            if self._from_peer(flow, theirs):
                return
        if self.sharing:
            flow.metadata[ARRIVED] = (req.data.path, fields)

    def _from_peer(self, flow: http.HTTPFlow, values: list[bytes]) -> bool:
        req = flow.request
        claim = None
        if len(values) == 1:
            claim = verify(self.secret(), values[0].decode("latin-1"), req.data.method.decode("latin-1"),
                           req.host_header or "", req.data.path.decode("latin-1"), time.time())
        rec = decisions(flow)
        if claim is None:
            rec["peer"] = "invalid Edge-Peer dropped"
            count = self.invalid.occurred(time.monotonic())
            if count:
                logger.warning("edge: %d request%s with an invalid %s header (dropped; served as a client's), "
                               "the last from %s", count, "" if count == 1 else "s", HEADER, flow.client_conn.peername[0])
            return False
        flow.metadata[FROM_PEER] = claim.node
        rec["client"], rec["public_base"], rec["public_url"] = claim.client, claim.base, claim.base + req.path
        rec["peer"] = f"from {claim.node}"
        return True


class PeerArrival:
    """Before the shield: Edge-Peer taken off, verified; the client's head kept (Tiered.arrived)."""

    def __init__(self, tiered: Tiered) -> None:
        self.tiered = tiered

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not self.tiered.active or flow.response:
            return
        self.tiered.arrived(flow)
