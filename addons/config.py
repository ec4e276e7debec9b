"""The edge's one configuration file: parsed, validated, and every problem named by file:line: key.

Pure (no mitmproxy imports): the CLI, the mitmdump script and the tests share it.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml

DEFAULT_STRIP = (
    "X-Powered-By",
    "X-AspNet-Version",
    "X-AspNetMvc-Version",
    "X-Runtime",
    "X-Backend-Server",
)
DEFAULT_LISTEN = ("127.0.0.1", 8080)
# Request headers that override what the origin takes as the URL, host, scheme, port or method
# (framework and proxy conventions): from a client that is not a trusted proxy they are dropped,
# as the forwarding headers are, because the cache keys on none of them (cache poisoning:
# Kettle's "Practical Web Cache Poisoning" and "Web Cache Entanglement", CPDoS's method override).
DEFAULT_OVERRIDE_HEADERS = (
    # the path: IIS/Symfony/Zend (X-Original-URL, X-Rewrite-URL), nginx auth_request, Traefik
    # forwardAuth, Envoy, and the path prefix of Spring, Flask ProxyFix, Symfony, Laravel
    "X-Original-URL", "X-Rewrite-URL", "X-Original-URI", "X-Forwarded-Uri", "X-Forwarded-Path",
    "X-Forwarded-Prefix", "X-Envoy-Original-Path",
    # the host
    "X-Host", "X-Forwarded-Server", "X-Original-Host", "X-HTTP-Host-Override",
    # the scheme and port: Rack (X-Forwarded-Scheme, -Ssl, X-Url-Scheme), Microsoft (Front-End-Https)
    # (X-Forwarded-Port is a forwarding header: dropped from every client)
    "X-Forwarded-Scheme", "X-Forwarded-Ssl", "X-Forwarded-Protocol", "X-Url-Scheme", "Front-End-Https",
    # the method: Rails/Rack, Symfony, Express method-override, Google APIs; Traefik, nginx
    "X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override", "X-Original-Method",
    "X-Forwarded-Method",
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """A problem in the config, said as `FILE:LINE: key: problem`. One error may carry every
    mistake of a file (`mistakes`, in file order, its str one line each); its fields are then
    the first mistake's."""

    def __init__(self, problem: str, key: str = "", source: str = "<config>", line: int | None = None):
        self.problem, self.key, self.source, self.line = problem, key, source, line
        self.mistakes: list[ConfigError] = [self]
        super().__init__(str(self))

    def __str__(self) -> str:
        if len(self.mistakes) > 1:
            return "\n".join(map(str, self.mistakes))
        where = f"{self.source}:{self.line}" if self.line else self.source
        return f"{where}: {self.key}: {self.problem}" if self.key else f"{where}: {self.problem}"

    @classmethod
    def of(cls, mistakes: list[ConfigError]) -> ConfigError:
        """One error for a file's mistakes, in file order (a mistake without a line first)."""
        ordered = sorted(mistakes, key=lambda m: m.line or 0)
        if len(ordered) == 1:
            return ordered[0]
        first = ordered[0]
        error = cls(first.problem, first.key, first.source, first.line)
        error.mistakes = ordered
        error.args = (str(error),)
        return error


def _part(default: Callable[[], Any]):
    """For a function that reads one part of the file (its first argument the _Reader): a
    mistake in the part is recorded, `default()` stands in for the part, and the rest of the
    file is still read, so that the refusal lists every mistake (see parse_config)."""
    def decorate(read):
        @functools.wraps(read)
        def reading(r: _Reader, *args, **kwargs):
            try:
                return read(r, *args, **kwargs)
            except ConfigError as e:
                r.doc.mistakes.append(e)
                return default()
        return reading
    return decorate


@dataclass(frozen=True)
class Origin:
    url: str
    scheme: str
    host: str
    port: int
    weight: int = 1
    backup: bool = False         # used only when no primary origin of the pool is available

    @property
    def scheme_bytes(self) -> bytes:
        return self.scheme.encode()

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Pool:
    name: str
    origins: tuple[Origin, ...]
    health: HealthCheck | None = None    # active checks; passive marking is always on
    fallback: str | None = None          # pool to use when nothing here is available
    balance: str = "weighted_round_robin"    # | least_conn | hash
    hash_key: str = "client_ip"              # with hash: client_ip | cookie:NAME | header:NAME
    slow_start: float = 0.0              # seconds over which a recovered origin regains its weight
    connect_timeout: float = 5.0         # HAProxy's `timeout connect`; then the next origin is tried
    location: tuple[float, float] | None = None   # (lat, lon): geo steering's `nearest`
    passive: PassiveHealth = field(default_factory=lambda: PassiveHealth())
    read_timeout: float = 60.0           # nginx's proxy_read_timeout: then 504 (or, mid-body, the cut)


@dataclass(frozen=True)
class PassiveHealth:
    """Ejection by client traffic (addons/route/health.py says what counts)."""
    failures: int = 3            # origin failures in a row (refused, timed out, closed before answering)
    cooldown: float = 10.0       # seconds an ejected (or probe-unreachable) origin is left alone
    max_ejected: float = 0.5     # share of a pool that may be ejected at once; a lone origin never is
    consecutive_5xx: int = 0     # opt-in: this many 502/503/504 answers in a row also eject; 0: off


@dataclass(frozen=True)
class HealthCheck:
    path: str = "/health"
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2                # consecutive successes that bring a down origin back
    fall: int = 2                # consecutive failures that take an origin down
    expect: tuple[int, int] = (200, 399)


CONTINENTS = ("AF", "AN", "AS", "EU", "NA", "OC", "SA")


@dataclass(frozen=True)
class GeoConfig:
    database: str | None = None          # a MaxMind .mmdb; None = the embedded GeoLite2 City
    countries: dict[str, str] = field(default_factory=dict)    # ISO code -> pool
    continents: dict[str, str] = field(default_factory=dict)   # continent code -> pool
    nearest: bool = True                 # then pools by distance from the client (needs locations)


@dataclass(frozen=True)
class ScrubConfig:
    server_header: str | None = "edge"
    strip: tuple[str, ...] = DEFAULT_STRIP
    override_headers: tuple[str, ...] = DEFAULT_OVERRIDE_HEADERS    # request: trusted proxies only
    internal_domains: tuple[str, ...] = ()        # added to the built-in reserved ones (.internal, .local...)
    internal_networks: tuple[Network, ...] = ()   # added to RFC 1918, loopback, link-local, ULA, CGNAT
    error_bodies: str = "mask"                    # mask: an origin 5xx body naming an internal address
                                                  #   becomes the edge's page; pass: sent as it is


@dataclass(frozen=True)
class DiskCacheConfig:
    path: str                            # absolute; the edge's user alone may write it
    max_size: int = 10 * 2**30           # bytes of the directory: bodies, heads and the index
    max_object: int = 2**30              # larger responses are not stored on disk


@dataclass(frozen=True)
class CacheConfig:
    enabled: bool = True
    max_size: int = 256 * 2**20          # bytes of stored bodies + headers
    max_object: int = 8 * 2**20          # larger responses pass through unstored
    default_ttl: float | None = None     # None: RFC 9111 heuristic freshness
    purge_from: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
    disk: DiskCacheConfig | None = None  # the disk tier, behind memory


@dataclass(frozen=True)
class CompressConfig:
    enabled: bool = True
    min_size: int = 256                  # smaller bodies gain nothing worth the CPU
    encodings: tuple[str, ...] = ("br", "zstd", "gzip")   # offered, in our order of preference


MODES = ("block", "detect")          # detect: record the verdict in the trace, let the request pass
BOT_CLASSES = ("browser", "search_engine", "scanner", "bad", "unknown",
               # from the crawler-user-agents list's tags (addons/shield/botdata.py)
               "ai_crawler", "seo", "advertising", "social_preview", "feed_reader", "monitoring", "archiver", "academic")
BOT_ACTIONS = ("allow", "challenge", "block", "rate_limit")
# safe for a stranger's traffic: scanners, known-bad scrapers and AI crawlers refused, SEO crawlers
# slowed down, search engines (verified by reverse DNS) and everything else served
DEFAULT_BOT_ACTIONS = (("browser", "allow"), ("search_engine", "allow"), ("scanner", "block"), ("bad", "block"),
                       ("unknown", "allow"), ("ai_crawler", "block"), ("seo", "rate_limit"),
                       ("advertising", "allow"), ("social_preview", "allow"), ("feed_reader", "allow"),
                       ("monitoring", "allow"), ("archiver", "allow"), ("academic", "allow"))
DEFAULT_BOT_BUDGET = 1.0                 # requests per second per client address for a rate_limit class (60/m)
DEFAULT_CRS = "/usr/share/modsecurity-crs"


@dataclass(frozen=True)
class RateLimit:
    rate: float                          # tokens per second
    burst: int
    key: str = "client_ip"               # client_ip | header:NAME | path
    store: str = "memory"                # memory | redis://HOST:PORT/DB
    mode: str = "block"


@dataclass(frozen=True)
class Timeouts:
    request_headers: float = 10.0        # from connect (or the last response) to a complete head
    request_body: float = 30.0           # from the head to the end of the body
    idle: float = 60.0                   # keep-alive: between a response and the next request


@dataclass(frozen=True)
class FrameBudget:
    """A token bucket per HTTP/2 connection for one kind of frame: `burst` at once, then `rate`
    per second."""
    rate: float
    burst: int


@dataclass(frozen=True)
class Http2Limits:
    """What one HTTP/2 connection may do before it is closed with GOAWAY ENHANCE_YOUR_CALM.
    A browser opens at most max_concurrent_streams at once and cancels at most those (a
    navigation away): the reset burst is two such navigations; the others are far above what
    browsers send (one SETTINGS, a few PINGs and PRIORITY frames per connection)."""
    max_concurrent_streams: int = 100        # advertised in SETTINGS: h2's default (nginx: 128)
    resets: FrameBudget = FrameBudget(20, 200)            # RST_STREAM from the client (CVE-2023-44487)
    settings: FrameBudget = FrameBudget(1, 20)            # SETTINGS frames (each costs us an ACK)
    pings: FrameBudget = FrameBudget(2, 20)               # PING frames (each costs us an answer)
    priorities: FrameBudget = FrameBudget(50, 200)        # PRIORITY frames
    empty_frames: FrameBudget = FrameBudget(10, 100)      # DATA frames with no data that do not end a stream
    window_updates: FrameBudget = FrameBudget(500, 1000)  # WINDOW_UPDATE on the connection (stream 0)


