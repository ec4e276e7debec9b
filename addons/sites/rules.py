"""What a site does to the messages it answers, as plain functions on header fields: the
header rules (remove, set, add), the https redirect's Location, HSTS. Pure (no mitmproxy)."""

from __future__ import annotations

from addons.config import HeaderRules
from addons.tls.acme import challenge_token

Fields = tuple[tuple[bytes, bytes], ...]


class FieldEdit:
    """One side's header rules, compiled once: fields named in `remove` or `set` go, then the
    `set` fields and the `add` fields are appended."""

    def __init__(self, rules: HeaderRules) -> None:
        self.drop = frozenset(n.lower().encode() for n in (*rules.remove, *(n for n, _ in rules.set)))
        self.append = tuple((n.encode(), v.encode()) for n, v in (*rules.set, *rules.add))
        self.active = bool(rules)

    def __call__(self, fields: Fields) -> Fields:
        if not self.active:
            return fields
        return tuple(f for f in fields if f[0].lower() not in self.drop) + self.append


def https_location(host: str, target: str, port: int = 443) -> str:
    """Where a plain-HTTP request is redirected: the same host (without the client's port),
    `port` when the TLS listener is not on 443, and the target (path and query) as sent."""
    authority = f"[{host}]" if ":" in host else host
    if port != 443:
        authority += f":{port}"
    return f"https://{authority}{target}"


def redirects(site_redirects: bool, tls: bool, method: str, path: str) -> bool:
    """A plain-HTTP request to an https_redirect site gets 308, except ACME's HTTP-01
    challenges (which must be answered over plain HTTP) and PURGE (the cache's own
    authorisation decides; `edge purge` speaks plain HTTP)."""
    return site_redirects and not tls and method != "PURGE" and challenge_token(path) is None


def hsts_field(value: str | None, tls: bool) -> str | None:
    """Strict-Transport-Security is only meaningful (RFC 6797 7.2: only sent) over TLS."""
    return value if value is not None and tls else None


def path_prefixes(route_path: str, strip_prefix: bool, origin_path: str) -> tuple[str, str] | None:
    """(what the origin's paths start with, what the client's start with) for a route that
    changes the path, None for one that does not: `/api/` stripped is ("/", "/api/"),
    `/` under origin_path `/blog` is ("/blog/", "/")."""
    if not strip_prefix and not origin_path:
        return None
    client = route_path if route_path.endswith("/") else route_path + "/"
    return origin_path + ("/" if strip_prefix else client), client


def client_location(value: str, prefixes: tuple[str, str], host: str) -> str | None:
    """A Location (or Content-Location) the origin gave in its own paths, in the client's
    (nginx's `proxy_redirect default`): a path-absolute URL, or an absolute one naming the
    public `host` (the origin gets the client's Host, so it builds those), whose path is under
    the origin's prefix. None: leave it as it is."""
    origin, client = prefixes
    if value.startswith("/") and not value.startswith("//"):
        start, head = 0, ""
    else:
        scheme, sep, rest = value.partition("://")
        authority = rest.split("/", 1)[0]
        if not sep or scheme.lower() not in ("http", "https") or authority.lower() != host.lower():
            return None
        start = len(scheme) + 3 + len(authority)
        head = value[:start]
    path = value[start:]
    if path.startswith(origin):
        return head + client + path[len(origin):]
    if path.split("?", 1)[0] == origin[:-1]:            # the prefix's own directory without its slash
        return head + (client[:-1] or "/") + path[len(origin) - 1:]
    return None
