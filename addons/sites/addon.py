"""The sites addons: which site and route a request is for (table.py), and what that site does
to its requests and answers. Without `sites:` in the config both do nothing: the one implicit
site takes every host and routes to routing.default_pool, exactly as before.

Sites (request side) runs after protocol (well-formed requests, the absolute-form authority
already the Host), the shield (refusals are cheapest first) and request_scrub (the forwarding
headers settled: a site's request rules come after, so a header an operator sets is not
dropped as a client's), and before compress, the cache and route: the cache keys on the site
and route (flow.metadata[cache.SITE]) and takes the route's settings, route takes its pool.
It answers 421 for a Host no site has (default_site null), 308 to https for plain-HTTP
requests to https_redirect sites, 404 when no route of the site takes the path, 400 for a
path that hides dot segments behind encoded slashes; it sends the origin the normalised path
with strip_prefix/origin_path applied (the access log keeps the client's URL).

SiteAnswers (response side) runs after the cache and stream, before the scrub: the header
rules and HSTS go on every answer of a site (from the origin, a hit, streamed, the edge's
own) on the way to the client, never into the stored copy, and the scrub still masks them.
A route that changes the path gets the origin's Location/Content-Location back in the
client's paths (nginx's proxy_redirect default).
A streamed head leaves after `responseheaders`, a whole response after `response` (which
follows the cache storing it)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from mitmproxy import http

from addons.cache.addon import REFRESH, SETTINGS, SITE
from addons.cache.serve import FROM_STORE
from addons.client import client_of, public_base
from addons.compress.addon import ENABLED as COMPRESS
from addons.config import EdgeConfig, RouteShield, Site, SiteRoute
from addons.failsafe import edge_answer, fail_closed
from addons.route.addon import POOL
from addons.shield.addon import PROFILE
from addons.shield.limits import MemoryStore, rate_key, retry_after_header
from addons.sites.rules import (FieldEdit, client_location, hsts_field, https_location, path_prefixes,
                                redirects)
from addons.sites.table import SiteTable, host_key, key_query, label, normalise_path, origin_target
from addons.trace import decisions

SITE_OF = "edge.sites.site"     # flow metadata: the Site whose answer rules apply


@dataclass(frozen=True)

class Choice:
    """A request's site and route, what the cache keys with, and the route's settings; kept
    in flow.metadata[SITE] (the cache carries it to its background refreshes)."""
    site: Site
    route: SiteRoute
    key_prefix: str                 # "SITE:ROUTE-INDEX": two sites or routes never share an entry
    key_path: str                   # the client's normalised path, ignored query keys left out


class Sites:
    def __init__(self) -> None:
        self.table: SiteTable | None = None
        self.trusted: tuple = ()
        self.request_edits: dict[str, FieldEdit] = {}
        self.requests: Counter[str] = Counter()         # site -> requests it took
        self.misdirected = 0                            # requests for a host no site has (421)
        self.refused = 0                                # by a route's rate limit (429)
        self.limiters: dict[tuple[str, int], MemoryStore] = {}
        self.https_port = 443           # the port https redirects name (the first TLS listener's)
        self.profiled = False           # some route has a shield profile

    def apply(self, config: EdgeConfig) -> None:
        self.table = SiteTable(config.sites, config.default_site) if config.sites else None
        self.profiled = any(route.shield is not None for site in config.sites.values() for route in site.routes)
        self.https_port = config.https_port
        self.trusted = config.trusted_proxies
        self.request_edits = {name: FieldEdit(site.request_headers) for name, site in config.sites.items()}
        old, self.limiters = self.limiters, {}      # a reload keeps each route's buckets (at its new rate)
        for name, site in config.sites.items():
            for route in site.routes:
                if (limit := route.rate_limit) is not None:
                    key = (name, route.index)
                    self.limiters[key] = (old[key].retuned(limit.rate, limit.burst) if key in old
                                          else MemoryStore(limit.rate, limit.burst))

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or FROM_STORE in flow.metadata:
            return
        if self.table is None:
            return
        choice = flow.metadata.get(SITE)
        if choice is not None and flow.metadata.get(REFRESH):     # the cache's refresh of a routed request
            self._settle(flow, choice)
            return
        req, rec = flow.request, decisions(flow)
        public_base(flow, self.trusted)         # the access log keeps the client's URL
        host = req.host_header or ""
        target = req.path
        path, sep, query = target.partition("?")
        tls = flow.client_conn.tls_established
        site = self.table.site_for(host)
        if site is None:
            self.misdirected += 1
            rec["site"] = "unknown host"
            flow.response = edge_answer(flow, 421, "this host is not served here")
            return
        self.requests[site.name] += 1
        rec["site"] = site.name
        flow.metadata[SITE_OF] = site
        if redirects(site.https_redirect, tls, req.method, path):
            rec["redirect"] = "https"
            flow.response = edge_answer(flow, 308, "this site is served over https",
                                        {"Location": https_location(host_key(host), target, self.https_port)})
            return
        normal = "/" if target == "*" else normalise_path(path)
        if normal is None:
            rec["route"] = "refused: encoded dot segments"
            flow.response = edge_answer(flow, 400, "the path hides dot segments behind encoded slashes")
            return
        method = "GET" if req.method == "PURGE" else req.method     # a purge is for what a GET stored
        route = self.table.route_for(site, normal, method, req.headers)
        if route is None:
            rec["route"] = "none"
            flow.response = edge_answer(flow, 404, "no route of this site takes this path")
            return
        rec["route"] = label(route)
        judged = flow.metadata.get(PROFILE)
        if judged is not None and judged != (route.shield or RouteShield()):
            # the shield judged this request by another route's profile (a header condition on a
            # field the request scrub changed since): fail closed
            rec["route"] = f"{label(route)}: refused, inspected under another route's shield profile"
            flow.response = edge_answer(flow, 403, "this request cannot be routed as inspected")
            return
        if route.rate_limit is not None and self._limited(flow, site, route):
            return
        query = query if sep else None
        keyed = key_query(query, route.ignore_query)
        choice = Choice(site, route, f"{site.name}:{route.index}", normal if keyed is None else f"{normal}?{keyed}")
        flow.metadata[SITE] = choice
        if target != "*":
            sent = origin_target(route, normal, query)
            if sent != target:
                req.path = sent
        edit = self.request_edits[site.name]
        if edit.active:
            req.headers.fields = edit(req.headers.fields)
        self._settle(flow, choice)

    def shield_profile(self, flow: http.HTTPFlow) -> RouteShield:
        """The shield profile of the route this request will take: the shield runs before this
        addon settles the route, so it asks here (the same match; should the request scrub
        change a field a route condition reads in between, `requestheaders` refuses it)."""
        profile = RouteShield()
        if self.table is not None and self.profiled:
            req = flow.request
            site = self.table.site_for(req.host_header or "")
            normal = normalise_path(req.path.partition("?")[0]) if site is not None and req.path != "*" else None
            route = None if normal is None else \
                self.table.route_for(site, normal, "GET" if req.method == "PURGE" else req.method, req.headers)
            profile = route.shield if route is not None and route.shield is not None else profile
        return profile

    def _limited(self, flow: http.HTTPFlow, site: Site, route: SiteRoute) -> bool:
        """The route's own rate limit (nginx's limit_req in a location), after the shield's:
        True if the request was answered 429."""
        rl = route.rate_limit
        store = self.limiters[(site.name, route.index)]
        verdict = store.take(rate_key(rl.key, client_of(flow, self.trusted), flow.request.path, flow.request.headers.get),
                             time.monotonic())
        if verdict.allowed:
            return False
        rec = decisions(flow)
        if rl.mode == "detect":
            rec["shield"] = "detect: route rate: too many requests (429)"
            return False
        rec["shield"] = "route rate: too many requests (429)"
        self.refused += 1
        flow.response = edge_answer(flow, 429, "too many requests", {"Retry-After": retry_after_header(verdict.retry_after)})
        return True

    @staticmethod
    def _settle(flow: http.HTTPFlow, choice: Choice) -> None:
        """The route's overrides, for the addons that read them: pool, cache, compress."""
        route = choice.route
        if route.pool is not None:
            flow.metadata[POOL] = route.pool
        if route.cache is not None:
            flow.metadata[SETTINGS] = route.cache
        if route.compress is not None:
            flow.metadata[COMPRESS] = route.compress

    def cache_keys(self, host: str, target: str) -> list[tuple[str, str]] | None:
        """(key prefix, key path) of a public URL's host and target on every route of its site
        whose prefix takes the path: a purge by URL drops the entry of each (routes with
        method or header conditions may share a path). None without sites: the URL is the key."""
        if self.table is None:
            return None
        site = self.table.site_for(host)
        path, sep, query = target.partition("?")
        normal = normalise_path(path)
        if site is None or normal is None:
            return []
        out = []
        for route in self.table.routes[site.name]:
            if normal.startswith(route.path):
                keyed = key_query(query if sep else None, route.ignore_query)
                out.append((f"{site.name}:{route.index}", normal if keyed is None else f"{normal}?{keyed}"))
        return out

    def snapshot(self) -> dict:
        """What `edge status` shows of the sites: hosts, routes and requests taken."""
        if self.table is None:
            return {}
        sites = {name: {"hosts": list(site.hosts), "routes": [label(r) for r in site.routes],
                        "requests": self.requests[name]} for name, site in self.table.sites.items()}
        return {"sites": sites, "misdirected": self.misdirected, "route_rate_refusals": self.refused}