@dataclass(frozen=True)
class Limits:
    """Resource limits that apply whether or not there is a `shield:` section (its keys tune
    them): head and body size, slow-client deadlines, HTTP/2 abuse."""
    max_header_bytes: int = 32 * 2**10
    max_body: int = 10 * 2**20
    timeouts: Timeouts = field(default_factory=Timeouts)
    http2: Http2Limits = field(default_factory=Http2Limits)


@dataclass(frozen=True)
class WafConfig:
    engine: str = "modsecurity"
    paranoia: int = 1
    anomaly_threshold: int = 5
    mode: str = "block"
    crs: str = DEFAULT_CRS               # Debian's modsecurity-crs (rules/ below it)
    skip: tuple[str, ...] = ()           # mitmproxy filter expressions, e.g. "~u ^/upload"
    exclusions: str | None = None        # a ModSecurity file of exclusion rules, loaded after the CRS
    on_error: str = "block"              # an engine failure blocks (fail closed) or passes
    body_limit: int = 128 * 2**10        # body bytes inspected (ModSecurity's ProcessPartial); the rest streams


@dataclass(frozen=True)
class BotConfig:
    block: tuple[str, ...] = ("scanner", "bad")
    allow: tuple[str, ...] = ("search_engine",)
    challenge: bool = False              # suspicious clients must return a signed cookie first
    secret_file: str | None = None       # the challenge's signing key (shared by several edges); None: per process
    trap_paths: tuple[str, ...] = ("/wp-login.php", "/xmlrpc.php", "/.env", "/.git/config", "/phpmyadmin")
    mode: str = "block"
    actions: tuple[tuple[str, str], ...] = DEFAULT_BOT_ACTIONS   # every class -> allow|challenge|block|rate_limit
    budgets: tuple[tuple[str, float], ...] = ()       # rate_limit classes: requests/s per client (else DEFAULT_BOT_BUDGET)
    challenge_busy: bool = False         # browsers asking faster than people browse are challenged
    verify: bool = True                  # search engines checked by forward-confirmed reverse DNS
    resolver: str | None = None          # HOST:PORT of the DNS server for that; None: the system's
    verify_timeout: float = 2.0          # how long a first request of an unverified address waits for it

    def action(self, kind: str) -> str:
        return dict(self.actions).get(kind, "allow")

    def budget(self, kind: str) -> float:
        return dict(self.budgets).get(kind, DEFAULT_BOT_BUDGET)


@dataclass(frozen=True)
class ShieldConfig:
    mode: str = "block"
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    deny_countries: tuple[str, ...] = ()
    connections_per_ip: int | None = 64
    rate_limit: RateLimit | None = None
    waf: WafConfig | None = None
    bots: BotConfig | None = None


# --- sites: one edge in front of many hostnames (addons/sites) ---------------------------------

@dataclass(frozen=True)
class HeaderRules:
    """Header edits of one side (request or response), applied in this order: remove, set
    (replaces every field of the name), add (one more field)."""
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)


@dataclass(frozen=True)
class HeaderMatch:
    """A route's condition on a request header: its value exactly, or `~REGEX` searched."""
    name: str                            # lower case
    value: str | None = None
    pattern: re.Pattern | None = None


@dataclass(frozen=True)
class SiteRoute:
    path: str = "/"                      # a prefix of the normalised path
    pool: str | None = None              # None: routing.default_pool (or geo steering)
    strip_prefix: bool = False           # the origin sees the path without `path`
    origin_path: str = ""                # put in front of the path the origin sees ("/blog")
    cache: CacheConfig | None = None     # None: the top-level cache settings
    ignore_query: tuple[str, ...] = ()   # query keys left out of the cache key
    compress: bool | None = None         # None: compress.enabled
    methods: tuple[str, ...] = ()        # empty: every method
    headers: tuple[HeaderMatch, ...] = ()
    index: int = 0                       # its place in the site's list (keys, the trace)
    rate_limit: RateLimit | None = None  # on top of the shield's, for this route (in-process)
    shield: RouteShield | None = None    # None: the shield's parts as configured


SHIELD_PARTS = ("on", "detect", "off")


@dataclass(frozen=True)
class RouteShield:
    """A route's shield profile: each inspecting part as the shield section says (`on`), only
    recorded (`detect`), or not run (`off`) for this route's requests. Lists, rate limits and
    the resource limits always apply: they protect the edge, not the route."""
    waf: str = "on"
    bots: str = "on"


@dataclass(frozen=True)
class Site:
    name: str
    hosts: tuple[str, ...]               # lower case, no trailing dot; "*.x" wildcards
    routes: tuple[SiteRoute, ...] = (SiteRoute(),)
    https_redirect: bool = False         # plain-HTTP requests get 308 to https
    hsts: str | None = None              # the Strict-Transport-Security value on TLS answers
    request_headers: HeaderRules = HeaderRules()
    response_headers: HeaderRules = HeaderRules()


ENCODINGS = ("br", "zstd", "gzip")
BALANCE = ("weighted_round_robin", "least_conn", "hash")


@dataclass(frozen=True)
class Listener:
    """One address the edge accepts clients on; `tls`: clients must speak TLS there (HTTP/1.1
    and HTTP/2 by ALPN), with a certificate chosen by SNI."""
    address: tuple[str, int]
    tls: bool = False


@dataclass(frozen=True)
class CertificateFiles:
    cert: str                            # PEM chain, leaf first
    key: str                             # PEM private key (unencrypted)


@dataclass(frozen=True)
class AcmeConfig:
    """Automatic certificates (HTTP-01 on a plain listener) for the names that no configured
    certificate covers."""
    directory: str                       # the CA's ACME directory URL
    storage: str                         # account key, certificates, locks; absolute
    email: str | None = None             # the account's contact
    ca_bundle: str | None = None         # extra CA trusted for the directory (tests: Pebble's)
    names: tuple[str, ...] = ()          # host names to certify (until sites' hosts feed it)
    renew_before: float = 30 * 86400     # renew this long before expiry (a third of a short lifetime at most)


@dataclass(frozen=True)
class ClusterConfig:
    """`cluster:` many machines as one edge (addons/cluster): this node's name, the Redis they
    share, where peers reach this node, how long a membership lives without a heartbeat, the
    tiered cache, and static members for clusters without Redis."""
    node: str                                    # this node's name (default: the host name)
    redis: str | None = None                     # shared state and membership
    advertise: tuple[str, int] | None = None     # where peers reach this node's client listener
    ttl: float = 10.0                            # membership lifetime; heartbeat every ttl/3
    secret_file: str | None = None               # the peer-request signing key
    tiered: bool = False                         # shard cache misses over the live nodes
    peers: dict[str, tuple[str, int]] = field(default_factory=dict)   # static members: name -> host:port


