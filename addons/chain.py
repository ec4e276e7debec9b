"""The edge as one addon: owns the `edge_config` option and hands the parsed config to the
chain of capability addons, in the order every event must visit them."""

from __future__ import annotations

import logging
from typing import Optional

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode

from addons import failsafe, internals
from addons.admin import Admin
from addons.cache import Cache
from addons.cluster.tiered import PeerArrival, Tiered
from addons.cluster.addon import Cluster
from addons.compress import Compress
from addons.console import Console
from addons.config import ConfigError, EdgeConfig, config_from_origins, load_config
from addons.geo.locate import GeoDatabaseError
from addons.lifecycle.addon import Lifecycle
from addons.protocol import Protocol
from addons.route import Route
from addons.scrub import Scrub
from addons.scrub.request import RequestScrub
from addons.shield import Shield
from addons.shield.waf import WafError
from addons.sites import SiteAnswers, Sites
from addons.stream import Stream
from addons.tls.addon import Tls
from addons.trace import Arrival, Trace
from addons.workers import runtime

logger = logging.getLogger("edge")

# Options edge relies on: route per request before any upstream connection exists (lazy), keep
# the client's Host for the origin, and serve clients from public addresses (block_global).
# Under plain mitmdump/mitmweb also: no onboarding app (`Host: mitm.it` would get mitmproxy's
# page and CA certificate) and Alt-Svc left to the edge's masking (options of addons that
# `edge run`'s masters do not load).
SAFE_DEFAULTS = {"connection_strategy": "lazy", "keep_host_header": True, "block_global": False,
                 "onboarding": False, "keep_alt_svc_header": True}


def config_from_mode(modes) -> EdgeConfig | None:
    """mitmdump without edge_config: the reverse-mode target is the one origin."""
    for spec in modes:
        mode = ProxyMode.parse(spec)
        if isinstance(mode, ReverseMode) and mode.scheme in ("http", "https"):
            host, port = mode.address
            return config_from_origins([f"{mode.scheme}://{host}:{port}"])
    return None


