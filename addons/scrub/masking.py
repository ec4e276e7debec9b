"""What must not leave the edge: origin addresses, internal names and internal IPs in response
headers and in origin error bodies.

Pure: `OriginMask` knows the origins and the internal domains and networks, and answers, for
one header value and the public address the client used, whether it leaks and what it is
rewritten to. Two kinds of URL are told apart:

- URLs that *point* somewhere (Location, Content-Location, Refresh, Link, report endpoints,
  WWW-Authenticate's authorization_uri, CSP report-uri): an origin or any internal address is
  the origin's view of itself, so it is moved to the public scheme://host.
- Addresses that *allow* something (CSP sources, Access-Control-Allow-Origin, Alt-Svc): only the
  origin's own address becomes the public one; any other internal address is dropped, so a policy
  is never widened (a client cannot reach an internal host, so it loses nothing either).
"""

from __future__ import annotations

import ipaddress
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import unquote

import brotli

from addons.net import IPAddress, embedded_ipv4, is_internal, parse_host_ip, parse_ip

try:
    from compression import zstd            # Python 3.14
except ImportError:                         # earlier: the backport mitmproxy also uses
    from backports import zstd

Fields = tuple[tuple[bytes, bytes], ...]

# Headers whose values are dates, sizes, media types or opaque validators: nothing to scan there.
UNSCANNED = frozenset({b"date", b"expires", b"last-modified", b"content-length", b"age", b"etag",
                       b"content-type", b"cache-control", b"vary", b"accept-ranges", b"content-encoding"})

# Names that never resolve on the public internet, so flagging them cannot hide a public URL:
# RFC 6761 localhost, RFC 6762 .local (mDNS; Kubernetes' cluster.local), ICANN's private-use
# .internal (2024; AWS ec2.internal/compute.internal, GCP's c.PROJECT.internal), RFC 8375
# home.arpa, and the names RFC 6762 appendix G finds in private use (intranet, private, corp,
# home, lan; corp and home are withheld from delegation by ICANN), plus /etc/hosts' localdomain.
DEFAULT_INTERNAL_DOMAINS = ("localhost", "local", "localdomain", "internal", "intranet", "private",
                            "corp", "home", "lan", "home.arpa")

WEB_SCHEMES = {"http": 80, "https": 443, "ws": 80, "wss": 443}
ORIGIN, INTERNAL = "origin", "internal"          # what a leaking address is
_UNKNOWN = object()

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_PART = r"(?:0x[0-9a-f]{0,8}|\d{1,11})"
_DOTTED = rf"{_PART}\.{_PART}\.{_PART}\.{_PART}"
# The scanners. Each starts with a plain character (class), so the regex engine skips to the
# candidates instead of trying every alternative at every position; the boundary before a
# token is a lookbehind over that first character. Cheap `in` tests decide which run at all.
# An authority after `//` (or `\\`, which browsers read as `//`): at the start of a token, after
# a scheme (found by _scheme: a scheme in the pattern would cost a scan of every word), or
# inside <...>, quotes or a parameter.
_URLS = re.compile(r"[/\\](?<![^\s<\"'=,(\[:][/\\])[/\\](?:[^\s/\\?#@\"'<>\[\]]*@)?"
                   r"(?P<uhost>\[[^\]\s/]*\]|[^\s/\\?#:\"'<>,;\[\]]*)(?::(?P<uport>\d{0,5}))?", re.IGNORECASE)
# a four-part dotted number (1.2.3.4.5, a version, is none), any base per part
_V4 = re.compile(r"(?P<v4>[0-9](?<![\w.].)(?:x[0-9a-f]{0,8}|\d{0,10})" + rf"\.{_PART}\.{_PART}\.{_PART})"
                 r"(?::(?P<port>\d{1,5}))?(?![\w-]|\.\d)", re.IGNORECASE)
_V6_BRACKETED = re.compile(r"\[(?P<v6>[0-9a-f:.]+(?:%[\w.~-]+)?)\](?::(?P<port>\d{1,5}))?", re.IGNORECASE)
_V6 = re.compile(r"(?<![\w.:])(?P<v6>(?:[0-9a-f]{0,4}:){2,7}(?:" + _DOTTED + r"|[0-9a-f]{1,4})?)"
                 r"(?:%[\w.~-]+)?(?![\w:.])", re.IGNORECASE)