@dataclass(frozen=True)
class EdgeConfig:
    pools: dict[str, Pool]
    default_pool: str
    geo: GeoConfig | None = None
    listen: tuple[str, int] = DEFAULT_LISTEN
    trusted_proxies: tuple[Network, ...] = ()
    scrub: ScrubConfig = field(default_factory=ScrubConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    access_log: str | None = None
    shield: ShieldConfig | None = None
    limits: Limits = field(default_factory=Limits)     # always on; tuned by the shield section
    admin: tuple[str, int] | None = None   # status endpoint (HAProxy's stats socket); off by default
    buffer_limit: int = 2**20           # bodies above it (or of unknown length) are streamed, not held
    sites: dict[str, Site] = field(default_factory=dict)   # empty: one site matching every host
    default_site: str | None = None      # the site of an unknown Host; None: 421
    source: str = "<config>"
    listeners: tuple[Listener, ...] = ()     # from a `listen:` list; empty: one plain listener on `listen`
    certificates: tuple[CertificateFiles, ...] = ()
    acme: AcmeConfig | None = None
    access_log_format: str = "json"         # json lines, or combined (Apache/nginx, with the request id)
    admin_token_file: str | None = None   # the admin write side's token; None: generated under the confdir
    shutdown_timeout: float = 30.0        # SIGTERM/SIGINT: how long in-flight requests may take to finish
    reload_watch: bool = False            # reload when the config file changes (polled every second)
    cluster: ClusterConfig | None = None  # many machines as one edge; None: this node alone
    workers: int = 1                      # processes sharing the listeners (SO_REUSEPORT); 1: no supervisor

    @property
    def origins(self) -> list[Origin]:
        return [o for p in self.pools.values() for o in p.origins]

    @property
    def default_origin(self) -> Origin:
        return self.pools[self.default_pool].origins[0]

    @property
    def all_listeners(self) -> tuple[Listener, ...]:
        return self.listeners or (Listener(self.listen),)

    def acme_names(self) -> tuple[str, ...]:
        """The host names ACME should hold certificates for: `acme.names` and every site's
        exact host names (wildcards and IP addresses cannot be validated over HTTP-01); names a
        configured certificate covers are left out by the ACME manager."""
        if self.acme is None:
            return ()
        hosts = (h for site in self.sites.values() for h in site.hosts
                 if not h.startswith("*.") and not _is_ip_address(h))
        return tuple(dict.fromkeys((*self.acme.names, *hosts)))

    @property
    def https_port(self) -> int:
        """The port https redirects name: the first TLS listener's, else 443."""
        return next((listener.address[1] for listener in self.all_listeners if listener.tls), 443)


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


# --- parsing helpers (each raises ValueError with a message for the user) -----------------------

def parse_origin_url(url: str, weight: int = 1) -> Origin:
    if not isinstance(url, str):
        raise ValueError("expected a URL like http://host:port")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{url!r}: scheme must be http or https")
    if not parts.hostname:
        raise ValueError(f"{url!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"{url!r}: an origin is scheme://host[:port] with no path, query or user")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"{url!r}: bad port") from None
    host = parts.hostname
    return Origin(url=f"{parts.scheme}://{_bracket(host)}:{port}", scheme=parts.scheme,
                  host=host, port=port, weight=weight)


def parse_hostport(value: Any) -> tuple[str, int]:
    """`HOST:PORT`, `[::1]:PORT` or a bare port (loopback)."""
    text = str(value).strip()
    if text.isdigit():
        host, port_text = "127.0.0.1", text
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r}: expected HOST:PORT")
        host = host.strip("[]")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port must be a number from 0 to 65535")
    return host, int(port_text)


def parse_network(value: Any) -> Network:
    try:
        return ipaddress.ip_network(str(value).strip(), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or CIDR") from None


_SIZE_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
               "G": 2**30, "GB": 2**30, "GIB": 2**30}
_DURATION_UNITS = {"": 1, "ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(value: Any) -> int:
    """Bytes from `1048576`, `512KB`, `8MB`, `1GB` (binary multiples)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    if not m or m[2].upper() not in _SIZE_UNITS or isinstance(value, bool):
        raise ValueError(f"{value!r}: expected a size like 512KB, 8MB or 1GB")
    return int(float(m[1]) * _SIZE_UNITS[m[2].upper()])


@_part(lambda: WafConfig.body_limit)
def _waf_body_limit(r, w, wpath) -> int:
    """shield.waf.body_limit: how much of a request body the WAF reads (the rest streams)."""
    if "body_limit" not in w:
        return WafConfig.body_limit
    limit = r.convert(parse_size, w["body_limit"], wpath + ("body_limit",))
    if limit < 1:
        raise r.doc.error(wpath + ("body_limit",), "expected a size above 0, like 128KB")
    return limit


def parse_duration(value: Any) -> float:
    """Seconds from `30`, `500ms`, `10s`, `5m`, `1h`, `1d`."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|)\s*", str(value))
    if not m or isinstance(value, bool):
        raise ValueError(f"{value!r}: expected a duration like 500ms, 10s, 5m or 1h")
    return float(m[1]) * _DURATION_UNITS[m[2]]


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# --- YAML with line numbers -------------------------------------------------------------------

class _Doc:
    """Plain values built from YAML nodes, remembering the line of every key path."""

    def __init__(self, text: str, source: str):
        self.source = source
        self.lines: dict[tuple, int] = {}
        self.mistakes: list[ConfigError] = []      # those the reading went on after
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise ConfigError(f"not valid YAML: {getattr(e, 'problem', e)}", source=source,
                              line=mark.line + 1 if mark else None) from None
        self._constructor = yaml.constructor.SafeConstructor()
        self.value = self._build(node, ()) if node is not None else {}

    def _build(self, node: yaml.Node, path: tuple) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict = {}
            for knode, vnode in node.value:
                key = self._constructor.construct_object(knode)
                if key in out:          # the first one is read
                    self.mistakes.append(ConfigError("duplicate key", self.dotted(path + (key,)), self.source,
                                                     knode.start_mark.line + 1))
                    continue
                self.lines[path + (key,)] = knode.start_mark.line + 1
                out[key] = self._build(vnode, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._build(item, path + (i,)) for i, item in enumerate(node.value)]
        return self._constructor.construct_object(node)

    @staticmethod
    def dotted(path: tuple) -> str:
        out = ""
        for p in path:
            out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
        return out

    def error(self, path: tuple, problem: str) -> ConfigError:
        line = next((self.lines[path[:n]] for n in range(len(path), -1, -1) if path[:n] in self.lines), None)
        error = ConfigError(problem, self.dotted(path), self.source, line)
        error.path = path           # the part parse_config sets aside to read on
        return error


def _keys(value: Any) -> set:
    """The keys of a mapping (whatever they are), for a table of names; none if it is not one
    (the _Reader then says it should be)."""
    return set(value) if isinstance(value, dict) else set()


class _Reader:
    """Typed access to a _Doc: every bad value becomes a ConfigError at its line."""

    def __init__(self, doc: _Doc):
        self.doc = doc

    def mapping(self, value: Any, path: tuple, allowed: set[str]) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.doc.error(path, "expected a mapping")
        unknown = [key for key in value if key not in allowed]
        for key in unknown:         # recorded; the known keys are read on
            self.doc.mistakes.append(self.doc.error(path + (key,), f"unknown key (known: {', '.join(sorted(allowed))})"))
        return {k: v for k, v in value.items() if k in allowed} if unknown else value

    def listing(self, value: Any, path: tuple) -> list:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.doc.error(path, "expected a list")
        return value

    def convert(self, fn, value: Any, path: tuple):
        try:
            return fn(value)
        except ValueError as e:
            raise self.doc.error(path, str(e)) from None


def parse_status_range(value: Any) -> tuple[int, int]:
    """`200`, or `200-399`."""
    m = re.fullmatch(r"\s*([1-5]\d\d)\s*(?:-\s*([1-5]\d\d)\s*)?", str(value))
    if not m or (m[2] and int(m[2]) < int(m[1])):
        raise ValueError(f"{value!r}: expected a status or a range like 200-399")
    return int(m[1]), int(m[2] or m[1])


def _whole(r: _Reader, raw: dict, key: str, path: tuple, default: int, top: int) -> int:
    """raw[key] (or `default`) as a whole number from 1 to `top`."""
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= top:
        raise r.doc.error(path + (key,), f"expected a whole number from 1 to {top}")
    return value


@_part(lambda: None)
def _health(r: _Reader, raw: Any, path: tuple) -> HealthCheck:
    raw = r.mapping(raw, path, {"path", "interval", "timeout", "rise", "fall", "expect"})
    default = HealthCheck()
    check_path = raw.get("path", default.path)
    if not isinstance(check_path, str) or not check_path.startswith("/"):
        raise r.doc.error(path + ("path",), "expected a path starting with /")
    interval = r.convert(parse_duration, raw["interval"], path + ("interval",)) if "interval" in raw else default.interval
    timeout = r.convert(parse_duration, raw["timeout"], path + ("timeout",)) if "timeout" in raw else default.timeout
    if not 0 < timeout <= interval:
        raise r.doc.error(path + ("timeout",), "must be more than 0 and at most the interval")
    rise = _whole(r, raw, "rise", path, default.rise, 100)
    fall = _whole(r, raw, "fall", path, default.fall, 100)
    expect = r.convert(parse_status_range, raw["expect"], path + ("expect",)) if "expect" in raw else default.expect
    return HealthCheck(check_path, interval, timeout, rise, fall, expect)


def parse_percent(value: Any) -> float:
    """A share from `50%` (0% to 100%)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", str(value))
    if not m or isinstance(value, bool) or float(m[1]) > 100:
        raise ValueError(f"{value!r}: expected a percentage from 0% to 100%, like 50%")
    return float(m[1]) / 100


@_part(PassiveHealth)
def _passive(r: _Reader, raw: Any, path: tuple) -> PassiveHealth:
    raw = r.mapping(raw, path, {"failures", "cooldown", "max_ejected", "consecutive_5xx"})
    default = PassiveHealth()
    failures = _whole(r, raw, "failures", path, default.failures, 100)
    cooldown = r.convert(parse_duration, raw["cooldown"], path + ("cooldown",)) if "cooldown" in raw else default.cooldown
    if not 0 < cooldown <= 3600:
        raise r.doc.error(path + ("cooldown",), "must be more than 0 and at most 1h")
    share = r.convert(parse_percent, raw["max_ejected"], path + ("max_ejected",)) if "max_ejected" in raw \
        else default.max_ejected
    errors_5xx = raw.get("consecutive_5xx", default.consecutive_5xx)
    if not isinstance(errors_5xx, int) or isinstance(errors_5xx, bool) or not 0 <= errors_5xx <= 1000:
        raise r.doc.error(path + ("consecutive_5xx",), "expected a whole number from 0 (off) to 1000")
    return PassiveHealth(failures, cooldown, share, errors_5xx)


@_part(lambda: None)
def _location(r: _Reader, raw: Any, path: tuple) -> tuple[float, float]:
    raw = r.mapping(raw, path, {"lat", "lon"})
    out = []
    for key, limit in (("lat", 90), ("lon", 180)):
        value = raw.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not -limit <= value <= limit:
            raise r.doc.error(path + (key,), f"expected degrees from -{limit} to {limit}")
        out.append(float(value))
    return out[0], out[1]


@_part(GeoConfig)
def _geo(r: _Reader, raw: Any, path: tuple, pools: dict[str, Pool], source: str) -> GeoConfig:
    raw = r.mapping(raw, path, {"database", "countries", "continents", "nearest"})
    database = raw.get("database")
    if database is not None:
        if not isinstance(database, str) or not database:
            raise r.doc.error(path + ("database",), "expected the path of a .mmdb file, or null for the embedded one")
        if not os.path.isabs(database) and not source.startswith(("<", "--")):   # relative to the file
            database = os.path.join(os.path.dirname(os.path.abspath(source)), database)
        if not os.access(database, os.R_OK):
            raise r.doc.error(path + ("database",), f"{database}: cannot read the file")
    rules = {}
    for key, pattern, what in (("countries", r"[A-Z]{2}", "an ISO country code like US"),
                               ("continents", "|".join(CONTINENTS), f"one of {' '.join(CONTINENTS)}")):
        table = r.mapping(raw.get(key), path + (key,), _keys(raw.get(key)))
        for code, pool in table.items():
            if isinstance(code, bool):          # YAML 1.1 reads NO (Norway), ON, Y... as booleans
                raise r.doc.error(path + (key, code), 'a YAML boolean: quote country codes like "NO"')
            if not isinstance(code, str) or not re.fullmatch(pattern, code):
                raise r.doc.error(path + (key, code), f"expected {what}")
            if pool not in pools:
                raise r.doc.error(path + (key, code), f"no pool named {pool!r}")
        rules[key] = dict(table)
    nearest = raw.get("nearest", True)
    if not isinstance(nearest, bool):
        raise r.doc.error(path + ("nearest",), "expected true or false")
    if nearest and "nearest" in raw and not any(p.location for p in pools.values()):
        raise r.doc.error(path + ("nearest",), "needs pools with a location: {lat, lon}")
    return GeoConfig(database, rules["countries"], rules["continents"], nearest)


def parse_rate(value: Any) -> float:
    """Requests per second from `20/s`, `600/m`, `1000/h`."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*", str(value))
    if not m or float(m[1]) <= 0:
        raise ValueError(f"{value!r}: expected a rate like 20/s, 600/m or 1000/h")
    return float(m[1]) / {"s": 1, "m": 60, "h": 3600}[m[2]]


