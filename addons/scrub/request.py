"""The request side of scrubbing: the headers the origin will see, settled before the cache
keys on them. It runs before the cache (chain.py), so a lookup, the Vary selection stored with a
response and the request the origin answers are one and the same."""

from __future__ import annotations

from mitmproxy import http

from addons.client import client_of, public_base
from addons.config import EdgeConfig, ScrubConfig
from addons.failsafe import fail_closed
from addons.net import in_networks, parse_ip
from addons.scrub.forwarding import forwardable, forwarding_headers, header_set
from addons.trace import decisions


class RequestScrub:
    def __init__(self) -> None:
        self.trusted: tuple = ()
        self.overrides = header_set(ScrubConfig().override_headers)

    def apply(self, config: EdgeConfig) -> None:
        self.trusted = config.trusted_proxies
        self.overrides = header_set(config.scrub.override_headers)

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        headers = flow.request.headers
        client = client_of(flow, self.trusted)
        proto, _, host = public_base(flow, self.trusted).partition("://")
        added = tuple((k.encode(), v.encode("utf-8", "surrogateescape"))
                      for k, v in forwarding_headers(client, proto, host).items())
        # a trusted proxy's override headers are its own to send, as its X-Forwarded-* are
        trusted_peer = self.trusted and in_networks(parse_ip(flow.client_conn.peername[0]), self.trusted)
        overrides = frozenset() if trusted_peer else self.overrides
        dropped = [k.decode("latin-1") for k, _ in headers.fields if k.lower() in overrides]
        if dropped:
            decisions(flow)["dropped"] = dropped
        headers.fields = forwardable(headers.fields, overrides) + added
