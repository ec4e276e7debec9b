"""The route addon: picks the pool and origin for each request before any upstream connection
exists (mitmproxy decides the destination from request.host/port), keeping the client's Host."""

from __future__ import annotations

from mitmproxy import http

from addons.config import EdgeConfig, Origin
from addons.failsafe import fail_closed
from addons.route.balance import SmoothWeighted
from addons.trace import decisions


class Route:
    def __init__(self) -> None:
        self.balancers: dict[str, SmoothWeighted[Origin]] = {}
        self.default_pool = ""

    def apply(self, config: EdgeConfig) -> None:
        self.balancers = {name: SmoothWeighted([(o, o.weight) for o in pool.origins])
                          for name, pool in config.pools.items()}
        self.default_pool = config.default_pool

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or not self.balancers:
            return
        pool = self.default_pool
        origin = self.balancers[pool].pick()
        # The destination only: the Request.host/port setters would also rewrite the Host
        # header, and the origin must see the client's Host.
        data = flow.request.data
        data.scheme, data.host, data.port = origin.scheme_bytes, origin.host, origin.port
        rec = decisions(flow)
        rec["pool"] = pool
        rec["origin"] = origin.url