def _mode(r: _Reader, raw: dict, path: tuple, default: str) -> str:
    mode = raw.get("mode", default)
    if mode not in MODES:
        raise r.doc.error(path + ("mode",), "expected block or detect")
    return mode


def _shield(r: _Reader, raw: Any, path: tuple, geo: GeoConfig | None) -> ShieldConfig:
    raw = r.mapping(raw, path, {"mode", "allow", "deny", "deny_countries", "connections_per_ip", "rate_limit",
                                "timeouts", "max_header_bytes", "max_body", "http2", "waf", "bots"})
    mode = _mode(r, raw, path, "block")
    nets = {key: tuple(r.convert(parse_network, v, path + (key, i))
                       for i, v in enumerate(r.listing(raw.get(key), path + (key,)))) for key in ("allow", "deny")}
    countries = tuple(r.listing(raw.get("deny_countries"), path + ("deny_countries",)))
    for i, code in enumerate(countries):
        if not isinstance(code, str) or not re.fullmatch(r"[A-Z]{2}", code):
            raise r.doc.error(path + ("deny_countries", i), 'expected an ISO country code like "CN" (quote "NO")')
    connections = (_whole(r, raw, "connections_per_ip", path, ShieldConfig.connections_per_ip, 100000)
                   if raw.get("connections_per_ip", ShieldConfig.connections_per_ip) is not None else None)
    rate_limit = None
    if raw.get("rate_limit") is not None:
        rpath = path + ("rate_limit",)
        rl = r.mapping(raw["rate_limit"], rpath, {"rate", "burst", "key", "store", "mode"})
        if "rate" not in rl:
            raise r.doc.error(rpath, "rate_limit needs a rate like 20/s")
        rate = r.convert(parse_rate, rl["rate"], rpath + ("rate",))
        burst = _whole(r, rl, "burst", rpath, max(1, round(rate)), 10**6)
        key = rl.get("key", "client_ip")
        if not isinstance(key, str) or not re.fullmatch(r"client_ip|path|header:[!#$%&'*+.^_`|~\w-]+", key):
            raise r.doc.error(rpath + ("key",), "expected client_ip, path or header:NAME")
        store = rl.get("store", "memory")
        if not isinstance(store, str) or not (store == "memory" or re.fullmatch(r"rediss?://[^\s]+", store)):
            raise r.doc.error(rpath + ("store",), "expected memory or a redis://HOST:PORT/DB URL")
        rate_limit = RateLimit(rate, burst, key, store, _mode(r, rl, rpath, mode))
    waf = None
    if raw.get("waf") is not None:
        wpath = path + ("waf",)
        w = r.mapping(raw["waf"], wpath, {"engine", "paranoia", "anomaly_threshold", "mode", "crs", "skip",
                                          "exclusions", "on_error", "body_limit"})
        if w.get("engine", "modsecurity") != "modsecurity":
            raise r.doc.error(wpath + ("engine",), "the engine is modsecurity (ModSecurity v3 with the OWASP CRS)")
        paranoia = _whole(r, w, "paranoia", wpath, 1, 4)
        threshold = _whole(r, w, "anomaly_threshold", wpath, 5, 1000)
        crs = w.get("crs", DEFAULT_CRS)
        if not isinstance(crs, str) or not os.path.isdir(os.path.join(crs, "rules")):
            raise r.doc.error(wpath + ("crs",), f"{crs}: no rules/ folder here (Debian: apt-get install modsecurity-crs)")
        skip = tuple(r.listing(w.get("skip"), wpath + ("skip",)))
        for i, expr in enumerate(skip):
            if not isinstance(expr, str) or not expr.strip():
                raise r.doc.error(wpath + ("skip", i), "expected a mitmproxy filter expression like '~u ^/upload'")
        exclusions = w.get("exclusions")
        if exclusions is not None and (not isinstance(exclusions, str) or not os.access(exclusions, os.R_OK)):
            raise r.doc.error(wpath + ("exclusions",), f"{exclusions}: cannot read the file")
        on_error = w.get("on_error", "block")
        if on_error not in ("block", "pass"):
            raise r.doc.error(wpath + ("on_error",), "expected block (fail closed) or pass")
        body_limit = _waf_body_limit(r, w, wpath)
        waf = WafConfig("modsecurity", paranoia, threshold, _mode(r, w, wpath, mode), crs, skip, exclusions, on_error,
                        body_limit)
    bots = None
    if raw.get("bots") is not None:
        bpath = path + ("bots",)
        b = r.mapping(raw["bots"], bpath, {"block", "allow", "challenge", "trap_paths", "mode", "secret_file",
                                           "actions", "budgets", "verify", "resolver", "verify_timeout"})
        lists = {}
        for key in ("block", "allow"):
            lists[key] = tuple(r.listing(b[key], bpath + (key,))) if key in b else getattr(BotConfig, key)
            for i, name in enumerate(lists[key]):
                if name not in BOT_CLASSES:
                    raise r.doc.error(bpath + (key, i), f"expected one of {', '.join(BOT_CLASSES)}")
        challenge = b.get("challenge", False)
        if not isinstance(challenge, bool):
            raise r.doc.error(bpath + ("challenge",), "expected true or false")
        traps = tuple(r.listing(b["trap_paths"], bpath + ("trap_paths",))) if "trap_paths" in b else BotConfig.trap_paths
        for i, trap in enumerate(traps):
            if not isinstance(trap, str) or not trap.startswith("/"):
                raise r.doc.error(bpath + ("trap_paths", i), "expected a path starting with /")
        secret_file = b.get("secret_file")
        if secret_file is not None:
            try:
                with open(secret_file, "rb") as f:
                    if len(f.read().strip()) < 16:
                        raise r.doc.error(bpath + ("secret_file",), f"{secret_file}: fewer than 16 bytes of key")
            except OSError as e:
                raise r.doc.error(bpath + ("secret_file",), f"{secret_file}: cannot read: {e.strerror}") from None
        bots = dataclasses.replace(BotConfig(lists["block"], lists["allow"], challenge, secret_file, traps,
                                             _mode(r, b, bpath, mode)), **_bot_table(r, b, bpath, lists))
    if countries and geo is None:
        raise r.doc.error(path + ("deny_countries",), "needs routing.geo (its database locates clients)")
    return ShieldConfig(mode, nets["allow"], nets["deny"], countries, connections, rate_limit, waf, bots)


def _bot_table(r: _Reader, b: dict, path: tuple, lists: dict) -> dict:
    """shield.bots: the action table (defaults, then the `block:`/`allow:`/`challenge:` keys,
    then `actions:`; two keys that say different things about a class are an error), the
    rate_limit budgets and the reverse DNS check."""
    table, said = dict(DEFAULT_BOT_ACTIONS), {}
    if "block" in b:        # as before: a class of the first five not listed is not blocked
        table.update({kind: "allow" for kind in BOT_CLASSES[:5] if table[kind] == "block"})
    for key, action in (("block", "block"), ("allow", "allow")):
        for i, kind in enumerate(lists[key] if key in b else ()):
            if said.get(kind, (action,))[0] != action:
                raise r.doc.error(path + (key, i), f"{kind} is in {said[kind][1]} too")
            said[kind] = (action, key)
    actions = r.mapping(b.get("actions"), path + ("actions",), set(BOT_CLASSES))
    for kind, action in actions.items():
        if action not in BOT_ACTIONS:
            raise r.doc.error(path + ("actions", kind), f"expected one of {', '.join(BOT_ACTIONS)}")
        if said.get(kind, (action,))[0] != action:
            raise r.doc.error(path + ("actions", kind), f"{action} here, but {said[kind][1]}: says {said[kind][0]}")
        said[kind] = (action, "actions")
    if b.get("challenge", False) and "unknown" not in said:
        said["unknown"] = ("challenge", "challenge")
    table.update({kind: action for kind, (action, _) in said.items()})
    budgets = r.mapping(b.get("budgets"), path + ("budgets",), set(BOT_CLASSES))
    for kind in budgets:
        if table[kind] != "rate_limit":
            raise r.doc.error(path + ("budgets", kind), f"{kind} is not rate limited (actions: {{{kind}: rate_limit}})")
    verify = b.get("verify", True)
    if not isinstance(verify, bool):
        raise r.doc.error(path + ("verify",), "expected true or false")
    resolver = b.get("resolver")
    if resolver is not None:
        from addons.shield.verify import parse_resolver
        r.convert(parse_resolver, str(resolver), path + ("resolver",))
        resolver = str(resolver)
    timeout = r.convert(parse_duration, b.get("verify_timeout", BotConfig.verify_timeout), path + ("verify_timeout",))
    if not 0 < timeout <= 30:
        raise r.doc.error(path + ("verify_timeout",), "expected a duration from 1ms to 30s")
    return {"actions": tuple((kind, table[kind]) for kind in BOT_CLASSES),
            "budgets": tuple((kind, r.convert(parse_rate, v, path + ("budgets", kind))) for kind, v in budgets.items()),
            "challenge_busy": bool(b.get("challenge", False)) and said.get("browser", ("",))[0] != "allow",
            "verify": verify, "resolver": resolver, "verify_timeout": timeout}