class SiteAnswers:
    def __init__(self) -> None:
        self.edits: dict[str, FieldEdit] = {}

    def apply(self, config: EdgeConfig) -> None:
        self.edits = {name: FieldEdit(site.response_headers) for name, site in config.sites.items()}

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response.stream:        # its head leaves before `response`
            self._finish(flow)

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        if not flow.response.stream:
            self._finish(flow)

    def _finish(self, flow: http.HTTPFlow) -> None:
        site: Site | None = flow.metadata.get(SITE_OF)
        if site is None:
            return
        resp = flow.response
        edit = self.edits.get(site.name)
        if edit is not None and edit.active:
            resp.headers.fields = edit(resp.headers.fields)
        choice: Choice | None = flow.metadata.get(SITE)
        prefixes = choice and path_prefixes(choice.route.path, choice.route.strip_prefix, choice.route.origin_path)
        if prefixes is not None:
            self._relocate(resp, prefixes, flow.request.host_header or "")
        hsts = hsts_field(site.hsts, flow.client_conn.tls_established)
        if hsts is not None:
            resp.headers["Strict-Transport-Security"] = hsts

    @staticmethod
    def _relocate(resp: http.Response, prefixes: tuple[str, str], host: str) -> None:
        """Location and Content-Location from the origin's paths to the client's."""
        for name in ("location", "content-location"):
            value = resp.headers.get(name)
            moved = client_location(value, prefixes, host) if value else None
            if moved is not None:
                resp.headers[name] = moved