# a port alone (Alt-Svc's h3=":22001"), where a value or an item starts
_BARE_PORT = re.compile(r":(?<![^\s\"'=,;<(]:)(?P<port>\d{1,5})(?![\w.:\]])")
_HOST_BEFORE = re.compile(r"[\w.*-]*\Z")      # a name, or a wildcard like *.corp.example
_HOSTNAME = re.compile(_LABEL)
_SCHEME_BEFORE = re.compile(r"(?i)(?:^|[^\w+.-])([a-z][a-z0-9+.-]{0,30}):$")
_COOKIE_DOMAIN = re.compile(r"(?i)(;\s*domain\s*=\s*)\.?([^;\s]+)")
_BARE_HOST = re.compile(r"(?i)(?P<host>\[[^\]/]*\]|[^\s/\\?#:@\[\]]+)(?::(?P<port>\d{1,5}))?(?=[/?#]|$)")
_CSP_SOURCE = re.compile(r"(?i)(?:(?P<scheme>[a-z][a-z0-9+.-]*)://)?(?P<host>\[[^\]]*\]|\*|(?:\*\.)?[^/:\[\]]+)"
                         r"(?::(?P<port>\d{1,5}|\*))?(?P<path>/.*)?")
_ALT_AUTHORITY = re.compile(r"\s*([!#$%&'*+.^_`|~\w-]+)\s*=\s*\"(?P<host>\[[^\]]*\]|[^\":]*):(?P<port>\d{1,5})\"")
_QUOTED = re.compile(r'"([^"]*)"')
_QUOTED_SPACE = re.compile(r" {2,}")
_SPLIT = re.compile(r"\"(?:[^\"\\]|\\.)*\"?|<[^>]*>?|[^,\"<]+|,")


@dataclass(frozen=True, slots=True)
class Public:
    """The address the client used: every rewrite points here, and it is never a leak."""
    base: str                  # scheme://authority
    scheme: str
    host: str                  # lower case, no port or brackets
    port: int | None           # None: not known, any port of `host` is the edge's
    ip: IPAddress | None

    @property
    def authority(self) -> str:
        return self.base.split("://", 1)[1]

    def prefix(self, scheme: str) -> str:
        """The public base for a URL that had `scheme` (ws stays ws, http stays http, each
        upgraded when the client came over TLS)."""
        if scheme in ("ws", "wss"):
            return ("wss" if self.scheme == "https" else "ws") + "://" + self.authority
        return self.base


@lru_cache(maxsize=1024)
def public_address(base: str | None, host: str) -> Public:
    """`Public` from the public base URL (or just the host, port unknown)."""
    host = host.lower().strip("[]")
    if not base:
        return Public(f"http://{host}", "http", host, None, parse_host_ip(host))
    scheme, _, authority = base.partition("://")
    port = None
    if authority.rsplit(":", 1)[-1].isdigit() and not authority.endswith("]"):
        port = int(authority.rsplit(":", 1)[1])
    return Public(base, scheme.lower(), host, port or WEB_SCHEMES.get(scheme.lower()), parse_host_ip(host))


def split_items(value: str) -> list[str]:
    """A comma-separated list split where commas are outside quotes and <...>."""
    items, current = [], []
    for token in _SPLIT.findall(value):
        if token == ",":
            items.append("".join(current))
            current = []
        else:
            current.append(token)
    items.append("".join(current))
    return items