@_part(Limits)
def _limits(r: _Reader, raw: Any, path: tuple) -> Limits:
    """The resource limits from the shield section's keys (the section is checked by _shield)."""
    raw = raw if isinstance(raw, dict) else {}
    timeouts = Timeouts()
    if raw.get("timeouts") is not None:
        tpath = path + ("timeouts",)
        t = r.mapping(raw["timeouts"], tpath, {"request_headers", "request_body", "idle"})
        values = {k: r.convert(parse_duration, t[k], tpath + (k,)) if k in t else getattr(timeouts, k)
                  for k in ("request_headers", "request_body", "idle")}
        for k, v in values.items():
            if v <= 0:
                raise r.doc.error(tpath + (k,), "must be more than 0")
        timeouts = Timeouts(**values)
    sizes = {k: r.convert(parse_size, raw[k], path + (k,)) if k in raw else getattr(Limits, k)
             for k in ("max_header_bytes", "max_body")}
    if sizes["max_header_bytes"] < 1024:
        raise r.doc.error(path + ("max_header_bytes",), "at least 1KB (browsers send a few KB of headers)")
    http2 = Http2Limits()
    if raw.get("http2") is not None:
        hpath = path + ("http2",)
        budgets = [f.name for f in dataclasses.fields(Http2Limits) if f.name != "max_concurrent_streams"]
        h = r.mapping(raw["http2"], hpath, {"max_concurrent_streams", *budgets})
        values = {"max_concurrent_streams": _whole(r, h, "max_concurrent_streams", hpath,
                                                   http2.max_concurrent_streams, 10000)}
        for name in budgets:
            default, bpath = getattr(http2, name), hpath + (name,)
            b = r.mapping(h.get(name), bpath, {"rate", "burst"})
            rate = r.convert(parse_rate, b["rate"], bpath + ("rate",)) if "rate" in b else default.rate
            values[name] = FrameBudget(rate, _whole(r, b, "burst", bpath, default.burst, 10**6))
        http2 = Http2Limits(**values)
    return Limits(sizes["max_header_bytes"], sizes["max_body"], timeouts, http2)


MIN_DISK_SIZE = 2**20                    # the SQLite index alone takes tens of KB


@_part(lambda: None)
def _cache_disk(r: _Reader, raw: Any, path: tuple) -> DiskCacheConfig:
    """cache.disk: a directory the edge can write (made if missing), and its byte bounds."""
    d = r.mapping(raw, path, {"path", "max_size", "max_object"})
    folder = d.get("path")
    if not isinstance(folder, str) or not folder.strip():
        raise r.doc.error(path + ("path",), "expected the directory to keep cached bodies in")
    folder = os.path.abspath(os.path.expanduser(folder))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        problem = "not a directory" if not os.path.isdir(existing) else "not writable by the edge"
        raise r.doc.error(path + ("path",), f"{existing}: {problem}")
    max_size = r.convert(parse_size, d["max_size"], path + ("max_size",)) if "max_size" in d else \
        DiskCacheConfig.max_size
    if max_size < MIN_DISK_SIZE:
        raise r.doc.error(path + ("max_size",), "at least 1MB")
    max_object = (r.convert(parse_size, d["max_object"], path + ("max_object",))
                  if "max_object" in d else min(DiskCacheConfig.max_object, max_size))
    if max_object > max_size:
        raise r.doc.error(path + ("max_object",), "must not be larger than cache.disk.max_size")
    if max_object < 1:
        raise r.doc.error(path + ("max_object",), "must be more than 0")
    return DiskCacheConfig(folder, max_size, max_object)


@_part(lambda: DEFAULT_OVERRIDE_HEADERS)
def _override_headers(r: _Reader, scrub_raw: dict) -> tuple[str, ...]:
    """scrub.override_headers: the list replaces the default; framing and Host cannot be named."""
    if "override_headers" not in scrub_raw:
        return DEFAULT_OVERRIDE_HEADERS
    path = ("scrub", "override_headers")
    names = tuple(r.listing(scrub_raw["override_headers"], path))
    for i, name in enumerate(names):
        if not isinstance(name, str) or not re.fullmatch(r"[!#$%&'*+.^_`|~\w-]+", name):
            raise r.doc.error(path + (i,), "expected a header name")
        if name.lower() in ("host", "content-length", "transfer-encoding"):
            raise r.doc.error(path + (i,), f"{name} frames or routes the request and cannot be dropped")
    return names


_DOMAIN = re.compile(r"(?i)\.?(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.?")


@_part(dict)
def _scrub_masking(r: _Reader, raw: dict) -> dict:
    """scrub.internal_domains, internal_networks and error_bodies."""
    path = ("scrub",)
    domains = tuple(r.listing(raw.get("internal_domains"), path + ("internal_domains",)))
    for i, name in enumerate(domains):
        if not isinstance(name, str) or not _DOMAIN.fullmatch(name) or name.strip(".").replace(".", "").isdigit():
            raise r.doc.error(path + ("internal_domains", i), "expected a domain name like internal.example")
    networks = tuple(r.convert(parse_network, v, path + ("internal_networks", i))
                     for i, v in enumerate(r.listing(raw.get("internal_networks"), path + ("internal_networks",))))
    error_bodies = raw.get("error_bodies", "mask")
    if error_bodies not in ("mask", "pass"):
        raise r.doc.error(path + ("error_bodies",), "expected mask or pass")
    return {"internal_domains": tuple(d.strip(".").lower() for d in domains), "internal_networks": networks,
            "error_bodies": error_bodies}


def parse_config(text: str, source: str = "<config>") -> EdgeConfig:
    """The config in `text`, or one ConfigError listing every mistake of it. A mistake in a
    part read by a function is recorded there (see _part); one the reading cannot go past
    sets its part of the file aside (_set_aside) and the file is read again, at most once
    per part."""
    doc = _Doc(text, source)
    set_aside: set[tuple] = set()
    for _ in range(MAX_READINGS):
        try:
            config = _read_config(doc)
        except ConfigError as e:
            doc.mistakes.append(e)
            if _set_aside(doc, getattr(e, "path", ()), set_aside):
                continue
        break
    else:                               # each reading costs the whole file: a file of mistakes is bounded
        doc.mistakes.append(ConfigError(f"more mistakes may follow (the file was read {MAX_READINGS} times)",
                                        source=source, line=max(doc.lines.values(), default=None)))
    mistakes = list({str(m): m for m in doc.mistakes}.values())     # each reading records them again
    if mistakes:
        raise ConfigError.of(mistakes)
    return config


MAX_READINGS = 50


def _set_aside(doc: _Doc, path: tuple, done: set[tuple]) -> bool:
    """Take the part of the file a mistake is in out of the next reading: a pool or a site gets
    a stand-in under its name (references to it hold), routing's default pool becomes the
    first pool, anything else (a top-level key or one below it; a list whole) is left out and
    its default stands. False when the mistake is in the file's structure or its part was
    already set aside."""
    part = path[:2]
    for i, key in enumerate(part):
        if isinstance(key, int):        # indexes of the items after it would shift
            part = part[:i]
            break
    top = doc.value
    if not part or part in done or part in {("pools",), ("sites",)} or not isinstance(top, dict):
        return False
    done.add(part)
    pools = top.get("pools")
    if part[0] == "routing" and part[1:] in ((), ("default_pool",)) and isinstance(pools, dict) and pools:
        routing = top.get("routing")
        top["routing"] = {**(routing if isinstance(routing, dict) else {}), "default_pool": next(iter(pools))}
        return True
    if part[0] == "pools":
        pools[part[1]] = {"origins": ["http://127.0.0.1:1"]}
        return True
    if part[0] == "sites":
        top["sites"][part[1]] = {"hosts": [f"stand-in-{len(done)}.invalid"]}
        return True
    parent = top if len(part) == 1 else top.get(part[0])
    if not isinstance(parent, dict) or part[-1] not in parent:
        return False
    del parent[part[-1]]
    return True


