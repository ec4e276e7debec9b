"""The request side of scrubbing: the headers the origin will see, settled before the cache
keys on them. It runs before the cache (chain.py), so a lookup, the Vary selection stored with a
response and the request the origin answers are one and the same."""

from __future__ import annotations

import re

from mitmproxy import http

from addons.client import client_of, public_base
from addons.config import EdgeConfig, ScrubConfig
from addons.failsafe import fail_closed
from addons.net import in_networks, parse_ip
from addons.scrub.forwarding import drop_set, forwardable, forwarding_headers, header_set
from addons.trace import FORWARDED_ID, decisions

REQUEST_ID = b"x-request-id"
_WELL_FORMED_ID = re.compile(rb"[!#-\[\]-~]{1,200}")      # visible ASCII, no quote or backslash


def request_id_fields(fields: tuple, own_id: str, trusted_peer: bool) -> tuple[tuple, str | None]:
    """The request's fields with the X-Request-Id the origin gets: a trusted proxy's (one
    well-formed field) is kept and returned; anyone else's is replaced by the edge's own id (the
    one its pages and access log show), so a client cannot pick the id an origin logs."""
    theirs = [v for k, v in fields if k.lower() == REQUEST_ID]
    if trusted_peer and len(theirs) == 1 and _WELL_FORMED_ID.fullmatch(theirs[0]):
        return fields, theirs[0].decode("ascii")
    if theirs:
        fields = tuple(f for f in fields if f[0].lower() != REQUEST_ID)
    return fields + ((b"X-Request-Id", own_id.encode()),), None


class RequestScrub:
    def __init__(self) -> None:
        self.trusted: tuple = ()
        self.added: dict[tuple[str, str, str], tuple] = {}     # (client, proto, host) -> forwarding fields
        self.configure_scrub(ScrubConfig())

    def configure_scrub(self, settings: ScrubConfig) -> None:
        self.overrides = header_set(settings.override_headers)
        self.drop_untrusted = drop_set(self.overrides)
        self.drop_trusted = drop_set()      # a trusted proxy's override headers are its own to send

    def apply(self, config: EdgeConfig) -> None:
        self.trusted = config.trusted_proxies
        self.configure_scrub(config.scrub)

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        headers = flow.request.headers
        client = client_of(flow, self.trusted)
        proto, _, host = public_base(flow, self.trusted).partition("://")
        added = self.added.get((client, proto, host))
        if added is None:                   # the same few clients and hosts come back all the time
            if len(self.added) >= 4096:
                self.added.clear()
            added = self.added[(client, proto, host)] = tuple(
                (k.encode(), v.encode("utf-8", "surrogateescape"))
                for k, v in forwarding_headers(client, proto, host).items())
        trusted_peer = self.trusted and in_networks(parse_ip(flow.client_conn.peername[0]), self.trusted)
        fields, removed = forwardable(headers.fields, self.drop_trusted if trusted_peer else self.drop_untrusted)
        if removed and not trusted_peer:
            dropped = [k.decode("latin-1") for k in removed if k.lower() in self.overrides]
            if dropped:
                decisions(flow)["dropped"] = dropped
        fields, forwarded_id = request_id_fields(fields, flow.id, bool(trusted_peer))
        if forwarded_id is not None:
            flow.metadata[FORWARDED_ID] = forwarded_id
        headers.fields = fields + added
