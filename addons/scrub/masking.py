"""What must not leave the edge: origin addresses and internal IPs in response headers.

Pure: `OriginMask` knows the origins and answers, for one header value and the public address
the client used, what to rewrite it to or whether it leaks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from addons.net import is_internal, parse_ip

Fields = tuple[tuple[bytes, bytes], ...]

# Headers whose values are dates, sizes or opaque validators: nothing to scan there.
UNSCANNED = frozenset({b"date", b"expires", b"last-modified", b"content-length", b"age", b"etag",
                       b"content-type", b"cache-control", b"vary", b"accept-ranges", b"content-encoding"})

_IP_TOKENS = (
    r"\[(?P<v6b>[0-9A-Fa-f:.]+(?:%\w+)?)\](?::(?P<p1>\d{1,5}))?"
    r"|(?<![\w.:])(?P<v4>(?:\d{1,3}\.){3}\d{1,3})(?::(?P<p2>\d{1,5}))?(?![\w])"
    r"|(?<![\w.:])(?P<v6>(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4})(?![\w:])"
)
_LINK_URL = re.compile(r"<([^>]*)>")
_REFRESH_URL = re.compile(r"(?i)(\burl\s*=\s*['\"]?)([^'\";\s]+)")
_COOKIE_DOMAIN = re.compile(r"(?i)(;\s*domain\s*=\s*)\.?([^;\s]+)")


class OriginMask:
    def __init__(self, origins: Iterable[tuple[str, int]]):
        self.addrs = {(h.lower(), p) for h, p in origins}
        self.ips = {ip for h, _ in self.addrs if (ip := parse_ip(h))}
        self.names = {h for h, _ in self.addrs if parse_ip(h) is None}
        names = "|".join(re.escape(n) for n in sorted(self.names, key=len, reverse=True)) or "(?!)"
        name_token = rf"|(?<![\w.-])(?P<name>{names})(?::(?P<p3>\d{{1,5}}))?(?![\w-])"
        self.tokens = re.compile(_IP_TOKENS + name_token, re.IGNORECASE)

    # -- decisions on one address ---------------------------------------------------------------

    def is_origin_host(self, host: str, port: int | None, public_host: str) -> bool:
        """Does this host (and port) name an origin or an internal address, not the edge itself?"""
        host = host.lower().strip("[]")
        if port is not None and (host, port) in self.addrs:
            return True
        if host == public_host:
            return False
        ip = parse_ip(host)
        if ip is None:
            return host in self.names
        return ip in self.ips or is_internal(ip)

    def _token_leaks(self, m: re.Match, public_host: str) -> bool:
        host = m["v6b"] or m["v4"] or m["v6"] or m["name"]
        if (m["v6"] or m["v6b"]) and parse_ip(host) is None:
            return False        # a time of day or another colon list, not an address
        port = m["p1"] or m["p2"] or m["p3"]
        return self.is_origin_host(host, int(port) if port else None, public_host)

    # -- whole header values ----------------------------------------------------------------------

    def leaks(self, value: str, public_host: str) -> bool:
        """True if the value names an origin or an internal address other than the edge's own."""
        return any(self._token_leaks(m, public_host) for m in self.tokens.finditer(value))

    def rewrite_url(self, url: str, public_base: str, public_host: str) -> str:
        """An absolute URL at an origin (or internal address) moved to the public base URL."""
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError:
            return url
        if parts.scheme.lower() not in ("http", "https", "ws", "wss") or not parts.hostname:
            return url
        if port is None:
            port = 443 if parts.scheme.lower() in ("https", "wss") else 80
        if not self.is_origin_host(parts.hostname, port, public_host):
            return url
        rest = url.strip()[len(parts.scheme) + 3 + len(parts.netloc):]
        return public_base + (rest or "/")

    def rewrite_links(self, value: str, public_base: str, public_host: str) -> str:
        return _LINK_URL.sub(lambda m: f"<{self.rewrite_url(m[1], public_base, public_host)}>", value)

    def rewrite_refresh(self, value: str, public_base: str, public_host: str) -> str:
        return _REFRESH_URL.sub(lambda m: m[1] + self.rewrite_url(m[2], public_base, public_host), value)

    def rewrite_cookie_domain(self, value: str, public_base: str, public_host: str) -> str:
        def sub(m: re.Match) -> str:
            if self.is_origin_host(m[2], None, public_host):
                return m[1] + public_host
            return m[0]
        return _COOKIE_DOMAIN.sub(sub, value)

    # -- a whole response head ------------------------------------------------------------------

    def scrub_fields(self, fields: Fields, public_base: str, public_host: str, drop: frozenset[bytes],
                     server: bytes | None) -> tuple[Fields, list[str], list[str]]:
        """Response header fields as the client may see them, in one pass: `drop` names
        removed, origin URLs rewritten to `public_base`, Server replaced by `server` (or
        removed), and any other value naming an origin or internal address removed.
        Returns (fields, names removed, names rewritten)."""
        out: list[tuple[bytes, bytes]] = []
        removed: list[str] = []
        rewritten: list[str] = []
        for name, raw in fields:
            low = name.lower()
            if low in UNSCANNED:
                out.append((name, raw))
                continue
            if low == b"server":
                continue
            if low in drop:
                removed.append(name.decode("latin-1"))
                continue
            value = raw.decode("utf-8", "surrogateescape")
            rewrite = _REWRITERS.get(low)
            if rewrite is not None:
                new = rewrite(self, value, public_base, public_host)
                if new != value:
                    rewritten.append(name.decode("latin-1"))
                    value, raw = new, new.encode("utf-8", "surrogateescape")
            if self.leaks(value, public_host):
                removed.append(name.decode("latin-1"))
                continue
            out.append((name, raw))
        if server is not None:
            out.append((b"Server", server))
        return tuple(out), removed, rewritten


_REWRITERS = {
    b"location": OriginMask.rewrite_url,
    b"content-location": OriginMask.rewrite_url,
    b"link": OriginMask.rewrite_links,
    b"refresh": OriginMask.rewrite_refresh,
    b"set-cookie": OriginMask.rewrite_cookie_domain,
}