def _read_config(doc: _Doc) -> EdgeConfig:
    source = doc.source
    r = _Reader(doc)
    top = r.mapping(doc.value, (), {"listen", "trusted_proxies", "pools", "routing", "scrub", "cache", "compress",
                                    "access_log", "admin", "shield", "buffer_limit", "certificates", "acme",
                                    "sites", "default_site", "access_log_format", "shutdown_timeout", "reload",
                                    "cluster", "workers"}
                  | _reverse_mode(r, doc.value))

    listen, listeners = _listen(r, top)
    trusted = tuple(r.convert(parse_network, v, ("trusted_proxies", i))
                    for i, v in enumerate(r.listing(top.get("trusted_proxies"), ("trusted_proxies",))))

    pools_raw = r.mapping(top.get("pools"), ("pools",), _keys(top.get("pools")))
    if not pools_raw:
        raise doc.error(("pools",), "at least one pool with one origin is required")
    pools = {}
    for name, body in pools_raw.items():
        path = ("pools", name)
        body = r.mapping(body, path, {"origins", "health", "fallback", "balance", "hash_key", "slow_start",
                                      "location", "connect_timeout", "passive", "read_timeout"})
        origins = []
        for i, item in enumerate(r.listing(body.get("origins"), path + ("origins",))):
            opath = path + ("origins", i)
            if isinstance(item, str):
                item = {"url": item}
            item = r.mapping(item, opath, {"url", "weight", "backup"})
            if "url" not in item:
                raise doc.error(opath, "an origin needs a url")
            weight = item.get("weight", 1)
            if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= 1000:
                raise doc.error(opath + ("weight",), "weight must be a whole number from 1 to 1000")
            backup = item.get("backup", False)
            if not isinstance(backup, bool):
                raise doc.error(opath + ("backup",), "expected true or false")
            origin = r.convert(lambda u: parse_origin_url(u, weight), item["url"], opath + ("url",))
            origins.append(dataclasses.replace(origin, backup=backup))
        if not origins:
            raise doc.error(path + ("origins",), "a pool needs at least one origin")
        if all(o.backup for o in origins):
            raise doc.error(path + ("origins",), "a pool needs at least one origin that is not a backup")
        health = _health(r, body["health"], path + ("health",)) if "health" in body else None
        fallback = body.get("fallback")
        if fallback is not None and (not isinstance(fallback, str) or fallback not in pools_raw or fallback == name):
            raise doc.error(path + ("fallback",), "expected the name of another pool")
        balance = body.get("balance", "weighted_round_robin")
        if balance not in BALANCE:
            raise doc.error(path + ("balance",), f"expected one of {', '.join(BALANCE)}")
        hash_key = body.get("hash_key", "client_ip")
        if not isinstance(hash_key, str) or not re.fullmatch(r"client_ip|(cookie|header):[!#$%&'*+.^_`|~\w-]+", hash_key):
            raise doc.error(path + ("hash_key",), "expected client_ip, cookie:NAME or header:NAME")
        slow_start = r.convert(parse_duration, body["slow_start"], path + ("slow_start",)) if "slow_start" in body else 0.0
        location = _location(r, body["location"], path + ("location",)) if "location" in body else None
        connect_timeout = Pool.connect_timeout
        if "connect_timeout" in body:
            connect_timeout = r.convert(parse_duration, body["connect_timeout"], path + ("connect_timeout",))
            if not 0 < connect_timeout <= 300:
                raise doc.error(path + ("connect_timeout",), "must be more than 0 and at most 5m")
        passive = _passive(r, body["passive"], path + ("passive",)) if "passive" in body else PassiveHealth()
        read_timeout = Pool.read_timeout
        if "read_timeout" in body:
            read_timeout = r.convert(parse_duration, body["read_timeout"], path + ("read_timeout",))
            if not 0 < read_timeout <= 86400:
                raise doc.error(path + ("read_timeout",), "must be more than 0 and at most 1d")
        pools[str(name)] = Pool(str(name), tuple(origins), health, fallback, balance, hash_key,
                                slow_start=slow_start, connect_timeout=connect_timeout, location=location,
                                passive=passive, read_timeout=read_timeout)

    routing = r.mapping(top.get("routing"), ("routing",), {"default_pool", "geo"})
    default_pool = routing.get("default_pool", next(iter(pools)) if len(pools) == 1 else None)
    if default_pool is None:
        raise doc.error(("routing",), "routing.default_pool is required when there are several pools")
    if default_pool not in pools:
        raise doc.error(("routing", "default_pool"), f"no pool named {default_pool!r}")
    geo = _geo(r, routing["geo"], ("routing", "geo"), pools, source) if routing.get("geo") is not None else None

    scrub_raw = r.mapping(top.get("scrub"), ("scrub",), {"server_header", "strip", "override_headers",
                                                         "internal_domains", "internal_networks", "error_bodies"})
    server_header = scrub_raw.get("server_header", "edge")
    if server_header is not None and not isinstance(server_header, str):
        raise doc.error(("scrub", "server_header"), "expected a string, or null to remove the header")
    strip = DEFAULT_STRIP
    if "strip" in scrub_raw:
        strip = tuple(r.listing(scrub_raw["strip"], ("scrub", "strip")))
        for i, name in enumerate(strip):
            if not isinstance(name, str) or not name or any(c in name for c in " :\r\n"):
                raise doc.error(("scrub", "strip", i), "expected a header name")

    cache = CacheConfig()
    if "cache" in top:
        raw = r.mapping(top["cache"], ("cache",), {"enabled", "max_size", "max_object", "default_ttl", "purge_from",
                                                   "disk"})
        enabled = raw.get("enabled", True)
        if not isinstance(enabled, bool):
            raise doc.error(("cache", "enabled"), "expected true or false")
        max_size = r.convert(parse_size, raw["max_size"], ("cache", "max_size")) if "max_size" in raw else cache.max_size
        max_object = (r.convert(parse_size, raw["max_object"], ("cache", "max_object"))
                      if "max_object" in raw else min(cache.max_object, max_size))
        if max_object > max_size:
            raise doc.error(("cache", "max_object"), "must not be larger than cache.max_size")
        ttl = raw.get("default_ttl")
        default_ttl = r.convert(parse_duration, ttl, ("cache", "default_ttl")) if ttl is not None else None
        purge_from = cache.purge_from
        if "purge_from" in raw:
            purge_from = tuple(r.convert(parse_network, v, ("cache", "purge_from", i))
                               for i, v in enumerate(r.listing(raw["purge_from"], ("cache", "purge_from"))))
        disk = _cache_disk(r, raw["disk"], ("cache", "disk")) if raw.get("disk") is not None else None
        cache = CacheConfig(enabled, max_size, max_object, default_ttl, purge_from, disk)

    compress = CompressConfig()
    if "compress" in top:
        raw = r.mapping(top["compress"], ("compress",), {"enabled", "min_size", "encodings"})
        enabled = raw.get("enabled", True)
        if not isinstance(enabled, bool):
            raise doc.error(("compress", "enabled"), "expected true or false")
        min_size = (r.convert(parse_size, raw["min_size"], ("compress", "min_size"))
                    if "min_size" in raw else compress.min_size)
        encodings = compress.encodings
        if "encodings" in raw:
            encodings = tuple(r.listing(raw["encodings"], ("compress", "encodings")))
            for i, name in enumerate(encodings):
                if name not in ENCODINGS:
                    raise doc.error(("compress", "encodings", i), f"expected one of {', '.join(ENCODINGS)}")
        compress = CompressConfig(enabled, min_size, encodings)

    access_log = top.get("access_log")
    if access_log is not None and (not isinstance(access_log, str) or not access_log):
        raise doc.error(("access_log",), 'expected "-" (stdout), a file path, or null')

    admin, admin_token_file = _admin(r, top, source)
    shield = _shield(r, top["shield"], ("shield",), geo) if top.get("shield") is not None else None
    limits = _limits(r, top.get("shield"), ("shield",))
    if admin is not None and admin in [lst.address for lst in listeners] + [listen]:
        raise doc.error(("admin",), "must differ from listen")
    buffer_limit = _buffer_limit(r, top)
    return EdgeConfig(**_tls(r, top, listeners, source), buffer_limit=buffer_limit, pools=pools, default_pool=default_pool, geo=geo, listen=listen, admin=admin, shield=shield, limits=limits, trusted_proxies=trusted,
                      scrub=ScrubConfig(server_header, strip, _override_headers(r, scrub_raw),
                                        **_scrub_masking(r, scrub_raw)), cache=cache, compress=compress,
                      access_log=access_log, source=source, **_sites(r, top, pools, cache, compress),
                      access_log_format=_access_log_format(r, top),
                      admin_token_file=admin_token_file, **_lifecycle(r, top), cluster=_cluster(r, top, source, [lst.address for lst in listeners] or [listen]),
                      workers=_workers(r, top))


def _reverse_mode(r: _Reader, top: Any) -> set[str]:
    """`mode: reverse` (the default) is this file's; a forward-proxy file is run by `edge forward`.
    The key is known only where it is given (unknown-key messages list the usual keys)."""
    if not isinstance(top, dict) or "mode" not in top:
        return set()
    if top["mode"] == "forward":
        raise r.doc.error(("mode",), "a forward-proxy config: run it with edge forward -c FILE")
    if top["mode"] != "reverse":
        raise r.doc.error(("mode",), "expected reverse (edge run) or forward (edge forward)")
    return {"mode"}


ACCESS_LOG_FORMATS = ("json", "combined")


def _access_log_format(r: _Reader, top: dict) -> str:
    """`access_log_format:` json (default: one JSON object a line, every field) or combined
    (the Apache/nginx combined format log analysers read, the request id appended)."""
    value = top.get("access_log_format", "json")
    if value not in ACCESS_LOG_FORMATS:
        raise r.doc.error(("access_log_format",), f"expected one of {', '.join(ACCESS_LOG_FORMATS)}")
    return value


MIN_TOKEN = 16                      # characters of an admin token file