class OriginMask:
    def __init__(self, origins: Iterable[tuple[str, int]], internal_domains: Sequence[str] = (),
                 internal_networks: Sequence = ()):
        self.addrs = {(h.lower(), p) for h, p in origins}
        self.ports = frozenset(p for _, p in self.addrs) - {80, 443}
        self.ip_addrs = {(ip, p) for h, p in self.addrs if (ip := parse_ip(h))}
        self.ips = {ip for ip, _ in self.ip_addrs}
        self.names = {h for h, _ in self.addrs if parse_ip(h) is None}
        self.networks = tuple(ipaddress.ip_network(n) for n in internal_networks)
        self._kinds: dict[tuple, str | None] = {}
        domains = {d.lower().strip(".") for d in (*DEFAULT_INTERNAL_DOMAINS, *internal_domains)} - {""}
        self.domains = tuple(sorted(domains, key=len, reverse=True))
        # names under an internal domain (and wildcards: *.internal), found by their suffix; the
        # host is the run of name characters before it
        self.suffixes = re.compile(r"\.(?<=[\w*-]\.)(?P<suffix>" + "|".join(re.escape(d) for d in self.domains) +
                                   r")\.?(?::(?P<port>\d{1,5}))?(?![\w-]|\.[\w-])", re.IGNORECASE)
        # names found whole: the origins' names, internal domains that are names themselves
        # (localhost, a user's internal.example; a top-level `private` alone is a word), AWS's
        # ip-10-1-2-3; `literals` are what a value must contain for this scanner to run
        alone = [d for d in self.domains if "." in d or d == "localhost"]
        whole = [re.escape(n) for n in sorted(self.names | set(alone), key=len, reverse=True)]
        self.literals = re.compile("|".join(re.escape(n) for n in (*self.names, *alone, "ip-")))
        self.whole = re.compile(r"(?<![\w./-])(?P<name>" + "|".join([*whole, r"ip(?:-\d{1,3}){4}"]) +
                                rf")(?:\.{_LABEL})*\.?(?::(?P<port>\d{{1,5}}))?(?![\w-]|\.[\w-])", re.IGNORECASE)

    # -- decisions on one address ---------------------------------------------------------------

    def _ip_kind(self, ip: IPAddress, port: int | None) -> str | None:
        for view in (ip, embedded_ipv4(ip)):
            if view is None:
                continue
            if (view, port) in self.ip_addrs or (port is None and view in self.ips):
                return ORIGIN
            if view in self.ips:
                return INTERNAL         # the origin's machine on another port
        return INTERNAL if is_internal(ip, self.networks) else None

    def _internal_name(self, host: str) -> bool:
        return any(host == d or host.endswith("." + d) for d in self.domains)

    def host_kind(self, host: str, port: int | None, public: Public, in_url: bool = False) -> str | None:
        """`_host_kind`, remembered: the same few hosts (a CDN in every CSP, the site's own
        links in a page) come back in every response."""
        key = (host, port, public.base, public.host, in_url)
        kind = self._kinds.get(key, _UNKNOWN)
        if kind is _UNKNOWN:
            if len(self._kinds) >= 4096:
                self._kinds.clear()
            kind = self._kinds[key] = self._host_kind(host, port, public, in_url)
        return kind

    def _host_kind(self, host: str, port: int | None, public: Public, in_url: bool) -> str | None:
        """ORIGIN if (host, port) is an origin, INTERNAL if it is another internal name or
        address, None if it may be shown (public, or the edge's own address). `in_url`: the
        host of a URL, where a browser reads any IPv4 spelling and a dotless name can only be
        an internal one (ICANN allows no dotless public names)."""
        host = host.lower().strip("[]").rstrip(".")
        if not host:
            return None
        ip = parse_host_ip(host) if in_url else parse_ip(host)
        if port is not None and ((host, port) in self.addrs or ip is not None and self._ip_kind(ip, port) == ORIGIN):
            return ORIGIN
        # the address the client used; without a port it cannot be told from an origin there
        if (host == public.host or ip is not None and ip == public.ip) and (
                public.port is None or port is None or port == public.port):
            return None
        if ip is not None:
            return self._ip_kind(ip, port)
        if port is None and host in self.names:
            return ORIGIN
        if host in self.names or self._internal_name(host):
            return INTERNAL
        if host.startswith("ip-") and (ip := parse_ip(host.split(".", 1)[0][3:].replace("-", "."))):
            return self._ip_kind(ip, None) and INTERNAL      # AWS: ip-10-1-2-3.ec2.internal
        return INTERNAL if in_url and "." not in host and _HOSTNAME.fullmatch(host) else None

    def _url_kind(self, m: re.Match, public: Public) -> str | None:
        port = int(m["uport"]) if m["uport"] else WEB_SCHEMES.get(_scheme(m)[0] or public.scheme)
        return self.host_kind(unquote(m["uhost"]), port, public, in_url=True)

    def _findings(self, value: str, public: Public) -> Iterator[tuple[int, int, str]]:
        """(start, end, "url" | "host" | "port") of every token in the value naming an origin or an internal
        address other than the edge's own."""
        if "//" in value or "\\" in value:
            for m in _URLS.finditer(value):
                if self._url_kind(m, public):
                    yield m.start(), m.end(), "url"
        if "." in value:
            for m in _V4.finditer(value):
                port = int(m["port"]) if m["port"] else None
                kinds = {self.host_kind(str(ip), port, public) for ip in _dotted_readings(m["v4"])}
                if kinds - {None}:
                    yield m.start(), m.end(), "host"
            for m in self.suffixes.finditer(value):
                start = _HOST_BEFORE.search(value, max(0, m.start() - 254), m.start()).start()   # names are short
                if start < m.start() and (start == 0 or value[start - 1] != "/"):   # not a path's file.local
                    host = value[start:m.end("suffix")].strip(".-")
                    if self.host_kind(host, int(m["port"]) if m["port"] else None, public):
                        yield start, m.end(), "host"
        if ":" in value:
            scanners = [_BARE_PORT]
            if "[" in value:
                scanners.append(_V6_BRACKETED)
            if "::" in value or value.count(":") >= 7:
                scanners.append(_V6)
            for scanner in scanners:
                for m in scanner.finditer(value):
                    if scanner is _BARE_PORT:
                        port = int(m["port"])
                        if port in self.ports and port != public.port:
                            yield m.start(), m.end(), "port"
                    elif parse_ip(m["v6"]) is not None:      # not a time of day or another colon list
                        port = m.groupdict().get("port")
                        if self.host_kind(m["v6"], int(port) if port else None, public):
                            yield m.start(), m.end(), "host"
        if self.literals.search(value.lower()):
            for m in self.whole.finditer(value):
                host = m[0][:len(m[0]) - len(m["port"]) - 1] if m["port"] else m[0]
                if self.host_kind(host, int(m["port"]) if m["port"] else None, public):
                    yield m.start(), m.end(), "host"

    # -- whole header values ----------------------------------------------------------------------

    def leaks(self, value: str, public: Public | str) -> bool:
        """True if the value names an origin or an internal address other than the edge's own."""
        if isinstance(public, str):
            public = public_address(None, public)
        return next(self._findings(value, public), None) is not None

    def rewrite_urls(self, value: str, public: Public) -> str:
        """Every web URL in the value pointing at an origin or an internal address moved to the
        public base (a protocol-relative one too; other schemes are left, and so leak)."""
        out, done = [], 0
        for m in _URLS.finditer(value):
            scheme, start = _scheme(m)
            if (scheme and scheme not in WEB_SCHEMES) or self._url_kind(m, public) is None:
                continue
            out += (value[done:start], public.prefix(scheme))
            done = m.end()
        return "".join(out) + value[done:] if out else value

    def rewrite_target(self, value: str, public: Public) -> str:
        """A Location-like URI reference: an absolute or protocol-relative URL, or a bare
        `host[:port]/path` naming an origin or an internal address, moved to the public base;
        URLs inside its query too."""
        url = value.strip()
        m = _URLS.search(url)
        scheme, start = _scheme(m) if m is not None else ("", -1)
        if start == 0:
            if (not scheme or scheme in WEB_SCHEMES) and self._url_kind(m, public):
                url = public.prefix(scheme) + (url[m.end():] or "/")
        elif (b := _BARE_HOST.match(url)) and self._bare_host_leaks(b, public):
            url = public.base + (url[b.end():] or "/")
        return self.rewrite_urls(url, public)

    def _bare_host_leaks(self, b: re.Match, public: Public) -> bool:
        """`10.1.2.3/x`, `[fd00::1]:80/x`, `backend.internal:8000`: a host where a relative path
        would start (a plain `next` or `5` stays a relative path)."""
        host = b["host"]
        if not (host.startswith("[") or "." in host or b["port"] or
                host.lower() == "localhost" or host.lower() in self.names):
            return False
        return self.host_kind(host, int(b["port"]) if b["port"] else None, public, in_url=True) is not None

    def rewrite_url(self, url: str, public_base: str, public_host: str) -> str:
        """An absolute URL at an origin (or internal address) moved to the public base URL."""
        return self.rewrite_target(url, public_address(public_base, public_host))

    def _links(self, value: str, public: Public) -> str:
        """Link (RFC 8288): each link-value's target and anchor rewritten; a link-value that
        still names an internal address is dropped, the others kept."""
        items = [self.rewrite_urls(item, public) for item in split_items(value)]
        return ",".join(item for item in items if not self.leaks(item, public)).strip()

    def _cookie(self, value: str, public: Public) -> str:
        def sub(m: re.Match) -> str:
            if self.host_kind(m[2], None, public, in_url=True):
                return m[1] + public.host
            return m[0]
        return _COOKIE_DOMAIN.sub(sub, value)

    def _csp_source(self, source: str, public: Public) -> str | None:
        """One CSP source expression: kept, the public origin for the origin's own address,
        or None (dropped) for any other internal one."""
        m = _CSP_SOURCE.fullmatch(source)
        if m is None or source.startswith("'") or m["host"] == "*":
            return source
        if m["host"].startswith("*."):         # *.internal: names under an internal domain
            return None if self._internal_name(m["host"][2:].lower().rstrip(".")) else source
        scheme = (m["scheme"] or "").lower()
        port = None if m["port"] in (None, "*") else int(m["port"])
        if port is None and scheme:
            port = WEB_SCHEMES.get(scheme)
        kind = self.host_kind(m["host"], port, public, in_url=True)
        if kind == ORIGIN:
            return (public.prefix(scheme) if scheme else public.authority) + (m["path"] or "")
        return None if kind else source

    def _csp(self, value: str, public: Public) -> str:
        """Content-Security-Policy: the source expressions naming an internal address dropped
        (the origin's own one rewritten), report-uri rewritten as a Location; every other
        directive, and so the policy's protection, kept. A fetch directive left with no
        source becomes 'none' (what the dropped, unreachable sources allowed)."""
        policies = []
        for policy in value.split(","):
            directives = []
            for directive in policy.split(";"):
                tokens = directive.split()
                if not tokens:
                    continue
                name, sources = tokens[0].lower(), tokens[1:]
                if name == "report-uri":
                    kept = [self.rewrite_target(s, public) for s in sources]
                elif name.endswith("-src") or name in ("base-uri", "form-action", "frame-ancestors", "navigate-to"):
                    kept = [s for s in (self._csp_source(s, public) for s in sources) if s is not None]
                    kept = list(dict.fromkeys(kept)) or ["'none'"]
                else:
                    kept = sources
                text = " ".join([tokens[0], *kept])
                if name == "report-uri" and not kept:
                    continue
                if (kept is sources or name == "report-uri") and self.leaks(text, public):
                    continue           # (a source list's sources were each judged above)
                directives.append(text)
            if directives:
                policies.append("; ".join(directives))
        return ", ".join(policies)

    def _permissions(self, value: str, public: Public) -> str:
        """Permissions-Policy (a structured dictionary of origin lists): the origin's own
        origin string becomes the public one, another internal one is dropped, as a CSP source."""
        def sub(m: re.Match) -> str:
            kept = self._csp_source(m[1], public)
            return "" if kept is None else f'"{kept}"'
        return _QUOTED_SPACE.sub(" ", _QUOTED.sub(sub, value)).replace("( ", "(").replace(" )", ")")

    def _auth(self, value: str, public: Public) -> str:
        """WWW-Authenticate / Proxy-Authenticate: URL parameters (authorization_uri,
        resource_metadata...) rewritten; an internal host in a realm replaced by the public host."""
        value = self.rewrite_urls(value, public)
        out, done = [], 0
        for start, end, what in sorted(self._findings(value, public)):
            if start >= done and what == "host":
                out += (value[done:start], public.host)
                done = end
        return "".join(out) + value[done:]

    def _alt_svc(self, value: str, public: Public) -> str:
        """Alt-Svc (RFC 7838): alternatives at an origin or internal authority, or at an
        origin's port alone (`h3=":22001"`), dropped; nothing left, the header goes."""
        kept = []
        for item in split_items(value):
            m = _ALT_AUTHORITY.match(item)
            if m is not None:
                port = int(m["port"])
                if m["host"] == "":
                    if port in self.ports and port != public.port:
                        continue
                elif self.host_kind(m["host"], port, public, in_url=True):
                    continue
            if not self.leaks(item, public):
                kept.append(item.strip())
        return ", ".join(kept)

    # -- a whole response head ------------------------------------------------------------------

    def scrub_fields(self, fields: Fields, public_base: str, public_host: str, drop: frozenset[bytes],
                     server: bytes | None, request_origin: str | None = None) -> tuple[Fields, list[str], list[str]]:
        """Response header fields as the client may see them, in one pass: `drop` names
        removed, origin URLs rewritten inside their header, Server replaced by `server` (or
        removed), and any other value naming an origin or internal address removed.
        `request_origin`: the request's Origin, which Access-Control-Allow-Origin may echo.
        Returns (fields, names removed, names rewritten)."""
        public = public_address(public_base, public_host)
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
            if not self.leaks(value, public) or (
                    low == b"access-control-allow-origin" and request_origin and value.strip() == request_origin):
                out.append((name, raw))
                continue
            rewrite = _REWRITERS.get(low)
            new = rewrite(self, value, public) if rewrite is not None else ""
            if not new.strip() or self.leaks(new, public):
                removed.append(name.decode("latin-1"))
                continue
            rewritten.append(name.decode("latin-1"))
            out.append((name, new.encode("utf-8", "surrogateescape")))
        if server is not None:
            out.append((b"Server", server))
        return tuple(out), removed, rewritten

    # -- origin error bodies ------------------------------------------------------------------------

    def body_leaks(self, raw: bytes, content_type: str | None, content_encoding: str | None,
                   public: Public) -> bool:
        """Does an error body name an origin or an internal address? Text types only (a body
        without a type too: browsers sniff it); one that cannot be read within
        MAX_BODY_SCAN bytes (too large, unknown or broken coding) counts as leaking."""
        mime = (content_type or "").split(";", 1)[0].strip().lower()
        if mime and not (mime.startswith("text/") or mime in TEXT_TYPES or mime.endswith(("+json", "+xml"))):
            return False
        text = decoded(raw, content_encoding, MAX_BODY_SCAN)
        if text is None:
            return True
        return self.leaks(text.decode("utf-8", "replace"), public)