class Edge:
    def __init__(self, config: EdgeConfig | None = None, annotate: bool = False, extra=()) -> None:
        """`extra`: an embedder's own addons; they run after routing, before scrubbing (so
        whatever they add is scrubbed too) and before the trace is written."""
        self.protocol, self.request_scrub = Protocol(), RequestScrub()
        self.compress, self.cache, self.route = Compress(), Cache(), Route()
        self.scrub, self.trace = Scrub(), Trace()
        self.shield = Shield(lambda: self.route.locator, self.trace.write, lambda flow: self.sites.shield_profile(flow))
        self.admin = Admin(self.snapshot, self.metrics)
        self.stream = Stream(self.shield.inspected_body, self.cache.streamed)
        self.tls = Tls()      # after protocol, before all else: ACME challenges, plain HTTP on a TLS port
        # protocol before all: no addon sees a request that is not well-formed, and all see it
        # normalised (the cache keys on the Host the origin gets). Then the shield: refusals
        # are cheapest before any other work. The request the origin will see is settled
        # (request_scrub) before the cache keys on it and before compress narrows
        # Accept-Encoding. compress before cache: the origin is asked for identity, and the
        # origin's representation and each coding made from it are stored once (one origin
        # fetch for every coding; hits never recompress). stream after the cache and routing
        # (hits are whole; a streamed request connects after requestheaders), before the scrub
        # (which masks a streamed head as it leaves)
        # sites after request_scrub (a site's request rules are the operator's, not dropped as
        # a client's) and before compress, the cache and route, which take the route's
        # settings, key and pool; site_answers after the cache stored the origin's answer and
        # after stream, before the scrub: a site's answer rules reach every client, masked
        self.sites, self.site_answers = Sites(), SiteAnswers()
        self.cache.site_keys = self.sites.cache_keys
        # lifecycle last: while stopping, it closes HTTP/1 connections after the answer all others made
        self.lifecycle = Lifecycle(lambda: self.config, self.apply, self.trace.reopen)
        self.admin.write = self.lifecycle.write
        # many machines as one edge (addons/cluster): told of the cache's removals, it applies
        # the other nodes' with the cache's forget; the shield's challenge key comes from it
        self.cluster = Cluster(self.cache.forget, lambda: ctx.master.addons.get("proxyserver").listen_addrs())
        self.cache.removal_listeners.append(self.cluster.removed)
        self.shield.shared_key = self.cluster.bot_secret
        self.addons = [self.protocol, self.tls, self.shield, self.request_scrub, self.sites, self.compress,
                       self.cache, self.route, self.stream, *extra, self.site_answers, self.scrub, self.trace,
                       self.admin, self.cluster, self.lifecycle]
        # the tiered cache: a peer's signed request is known before the shield judges it (its
        # client is the one the peer signed for); a miss goes to its owner node after the cache
        # looked it up, instead of being routed to an origin. Its members and key: the cluster's
        self.tiered = Tiered(self.cache, self.route, self.request_scrub,
                             members=self.cluster.live, secret=self.cluster.secret)
        self.addons.insert(self.addons.index(self.tls) + 1, PeerArrival(self.tiered))
        self.addons.insert(self.addons.index(self.route), self.tiered)
        self.arrival = Arrival(self.trace)
        self.addons.insert(0, self.arrival)     # the request as received, before any addon changes it
        self.observed = None                    # addons/metrics.EdgeMetrics, made when first needed
        self.annotate = annotate
        # under mitmweb: after the trace wrote the access log, the flow shows the public URL
        self.console = Console()
        if annotate:
            self.addons.insert(self.addons.index(self.trace) + 1, self.console)
        self.machine = self._share_machine()   # one worker of several: they behave as one edge
        self.fixed = config is not None        # given by the CLI: options cannot replace it
        self.config: EdgeConfig | None = None
        if config is not None:
            self.apply(config)

    def load(self, loader: Loader) -> None:
        loader.add_option("edge_config", Optional[str], None,
                          "Path of the edge YAML config. Without it, the reverse-mode target is the one origin.")
        internals.install(interim=self.scrub.interim_fields, failover=self.tiered.failover)
        opts = loader.master.options
        opts.update(**{k: v for k, v in SAFE_DEFAULTS.items() if k in opts})

    def configure(self, updated: set[str]) -> None:
        if self.fixed or not ({"edge_config", "mode"} & updated):
            return
        path = ctx.options.edge_config
        try:
            config = load_config(path) if path else config_from_mode(ctx.options.mode)
            if config is not None:
                self.apply(config)
        except (ConfigError, GeoDatabaseError, WafError, ValueError) as e:
            raise exceptions.OptionsError(str(e)) from None

    def snapshot(self) -> dict:
        """What `edge status` shows: the pools, and what the shield refused, by kind."""
        return {**self.route.snapshot(), "shield": dict(self.shield.refused), **self.sites.snapshot(),
                **self.cluster.snapshot()}

    def metrics(self) -> str:
        """The /metrics page (Prometheus text)."""
        return self._metrics().exposition()

    def _metrics(self):
        """The edge's own registry, made once: with an admin endpoint at start (so every request
        is observed), else at the first metrics() call."""
        if self.observed is None:
            from addons.metrics import EdgeMetrics
            self.observed = EdgeMetrics(self._held)
            self.trace.observer = self.observed.observe
        return self.observed

    def _held(self) -> dict:
        store = self.cache.store
        return {"snapshot": self.snapshot(), "answered": self.trace.answered, "served_by": self.trace.served_by,
                "cache_bytes": store.bytes, "tier_bytes": store.tiers or {}, "connections": self.trace.connections()}

    def _share_machine(self):
        """A worker (EDGE_WORKER, addons/workers/runtime.py) shares with the others of its
        machine: the cache's removals, the health checks, the challenge key, and its counts
        for the admin's pages. None for a single process."""
        try:
            rt = runtime.current()
        except runtime.RuntimeEnvError as e:
            raise exceptions.OptionsError(str(e)) from None
        if rt is None:
            return None
        from addons.workers.checks import SharedChecks
        from addons.workers.machine import Machine
        self.cache.purge_log = rt.path("purge.log")
        self.route.shared = SharedChecks(rt)
        self.shield.shared_secret = rt.secret
        machine = Machine(rt, self.snapshot, self._families, self._load, lambda: self.route.shared.leads,
                          lambda: self.config is not None and self.config.admin is not None)
        self.admin.snapshot, self.admin.metrics = machine.status, machine.metrics
        self.addons.append(machine)
        return machine

    def _families(self) -> list[dict]:
        from addons.metrics import families_of
        return families_of(self.observed.registry) if self.observed is not None else []

    def _load(self) -> tuple[int, int]:
        """Requests in flight to origins, open client connections."""
        return sum(self.route.in_flight.values()), sum(self.trace.connections().values())

    def apply(self, config: EdgeConfig) -> None:
        self.config = config
        self.route.apply(config)            # first: the shield uses its geo database
        self.tiered.apply(config)
        self.tls.apply(config)
        self.shield.apply(config)
        self.compress.apply(config)
        self.cache.apply(config)
        self.scrub.apply(config)
        self.request_scrub.apply(config)
        self.sites.apply(config)
        self.site_answers.apply(config)
        self.trace.apply(config.access_log)
        self.console.apply(config)
        self.stream.apply(config.buffer_limit, web=self.annotate)
        self.admin.apply(config)
        self.trace.log_format = config.access_log_format
        if config.admin is not None:
            self._metrics()
        failsafe.configure(config.scrub.server_header, self.trace.write)    # answers made below the hooks
        self.lifecycle.apply(config)
        self.cluster.apply(config)