def _admin(r: _Reader, top: dict, source: str) -> tuple[tuple[str, int] | None, str | None]:
    """`admin: HOST:PORT`, or `admin: {address: HOST:PORT, token_file: PATH}`: the token that
    the write side (`edge reload`) asks for, in a file only its owner may read (like ssh's
    keys: a token others can read is refused, not used)."""
    raw = top.get("admin")
    if raw is None:
        return None, None
    if not isinstance(raw, dict):
        return r.convert(parse_hostport, raw, ("admin",)), None
    raw = r.mapping(raw, ("admin",), {"address", "token_file"})
    if "address" not in raw:
        raise r.doc.error(("admin",), "the admin endpoint needs an address")
    address = r.convert(parse_hostport, raw["address"], ("admin", "address"))
    if raw.get("token_file") is None:
        return address, None
    path = raw["token_file"]
    if not isinstance(path, str) or not path:
        raise r.doc.error(("admin", "token_file"), "expected the path of a file holding the token")
    path = _config_path(path, source)
    try:
        mode = os.stat(path).st_mode
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise r.doc.error(("admin", "token_file"), f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if mode & 0o077:
        raise r.doc.error(("admin", "token_file"), f"{path} may be read by other users: chmod 600 it")
    if len(token) < MIN_TOKEN or any(c.isspace() for c in token):
        raise r.doc.error(("admin", "token_file"), f"the token must be at least {MIN_TOKEN} characters, no spaces")
    return address, path


def _lifecycle(r: _Reader, top: dict) -> dict:
    """`shutdown_timeout:` (default 30s) and `reload: {watch: true}`."""
    out: dict = {}
    if top.get("shutdown_timeout") is not None:
        timeout = r.convert(parse_duration, top["shutdown_timeout"], ("shutdown_timeout",))
        if timeout > 3600:
            raise r.doc.error(("shutdown_timeout",), "at most 1h")
        out["shutdown_timeout"] = timeout
    raw = r.mapping(top.get("reload"), ("reload",), {"watch"})
    watch = raw.get("watch", False)
    if not isinstance(watch, bool):
        raise r.doc.error(("reload", "watch"), "expected true or false")
    out["reload_watch"] = watch
    return out


NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
MIN_SECRET = 16                     # bytes of a peer-signing key file


@_part(lambda: None)
def _cluster(r: _Reader, top: dict, source: str, listening: list[tuple[str, int]]) -> ClusterConfig | None:
    """`cluster:` this node's name, its Redis, the address peers reach it at, the membership
    TTL, the signing key, the tiered cache, and `peers:` a static member list (name: host:port,
    this node among them) for clusters without Redis."""
    if top.get("cluster") is None:
        return None
    path = ("cluster",)
    raw = r.mapping(top["cluster"], path, {"node", "redis", "advertise", "ttl", "secret_file", "tiered", "peers"})
    node = raw.get("node") or socket.gethostname().split(".")[0] or "edge"
    if not isinstance(node, str) or not NODE_NAME.fullmatch(node):
        raise r.doc.error(path + ("node",), "expected a name of letters, digits, '.', '_' or '-' (at most 63)")
    redis = raw.get("redis")
    if redis is not None:
        from addons.cluster.urls import parse_redis_url
        r.convert(parse_redis_url, redis, path + ("redis",))
    advertise = None
    if raw.get("advertise") is not None:
        advertise = r.convert(parse_hostport, raw["advertise"], path + ("advertise",))
        if advertise[1] == 0 or advertise[0] in ("0.0.0.0", "::", ""):
            raise r.doc.error(path + ("advertise",), "expected the address peers reach (not a wildcard, not port 0)")
    ttl = r.convert(parse_duration, raw["ttl"], path + ("ttl",)) if "ttl" in raw else ClusterConfig.ttl
    if not 1 <= ttl <= 3600:
        raise r.doc.error(path + ("ttl",), "at least 1s and at most 1h (heartbeats go every ttl/3)")
    secret_file = raw.get("secret_file")
    if secret_file is not None:
        if not isinstance(secret_file, str) or not secret_file:
            raise r.doc.error(path + ("secret_file",), "expected the path of a file holding the key")
        secret_file = _config_path(secret_file, source)
        try:
            with open(secret_file, "rb") as f:
                if len(f.read().strip()) < MIN_SECRET:
                    raise r.doc.error(path + ("secret_file",), f"{secret_file}: fewer than {MIN_SECRET} bytes of key")
        except OSError as e:
            raise r.doc.error(path + ("secret_file",), f"{secret_file}: cannot read: {e.strerror}") from None
    tiered = raw.get("tiered", False)
    if not isinstance(tiered, bool):
        raise r.doc.error(path + ("tiered",), "expected true or false")
    table = r.mapping(raw.get("peers"), path + ("peers",), _keys(raw.get("peers")))
    peers = {}
    for name, address in table.items():
        if not isinstance(name, str) or not NODE_NAME.fullmatch(name):
            raise r.doc.error(path + ("peers", name), "expected a node name of letters, digits, '.', '_' or '-'")
        peers[name] = r.convert(parse_hostport, address, path + ("peers", name))
        host, port = peers[name]
        if name != node and host in ("localhost", "127.0.0.1", "::1") and any(
                p == port and h in ("localhost", "127.0.0.1", "::1", "0.0.0.0", "::", "") for h, p in listening):
            # this node's own socket (another address at one port is a peer: tiered.py lets it through)
            raise r.doc.error(path + ("peers", name), f"this node listens on port {port} too: that address is "
                              "this node's own socket; give one of the two another port")
    if peers and node not in peers:
        raise r.doc.error(path + ("peers",), f"this node ({node}) must be in its own peer list")
    if tiered and not peers and redis is None:
        raise r.doc.error(path + ("tiered",), "needs the members: cluster.redis or a static cluster.peers list")
    if tiered and redis is None and secret_file is None:
        raise r.doc.error(path + ("secret_file",), "tiered without Redis needs a secret_file shared by the peers")
    if redis is None and not peers:
        raise r.doc.error(path, "a cluster needs redis: the URL of the Redis its nodes share (or a static peers: list)")
    return ClusterConfig(node, redis, advertise, ttl, secret_file, tiered, peers)


MAX_WORKERS = 256


def parse_workers(value: Any) -> int:
    """`workers:` / `edge run --workers`: a whole number from 1, or `auto` (one per CPU)."""
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_WORKERS:
        raise ValueError(f"expected auto or a whole number from 1 to {MAX_WORKERS}")
    return value


@_part(lambda: EdgeConfig.workers)
def _workers(r: _Reader, top: dict) -> int:
    """`workers: auto|N` (default 1): N processes of the edge under a supervisor."""
    if top.get("workers") is None:
        return EdgeConfig.workers
    return r.convert(parse_workers, top["workers"], ("workers",))


MIN_BUFFER_LIMIT = 16 * 2**10       # below it every small page would stream (no cache, no compression)


@_part(lambda: EdgeConfig.buffer_limit)
def _buffer_limit(r: _Reader, top: dict) -> int:
    """`buffer_limit:` the largest body of known length held whole (default 1 MiB)."""
    if "buffer_limit" not in top:
        return EdgeConfig.buffer_limit
    limit = r.convert(parse_size, top["buffer_limit"], ("buffer_limit",))
    if limit < MIN_BUFFER_LIMIT:
        raise r.doc.error(("buffer_limit",), "at least 16KB (smaller bodies are cached and compressed whole)")
    return limit


def load_config(path: str) -> EdgeConfig:
    return parse_config(config_text(path), path)


def config_text(path: str) -> str:
    """A config file's text, or ConfigError naming the file (the forward config's too)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", source=path) from None
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", source=path) from None


def config_from_origins(urls: list[str], listen: tuple[str, int] = DEFAULT_LISTEN) -> EdgeConfig:
    """`edge run --origin URL ...`: one pool of equal weight. Raises ValueError for a bad URL."""
    pool = Pool("default", tuple(parse_origin_url(u) for u in urls))
    return EdgeConfig(pools={"default": pool}, default_pool="default", listen=listen, source="--origin")


# --- listeners, certificates, ACME -------------------------------------------------------------

@_part(lambda: (DEFAULT_LISTEN, ()))
def _listen(r: _Reader, top: dict) -> tuple[tuple[str, int], tuple[Listener, ...]]:
    """`listen: ADDRESS`, or a list of `ADDRESS` / `{address: ADDRESS, tls: true}`. The first
    address is also `listen` (what `edge run` reports, the legacy single listener)."""
    raw = top.get("listen")
    if raw is None:
        return DEFAULT_LISTEN, ()
    if not isinstance(raw, list):
        return r.convert(parse_hostport, raw, ("listen",)), ()
    if not raw:
        raise r.doc.error(("listen",), "expected at least one address")
    listeners: list[Listener] = []
    for i, item in enumerate(raw):
        path = ("listen", i)
        if not isinstance(item, dict):
            item = {"address": item}
        item = r.mapping(item, path, {"address", "tls"})
        if "address" not in item:
            raise r.doc.error(path, "a listener needs an address")
        tls = item.get("tls", False)
        if not isinstance(tls, bool):
            raise r.doc.error(path + ("tls",), "expected true or false")
        address = r.convert(parse_hostport, item["address"], path + ("address",))
        if any(lst.address == address for lst in listeners):
            raise r.doc.error(path, f"{_bracket(address[0])}:{address[1]} is listed twice")
        if address[1] == 0 and any(lst.address[0] == address[0] and lst.address[1] == 0 for lst in listeners):
            raise r.doc.error(path, "one port-0 listener per host (mitmproxy keys servers by address)")
        listeners.append(Listener(address, tls))
    return listeners[0].address, tuple(listeners)


def _config_path(path: str, source: str) -> str:
    """A path from the config: relative ones are relative to the config file."""
    if not os.path.isabs(path) and not source.startswith(("<", "--")):
        return os.path.join(os.path.dirname(os.path.abspath(source)), path)
    return path


@_part(dict)
def _tls(r: _Reader, top: dict, listeners: tuple[Listener, ...], source: str) -> dict:
    """The `certificates:` and `acme:` sections, checked against the listeners."""
    from addons.tls.certs import load_pair        # cryptography only; imported when used
    certificates = []
    for i, item in enumerate(r.listing(top.get("certificates"), ("certificates",))):
        path = ("certificates", i)
        item = r.mapping(item, path, {"cert", "key"})
        for k in ("cert", "key"):
            if not isinstance(item.get(k), str) or not item[k]:
                raise r.doc.error(path + (k,), "expected the path of a PEM file")
        files = CertificateFiles(_config_path(item["cert"], source), _config_path(item["key"], source))
        r.convert(lambda _: load_pair(files.cert, files.key), None, path)
        certificates.append(files)
    acme = _acme(r, top["acme"], ("acme",), source) if top.get("acme") is not None else None
    for i, lst in enumerate(listeners):
        if lst.tls and not certificates and acme is None:
            raise r.doc.error(("listen", i, "tls"), "a TLS listener needs certificates: or acme:")
    if acme is not None and not any(not lst.tls for lst in listeners or (Listener(DEFAULT_LISTEN),)):
        raise r.doc.error(("acme",), "HTTP-01 validation needs a plain (not TLS) listener")
    return {"listeners": listeners, "certificates": tuple(certificates), "acme": acme}


_HOSTNAME = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")


def _acme(r: _Reader, raw: Any, path: tuple, source: str) -> AcmeConfig:
    raw = r.mapping(raw, path, {"directory", "email", "storage", "ca_bundle", "names", "renew_before"})
    directory = raw.get("directory")
    if not isinstance(directory, str) or urlsplit(directory).scheme != "https" or not urlsplit(directory).hostname:
        raise r.doc.error(path + ("directory",), "expected the https:// URL of the CA's ACME directory")
    storage = raw.get("storage")
    if not isinstance(storage, str) or not storage:
        raise r.doc.error(path + ("storage",), "expected a directory for the account key and certificates")
    email = raw.get("email")
    if email is not None and (not isinstance(email, str) or not re.fullmatch(r"[^@\s:]+@[^@\s:]+", email)):
        raise r.doc.error(path + ("email",), "expected an e-mail address, or null")
    ca_bundle = raw.get("ca_bundle")
    if ca_bundle is not None:
        if not isinstance(ca_bundle, str) or not ca_bundle:
            raise r.doc.error(path + ("ca_bundle",), "expected the path of a PEM CA file, or null")
        ca_bundle = _config_path(ca_bundle, source)
        if not os.access(ca_bundle, os.R_OK):
            raise r.doc.error(path + ("ca_bundle",), f"{ca_bundle}: cannot read the file")
    names = []
    for i, name in enumerate(r.listing(raw.get("names"), path + ("names",))):
        if not isinstance(name, str) or not _HOSTNAME.fullmatch(name.lower().rstrip(".")):
            raise r.doc.error(path + ("names", i), "expected a host name (HTTP-01 cannot validate wildcards)")
        names.append(name.lower().rstrip("."))
    renew_before = AcmeConfig.renew_before
    if "renew_before" in raw:
        renew_before = r.convert(parse_duration, raw["renew_before"], path + ("renew_before",))
    return AcmeConfig(directory, _config_path(storage, source), email, ca_bundle, tuple(names), renew_before)


# --- sites ------------------------------------------------------------------------------------

_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_HOST_NAME = re.compile(r"(\*\.)?([a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~\w-]+")
# Fields a header rule may not touch: they frame or route the request, or are the edge's own.
RULE_FORBIDDEN = frozenset({"host", "content-length", "transfer-encoding", "connection", "te", "trailer",
                            "upgrade", "keep-alive", "proxy-connection", "cache-status", "edge-request-id"})
SITE_KEYS = {"hosts", "https_redirect", "hsts", "headers", "routes"}
ROUTE_KEYS = {"path", "pool", "strip_prefix", "origin_path", "cache", "compress", "methods", "headers", "rate_limit",
              "shield"}


def parse_site_host(value: Any) -> str:
    """A site's host: a name (`shop.example`), a wildcard (`*.shop.example`: every name below
    it, not itself), an IPv4 address or an [IPv6] literal; lower case, no trailing dot, no port."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a host name like shop.example or *.shop.example")
    text = value.strip().lower()
    if text.startswith("[") and text.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(text[1:-1]))
        except ValueError:
            raise ValueError(f"{value!r}: not an IPv6 address") from None
    text = text.removesuffix(".")
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        pass
    if not _HOST_NAME.fullmatch(text) or len(text) > 253:
        problem = "without a port (hosts match whatever the port)" if ":" in text else \
            "a wildcard is only a leading *. label" if "*" in text else "not a host name"
        raise ValueError(f"{value!r}: {problem}")
    return text


