"""The routing table of `sites:`: which site a Host names and which of its routes a request
takes, and the path its origin sees. Pure (no mitmproxy): built once from the config.

Hosts (nginx's server_name order): the exact name first, then the longest wildcard
`*.suffix` that covers it (a wildcard covers every name below the suffix, never the suffix
itself); case-insensitive, the port and a trailing dot ignored. No match: the default site,
or None (the addon answers 421).

Routes: a route matches when its path is a prefix of the request's normalised path (a string
prefix, as nginx's `location /api/` and Traefik's PathPrefix: `/api/` does not take `/api`)
and its `methods` and `headers` conditions hold. Among the routes that match, the longest
prefix wins; between equal prefixes, the one listed first. So the listed order only decides
between routes of one prefix (`/api/` with `headers: {X-Beta: "1"}` listed before a plain
`/api/` takes the beta requests), and `/` listed first still leaves `/api/x` to `/api/`.

Paths are matched normalised (what `normalise_path` says), and the origin is sent that same
normalised path, so the origin cannot resolve a path to somewhere other than where it was
routed (`/api/../admin` is `/admin`, which the `/api/` route never sees)."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

from addons.config import Site, SiteRoute

UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_SLASHES = re.compile(r"/{2,}")
_ENCODED_SEPARATOR = re.compile(r"%(2[Ff]|5[Cc])")


def host_key(value: str) -> str:
    """The host of a Host header or :authority as the table keys it: lower case, without the
    port, the brackets of an IPv6 literal or a trailing dot."""
    text = value.strip().lower()
    if text.startswith("["):
        return text[1:].split("]", 1)[0]
    if text.count(":") == 1:
        text = text.rsplit(":", 1)[0]
    return text.removesuffix(".")


def _unescape_unreserved(m: re.Match) -> str:
    char = chr(int(m[1], 16))
    return char if char in UNRESERVED else m[0].upper()


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 for an absolute path: `.` dropped, `..` removes the segment before it
    (never above the root); a path ending in a dot segment keeps its trailing slash."""
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        elif segment == ".":
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/" + "/".join(out)


def normalise_path(path: str) -> str | None:
    """The path (no query) routes are matched on and the origin is sent, or None for a path
    that must be refused. Percent-escapes of unreserved characters are decoded (RFC 3986
    6.2.2.2: `/%61pi/` is `/api/`, `%2e` is a dot) and other escapes upper-cased, runs of
    slashes merged (nginx's merge_slashes: `//api/` is `/api/`), dot segments removed.
    Refused: a dot segment that only appears once `%2F`, `%5C` or `\\` is read as a slash, or
    with a `;` parameter (`/api%2F..%2Fadmin`, `/api/..;/admin`): an origin that decodes them
    (Tomcat, many frameworks) would leave the route's origin_path or prefix."""
    if not path.startswith("/"):
        return None
    if not ("%" in path or "//" in path or "/." in path or "\\" in path):
        return path                     # nothing to decode, merge or remove: the common case
    text = _ESCAPE.sub(_unescape_unreserved, path)
    text = _remove_dot_segments(_SLASHES.sub("/", text))
    loose = _ENCODED_SEPARATOR.sub("/", text).replace("\\", "/")
    if any(segment.split(";", 1)[0] in (".", "..") for segment in loose.split("/")):
        return None
    return text


def origin_target(route: SiteRoute, path: str, query: str | None) -> str:
    """The request target the origin gets for a normalised `path` on `route`."""
    if route.strip_prefix:
        path = "/" + path[len(route.path):].lstrip("/")
    if route.origin_path:
        path = route.origin_path + path
    return path if query is None else f"{path}?{query}"


def key_query(query: str | None, ignored: Collection[str]) -> str | None:
    """The query as the cache keys it: the parameters named in `ignored` left out."""
    if query is None or not ignored:
        return query
    kept = [p for p in query.split("&") if p.split("=", 1)[0] not in ignored]
    return "&".join(kept) if kept else None


def _route_matches(route: SiteRoute, method: str, headers: Mapping[str, str]) -> bool:
    if route.methods and method not in route.methods:
        return False
    for cond in route.headers:
        value = headers.get(cond.name)
        if value is None:
            return False
        if cond.pattern is not None and cond.pattern.search(value) is None:
            return False
        if cond.pattern is None and value != cond.value:
            return False
    return True


class SiteTable:
    """Sites by host and each site's routes, longest prefix first (listed order within one)."""

    def __init__(self, sites: Mapping[str, Site], default_site: str | None = None) -> None:
        self.sites = dict(sites)
        self.exact: dict[str, Site] = {}
        self.wildcard: dict[str, Site] = {}         # the suffix after "*." -> site
        for site in sites.values():
            for host in site.hosts:
                if host.startswith("*."):
                    self.wildcard[host[2:]] = site
                else:
                    self.exact[host] = site
        self.default = sites[default_site] if default_site is not None else None
        self.routes: dict[str, tuple[SiteRoute, ...]] = {
            name: tuple(sorted(site.routes, key=lambda r: (-len(r.path), r.index))) for name, site in sites.items()}

    def site_for(self, host: str) -> Site | None:
        """The site of a Host value: exact name, then the longest wildcard, then the default."""
        name = host_key(host)
        site = self.exact.get(name)
        if site is not None:
            return site
        dot = name.find(".")
        while dot >= 0:
            site = self.wildcard.get(name[dot + 1:])
            if site is not None:
                return site
            dot = name.find(".", dot + 1)
        return self.default

    def route_for(self, site: Site, path: str, method: str, headers: Mapping[str, str]) -> SiteRoute | None:
        """The route of a normalised path (see the module's rule), or None."""
        for route in self.routes[site.name]:
            if path.startswith(route.path) and _route_matches(route, method, headers):
                return route
        return None

    def match(self, host: str, path: str, method: str, headers: Mapping[str, str]) -> tuple[Site, SiteRoute] | None:
        """(site, route) for a request, None when no site or no route takes it. `path`: as
        sent, with or without its query; it is normalised here."""
        site = self.site_for(host)
        normal = normalise_path(path.split("?", 1)[0])
        if site is None or normal is None:
            return None
        route = self.route_for(site, normal, method, headers)
        return None if route is None else (site, route)


def label(route: SiteRoute) -> str:
    """How the trace names a route: its prefix, and its place when conditions tell it apart."""
    return route.path if not (route.methods or route.headers) else f"{route.path}#{route.index}"