MAX_BODY_SCAN = 256 << 10    # an error page is a few KB; a bigger one is a debug dump (~20 ms to scan)
TEXT_TYPES = frozenset({"application/json", "application/xml", "application/javascript",
                        "application/x-javascript", "application/xhtml+xml", "application/x-www-form-urlencoded"})


def decoded(raw: bytes, coding: str | None, limit: int) -> bytes | None:
    """The body with its content coding undone, or None if it does not fit in `limit` bytes
    (a small compressed body can expand a thousandfold) or cannot be decoded."""
    coding = (coding or "identity").strip().lower()
    if len(raw) > limit:
        return None
    try:
        if coding == "identity":
            return raw
        if coding in ("gzip", "x-gzip", "deflate"):
            out = zlib.decompressobj(47).decompress(raw, limit + 1)     # gzip or zlib framing
        elif coding == "br":
            out = brotli.Decompressor().process(raw, output_buffer_limit=limit + 1)
        elif coding == "zstd":
            out = zstd.ZstdDecompressor().decompress(raw, max_length=limit + 1)
        else:
            return None
    except Exception:       # zlib.error, brotli.error, ZstdError: a body we cannot read
        return None
    return out if len(out) <= limit else None


def _scheme(m: re.Match) -> tuple[str, int]:
    """The scheme (lower case, "" for none) before a URL match's `//`, and where the URL starts."""
    start = m.start()
    if start and m.string[start - 1] == ":":
        before = m.string[max(0, start - 33):start]
        if s := _SCHEME_BEFORE.search(before):
            return s[1].lower(), start - len(s[1]) - 1
    return "", start


def _dotted_readings(text: str) -> set:
    """A four-part dotted number as a browser reads it (leading 0 octal, 0x hex) and as a
    zero-padded decimal address: 012.1.2.3 is 10.1.2.3 to one, 12.1.2.3 to the other."""
    readings = set()
    if (ip := parse_host_ip(text)) is not None:
        readings.add(ip)
    parts = text.split(".")
    if all(p.isdigit() and int(p) <= 255 for p in parts):
        readings.add(parse_ip(".".join(str(int(p)) for p in parts)))
    return readings


_REWRITERS = {
    b"location": OriginMask.rewrite_target,
    b"content-location": OriginMask.rewrite_target,
    b"link": OriginMask._links,
    b"refresh": OriginMask.rewrite_urls,
    b"set-cookie": OriginMask._cookie,
    b"content-security-policy": OriginMask._csp,
    b"content-security-policy-report-only": OriginMask._csp,
    b"www-authenticate": OriginMask._auth,
    b"proxy-authenticate": OriginMask._auth,
    b"alt-svc": OriginMask._alt_svc,
    b"permissions-policy": OriginMask._permissions,
    b"report-to": OriginMask.rewrite_urls,
    b"reporting-endpoints": OriginMask.rewrite_urls,
}