def _flag(r: _Reader, raw: dict, key: str, path: tuple, default: bool | None) -> bool | None:
    value = raw.get(key, default)
    if value is not default and not isinstance(value, bool):
        raise r.doc.error(path + (key,), "expected true or false")
    return value


@_part(lambda: None)
def _hsts(r: _Reader, raw: Any, path: tuple) -> str | None:
    """`365d`, or {max_age, include_subdomains, preload}: the Strict-Transport-Security value."""
    if raw is None or raw is False:
        return None
    spec = r.mapping(raw, path, {"max_age", "include_subdomains", "preload"}) if isinstance(raw, dict) \
        else {"max_age": raw}
    if "max_age" not in spec:
        raise r.doc.error(path + ("max_age",), "expected a duration like 365d")
    age = r.convert(parse_duration, spec["max_age"], path + ("max_age",) if isinstance(raw, dict) else path)
    value = f"max-age={int(age)}"
    if _flag(r, spec, "include_subdomains", path, False):
        value += "; includeSubDomains"
    if _flag(r, spec, "preload", path, False):
        value += "; preload"
    return value


def _header_value(r: _Reader, value: Any, path: tuple) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise r.doc.error(path, "expected a header value")
    text = str(value)
    if any(c in text for c in "\r\n\0"):
        raise r.doc.error(path, "CR, LF and NUL are not allowed in a header value")
    return text


def _header_name(r: _Reader, name: Any, path: tuple) -> str:
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        raise r.doc.error(path, "expected a header name")
    if name.lower() in RULE_FORBIDDEN:
        raise r.doc.error(path, f"{name} frames or routes the message and cannot be changed by a rule")
    return name


@_part(HeaderRules)
def _header_rules(r: _Reader, raw: Any, path: tuple) -> HeaderRules:
    spec = r.mapping(raw, path, {"set", "add", "remove"})
    out = {}
    for verb in ("set", "add"):
        vpath = path + (verb,)
        pairs = []
        for name, value in r.mapping(spec.get(verb), vpath, _keys(spec.get(verb))).items():
            _header_name(r, name, vpath + (name,))
            values = value if isinstance(value, list) and verb == "add" else [value]
            pairs += [(name, _header_value(r, v, vpath + (name,))) for v in values]
        out[verb] = tuple(pairs)
    remove = tuple(_header_name(r, n, path + ("remove", i))
                   for i, n in enumerate(r.listing(spec.get("remove"), path + ("remove",))))
    return HeaderRules(out["set"], out["add"], remove)


def _path_prefix(r: _Reader, value: Any, path: tuple, what: str) -> str:
    if not isinstance(value, str) or not value.startswith("/") or any(c in value for c in "?#% \t\r\n\\"):
        raise r.doc.error(path, f"expected {what} starting with / (no query, no %, no spaces)")
    segments = value.split("/")
    if any(s in (".", "..") for s in segments) or "//" in value:
        raise r.doc.error(path, f"{what} must be normalised: no . or .. segments, no //")
    return value


@_part(SiteRoute)
def _route(r: _Reader, raw: Any, path: tuple, index: int, pools: dict, cache: CacheConfig) -> SiteRoute:
    spec = r.mapping(raw, path, ROUTE_KEYS)
    prefix = _path_prefix(r, spec.get("path", "/"), path + ("path",), "a path prefix")
    pool = spec.get("pool")
    if pool is not None and (not isinstance(pool, str) or pool not in pools):
        raise r.doc.error(path + ("pool",), f"no pool named {pool!r}")
    origin_path = ""
    if spec.get("origin_path") not in (None, "", "/"):
        origin_path = _path_prefix(r, spec["origin_path"], path + ("origin_path",), "an origin path").rstrip("/")
    route_cache, ignore = None, ()
    if spec.get("cache") is not None:
        cpath = path + ("cache",)
        c = r.mapping(spec["cache"], cpath, {"enabled", "default_ttl", "ignore_query"})
        ttl = cache.default_ttl
        if "default_ttl" in c:
            ttl = None if c["default_ttl"] is None else r.convert(parse_duration, c["default_ttl"], cpath + ("default_ttl",))
        route_cache = dataclasses.replace(cache, enabled=_flag(r, c, "enabled", cpath, cache.enabled), default_ttl=ttl)
        ignore = tuple(r.listing(c.get("ignore_query"), cpath + ("ignore_query",)))
        for i, key in enumerate(ignore):
            if not isinstance(key, str) or not key or any(ch in key for ch in "&=# "):
                raise r.doc.error(cpath + ("ignore_query", i), "expected a query parameter name")
    compress = None
    if spec.get("compress") is not None:
        c = r.mapping(spec["compress"], path + ("compress",), {"enabled"})
        compress = _flag(r, c, "enabled", path + ("compress",), None)
    methods = tuple(r.listing(spec.get("methods"), path + ("methods",)))
    for i, m in enumerate(methods):
        if not isinstance(m, str) or not re.fullmatch(r"[A-Z]+", m):
            raise r.doc.error(path + ("methods", i), "expected a method in upper case, like GET")
    matches = []
    hpath = path + ("headers",)
    for name, value in r.mapping(spec.get("headers"), hpath, _keys(spec.get("headers"))).items():
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise r.doc.error(hpath + (name,), "expected a header name")
        text = _header_value(r, value, hpath + (name,))
        if text.startswith("~"):
            try:
                matches.append(HeaderMatch(name.lower(), pattern=re.compile(text[1:])))
            except re.error as e:
                raise r.doc.error(hpath + (name,), f"not a regular expression: {e}") from None
        else:
            matches.append(HeaderMatch(name.lower(), value=text))
    rate_limit = None
    if spec.get("rate_limit") is not None:        # read as the shield's rate_limit is
        rate_limit = _shield(r, {"rate_limit": spec["rate_limit"]}, path, None).rate_limit
        if rate_limit.store != "memory":
            raise r.doc.error(path + ("rate_limit", "store"), "a route's rate limit is kept in-process: memory")
    shield = None
    if spec.get("shield") is not None:
        spath = path + ("shield",)
        parts = dict(r.mapping(spec["shield"], spath, {"waf", "bots"}))
        for part, value in parts.items():
            if isinstance(value, bool):         # YAML 1.1 reads a bare on/off as a boolean
                parts[part] = value = "on" if value else "off"
            if value not in SHIELD_PARTS:
                raise r.doc.error(spath + (part,), f"expected one of {', '.join(SHIELD_PARTS)}")
        shield = RouteShield(**parts)
    return SiteRoute(prefix, pool, _flag(r, spec, "strip_prefix", path, False), origin_path, route_cache, ignore,
                     compress, methods, tuple(matches), index, rate_limit, shield)


def _sites(r: _Reader, top: dict, pools: dict, cache: CacheConfig, compress: CompressConfig) -> dict:
    """`sites:` and `default_site:`; without them, one implicit site takes every host."""
    if top.get("sites") is None:
        if top.get("default_site") is not None:
            raise r.doc.error(("default_site",), "needs a sites: section")
        return {}
    raw = r.mapping(top["sites"], ("sites",), _keys(top["sites"]))
    if not raw:
        raise r.doc.error(("sites",), "at least one site, or leave sites: out")
    sites, owner = {}, {}
    for name, body in raw.items():
        path = ("sites", name)
        if not isinstance(name, str) or not _SITE_NAME.fullmatch(name):
            raise r.doc.error(path, "a site name is letters, digits, _ . and -")
        spec = r.mapping(body, path, SITE_KEYS)
        hosts = []
        for i, value in enumerate(r.listing(spec.get("hosts"), path + ("hosts",))):
            host = r.convert(parse_site_host, value, path + ("hosts", i))
            if host in owner:
                raise r.doc.error(path + ("hosts", i), f"{host} is already a host of site {owner[host]}")
            owner[host] = name
            hosts.append(host)
        if not hosts:
            raise r.doc.error(path + ("hosts",), "a site needs at least one host")
        routes = tuple(_route(r, item, path + ("routes", i), i, pools, cache)
                       for i, item in enumerate(r.listing(spec.get("routes"), path + ("routes",))))
        headers = r.mapping(spec.get("headers"), path + ("headers",), {"request", "response"})
        sites[name] = Site(name, tuple(hosts), routes or (SiteRoute(),),
                           bool(_flag(r, spec, "https_redirect", path, False)),
                           _hsts(r, spec.get("hsts"), path + ("hsts",)),
                           _header_rules(r, headers.get("request"), path + ("headers", "request")),
                           _header_rules(r, headers.get("response"), path + ("headers", "response")))
    default_site = top.get("default_site")
    if default_site is not None and (not isinstance(default_site, str) or default_site not in sites):
        raise r.doc.error(("default_site",), f"no site named {default_site!r} (null: unknown hosts get 421)")
    return {"sites": sites, "default_site": default_site}
