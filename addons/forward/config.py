"""The forward proxy's config file (`mode: forward`): parsed with the same YAML reader as the
edge's (addons/config.py), so every mistake is named FILE:LINE: key, all of them at once.

Pure (no mitmproxy imports). The domain lists it names are loaded here (addons/forward/lists.py),
so a bad list line is a config error too, and the addons get them ready to match.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from addons.config import (CacheConfig, ConfigError, Network, _cache_disk, _config_path, _Doc, _part, _Reader,
                           _whole, config_text, parse_duration, parse_hostport, parse_network, parse_rate, parse_size)
from addons.forward.policy import ACTIONS, Rule

DEFAULT_LISTEN = ("127.0.0.1", 3128)
# Who may use the proxy without an allow_clients list: this machine and the private ranges
# (RFC 1918, IPv6 unique-local and link-local). Never the Internet: an open proxy is abused.
DEFAULT_CLIENTS = tuple(ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7", "fe80::/10"))
TOP_KEYS = {"mode", "listen", "users", "intercept", "lists", "policy", "cache", "activity_log", "allow_clients",
            "rate_limit", "buffer_limit", "connect_ports"}
# Squid's SSL_ports: a CONNECT tunnel elsewhere (25: mail) would make the proxy a relay for
# whatever protocol the client speaks.
DEFAULT_CONNECT_PORTS = (443,)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_HOST_GLOB = re.compile(r"(\*\.)?[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*")


@dataclass(frozen=True)
class Users:
    """Proxy authentication: one of an htpasswd file or an LDAP server (mitmproxy's
    validators check the password), and the groups the policy names."""
    htpasswd: str | None = None
    ldap: str | None = None              # mitmproxy's proxyauth spec: ldap[s]:server[:port]:bind_dn:password:base
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)   # "*": every authenticated user


@dataclass(frozen=True)
class Intercept:
    ca: str | None = None                # PEM with the CA certificate and its key (`edge forward ca init`)
    never: tuple[str, ...] = ()          # host names (and their subdomains) or *.globs never decrypted


@dataclass(frozen=True)
class UserRateLimit:
    """A token bucket per user (per client IP without authentication), in-process."""
    rate: float
    burst: int


@dataclass(frozen=True)
class ForwardConfig:
    listen: tuple[str, int] = DEFAULT_LISTEN
    users: Users | None = None
    intercept: Intercept = field(default_factory=Intercept)
    lists: Mapping[str, Any] = field(default_factory=dict)       # name -> lists.DomainList
    policy: tuple[Rule, ...] = (Rule(0, "allow"),)
    cache: CacheConfig = field(default_factory=lambda: CacheConfig(enabled=False, purge_from=()))
    activity_log: str | None = None      # JSON lines, a path or "-" (stdout); None: nothing recorded
    allow_clients: tuple[Network, ...] = DEFAULT_CLIENTS
    rate_limit: UserRateLimit | None = None
    buffer_limit: int = 2**20            # larger bodies (and those of unknown length) stream
    source: str = "<config>"
    connect_ports: tuple[int, ...] = DEFAULT_CONNECT_PORTS    # where CONNECT tunnels may go


def is_forward(text: str) -> bool:
    """Does this config file say `mode: forward`? (A cheap look before the full parse.)"""
    return re.search(r"(?m)^mode:\s*['\"]?forward['\"]?\s*(#.*)?$", text) is not None


def load_forward_config(path: str) -> ForwardConfig:
    return parse_forward_config(config_text(path), path)


def parse_forward_config(text: str, source: str = "<config>") -> ForwardConfig:
    """The config in `text`, or one ConfigError listing every mistake (each part records its
    own and the rest is read on)."""
    doc = _Doc(text, source)
    r = _Reader(doc)
    config = None
    try:
        config = _read(r, source)
    except ConfigError as e:
        doc.mistakes.append(e)
    mistakes = list({str(m): m for m in doc.mistakes}.values())
    if mistakes:
        raise ConfigError.of(mistakes)
    return config


def _read(r: _Reader, source: str) -> ForwardConfig:
    top = r.mapping(r.doc.value, (), TOP_KEYS)
    if top.get("mode", "forward") != "forward":
        raise r.doc.error(("mode",), "a forward-proxy config says mode: forward (a reverse one is run by edge run)")
    listen = _listen(r, top)
    users = _users(r, top.get("users"), source) if top.get("users") is not None else None
    intercept = _intercept(r, top.get("intercept"), source)
    lists = _lists(r, top.get("lists"), source)
    policy = _policy(r, top.get("policy"), users, lists, intercept) if top.get("policy") is not None \
        else ForwardConfig.policy
    clients = ForwardConfig.allow_clients
    if top.get("allow_clients") is not None:
        clients = tuple(r.convert(parse_network, v, ("allow_clients", i))
                        for i, v in enumerate(r.listing(top["allow_clients"], ("allow_clients",))))
        if not clients:
            raise r.doc.error(("allow_clients",), "expected at least one network (nobody could use the proxy)")
    log = top.get("activity_log")
    if log is not None and (not isinstance(log, str) or not log):
        raise r.doc.error(("activity_log",), 'expected a file path, "-" (stdout), or null')
    if log not in (None, "-"):
        log = _config_path(log, source)
    buffer_limit = ForwardConfig.buffer_limit
    if top.get("buffer_limit") is not None:
        buffer_limit = r.convert(parse_size, top["buffer_limit"], ("buffer_limit",))
    return ForwardConfig(listen, users, intercept, lists, policy, _cache(r, top.get("cache")), log, clients,
                         _rate_limit(r, top.get("rate_limit")), buffer_limit, source, _connect_ports(r, top))


@_part(lambda: DEFAULT_CONNECT_PORTS)
def _connect_ports(r: _Reader, top: dict) -> tuple[int, ...]:
    if top.get("connect_ports") is None:
        return DEFAULT_CONNECT_PORTS
    ports = tuple(r.listing(top["connect_ports"], ("connect_ports",)))
    for i, port in enumerate(ports):
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise r.doc.error(("connect_ports", i), "expected a port number from 1 to 65535")
    if not ports:
        raise r.doc.error(("connect_ports",), "expected at least one port, like [443]")
    return ports


@_part(lambda: DEFAULT_LISTEN)
def _listen(r: _Reader, top: dict) -> tuple[str, int]:
    return r.convert(parse_hostport, top["listen"], ("listen",)) if top.get("listen") is not None else DEFAULT_LISTEN


@_part(lambda: None)
def _users(r: _Reader, raw: Any, source: str) -> Users:
    path = ("users",)
    spec = r.mapping(raw, path, {"htpasswd", "ldap", "groups"})
    htpasswd = ldap = None
    if spec.get("htpasswd") is not None:
        htpasswd = spec["htpasswd"]
        if not isinstance(htpasswd, str) or not htpasswd:
            raise r.doc.error(path + ("htpasswd",), "expected the path of an htpasswd file (bcrypt or SHA1 entries)")
        htpasswd = _config_path(htpasswd, source)
        _check_htpasswd(r, htpasswd, path + ("htpasswd",))
    if spec.get("ldap") is not None:
        ldap = _ldap(r, spec["ldap"], path + ("ldap",))
    if (htpasswd is None) == (ldap is None):
        raise r.doc.error(path, "expected one of htpasswd: FILE or ldap: {url, bind_dn, password, base}")
    groups = {}
    gpath = path + ("groups",)
    for name, members in r.mapping(spec.get("groups"), gpath, set(spec.get("groups") or {})).items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise r.doc.error(gpath + (name,), "a group name is letters, digits, _ . and -")
        listed = r.listing(members, gpath + (name,))
        for i, member in enumerate(listed):
            if not isinstance(member, str) or not member or ":" in member:
                raise r.doc.error(gpath + (name, i), 'expected a user name, or "*" for every user')
        groups[name] = tuple(listed)
    return Users(htpasswd, ldap, groups)


def _check_htpasswd(r: _Reader, path: str, key: tuple) -> None:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise r.doc.error(key, f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, _, hashed = line.partition(":")
        if not user or not hashed.startswith(("{SHA}", "$2y$", "$2b$", "$2a$")):
            raise r.doc.error(key, f"{path}:{n}: expected user:HASH, the hash bcrypt (htpasswd -B) or {{SHA}}")


def _ldap(r: _Reader, raw: Any, path: tuple) -> str:
    """{url: ldaps://host[:port], bind_dn, password, base}: mitmproxy's proxyauth LDAP spec."""
    spec = r.mapping(raw, path, {"url", "bind_dn", "password", "base"})
    url = spec.get("url")
    m = re.fullmatch(r"(ldaps?)://([^:/\s]+)(?::(\d+))?/?", url) if isinstance(url, str) else None
    if m is None:
        raise r.doc.error(path + ("url",), "expected ldap://HOST[:PORT] or ldaps://HOST[:PORT]")
    for key in ("bind_dn", "password", "base"):
        if not isinstance(spec.get(key), str) or not spec[key] or ":" in spec[key]:
            # mitmproxy's proxyauth spec is colon-separated
            raise r.doc.error(path + (key,), "expected a string without a colon")
    server = f"{m[2]}:{m[3]}" if m[3] else m[2]
    return f"{m[1]}:{server}:{spec['bind_dn']}:{spec['password']}:{spec['base']}"


def parse_host_glob(value: Any) -> str:
    """`bank.example` (it and its subdomains) or `*.health.example` (its subdomains only)."""
    if not isinstance(value, str) or not _HOST_GLOB.fullmatch(value.strip().lower().rstrip(".")):
        raise ValueError(f"{value!r}: expected a host name like bank.example or *.health.example")
    return value.strip().lower().rstrip(".")


@_part(Intercept)
def _intercept(r: _Reader, raw: Any, source: str) -> Intercept:
    path = ("intercept",)
    spec = r.mapping(raw, path, {"ca", "never"})
    ca = spec.get("ca")
    if ca is not None:
        if not isinstance(ca, str) or not ca:
            raise r.doc.error(path + ("ca",), "expected the path of a PEM with the CA certificate and its key")
        ca = _config_path(ca, source)
        try:
            r.convert(_check_ca, ca, path + ("ca",))
        except ConfigError as e:        # recorded: `never` is read on
            r.doc.mistakes.append(e)
    never = tuple(r.convert(parse_host_glob, v, path + ("never", i))
                  for i, v in enumerate(r.listing(spec.get("never"), path + ("never",))))
    return Intercept(ca, never)


def _check_ca(path: str) -> None:
    """A PEM holding a CA certificate and its private key (what mitmproxy signs with)."""
    from cryptography import x509
    from addons.tls.certs import load_pair          # cryptography only; imported when used
    try:
        cert = load_pair(path, path).chain[0]
    except ValueError as e:
        raise ValueError(f"{e} (make one: edge forward ca init)") from None
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ValueError(f"{path}: the certificate is not a CA (basicConstraints CA:TRUE)")


@_part(dict)
def _lists(r: _Reader, raw: Any, source: str) -> dict:
    from addons.forward.lists import load_list        # publicsuffixlist, the adblock parser: when used
    path = ("lists",)
    out = {}
    for name, file in r.mapping(raw, path, set(raw) if isinstance(raw, dict) else set()).items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise r.doc.error(path + (name,), "a list name is letters, digits, _ . and -")
        if not isinstance(file, str) or not file:
            raise r.doc.error(path + (name,), "expected the path of a list file (hosts, adblock or plain domains)")
        try:
            out[name] = load_list(_config_path(file, source), name)
        except ConfigError as e:        # names the list's FILE:LINE; the other lists are read on
            r.doc.mistakes.append(e)
    return out


@_part(lambda: (Rule(0, "block"),))
def _policy(r: _Reader, raw: Any, users: Users | None, lists: Mapping, intercept: Intercept) -> tuple[Rule, ...]:
    path = ("policy",)
    rules = []
    for i, item in enumerate(r.listing(raw, path)):
        rule = _rule(r, item, path + (i,), users, lists, intercept)
        rules.append(rule or Rule(i, "block"))      # a bad rule (recorded) stands as a block
    if not rules:
        raise r.doc.error(path, "expected at least one rule, like {action: allow} (or leave policy: out)")
    return tuple(rules)


@_part(lambda: None)
def _rule(r: _Reader, item: Any, rpath: tuple, users: Users | None, lists: Mapping, intercept: Intercept) -> Rule:
    """One rule: {group, list, action, intercept}, checked against the groups, lists and CA."""
    i = rpath[-1]
    spec = r.mapping(item, rpath, {"group", "list", "action", "intercept"})
    action = spec.get("action")
    if action not in ACTIONS:
        raise r.doc.error(rpath + ("action",), f"expected one of {', '.join(ACTIONS)}")
    group = spec.get("group")
    if group is not None and (users is None or group not in users.groups):
        raise r.doc.error(rpath + ("group",), f"no group named {group!r} (users.groups)")
    listed = spec.get("list")
    if listed is not None and listed not in lists:
        raise r.doc.error(rpath + ("list",), f"no list named {listed!r} (lists:)")
    page = spec.get("intercept", False)
    if not isinstance(page, bool):
        raise r.doc.error(rpath + ("intercept",), "expected true or false")
    if page and action != "block":
        raise r.doc.error(rpath + ("intercept",), "only a block rule takes intercept: true (its page inside TLS)")
    if (page or action == "intercept") and intercept.ca is None:
        raise r.doc.error(rpath, "decrypting needs intercept.ca (make one: edge forward ca init)")
    return Rule(i, action, group, listed, page)


@_part(lambda: CacheConfig(enabled=False, purge_from=()))
def _cache(r: _Reader, raw: Any) -> CacheConfig:
    """cache: {enabled, max_size, max_object, default_ttl, disk}: the edge's RFC 9111 cache as
    a shared cache of external content. Off without the section."""
    if raw is None:
        return CacheConfig(enabled=False, purge_from=())
    path = ("cache",)
    spec = r.mapping(raw, path, {"enabled", "max_size", "max_object", "default_ttl", "disk"})
    enabled = spec.get("enabled", True)
    if not isinstance(enabled, bool):
        raise r.doc.error(path + ("enabled",), "expected true or false")
    max_size = r.convert(parse_size, spec["max_size"], path + ("max_size",)) if "max_size" in spec \
        else CacheConfig.max_size
    max_object = r.convert(parse_size, spec["max_object"], path + ("max_object",)) if "max_object" in spec \
        else min(CacheConfig.max_object, max_size)
    if max_object > max_size:
        raise r.doc.error(path + ("max_object",), "must not be larger than cache.max_size")
    ttl = r.convert(parse_duration, spec["default_ttl"], path + ("default_ttl",)) \
        if spec.get("default_ttl") is not None else None
    disk = _cache_disk(r, spec["disk"], path + ("disk",)) if spec.get("disk") is not None else None
    # purge_from empty: a forward proxy's clients are not its operators (no PURGE from them)
    return CacheConfig(enabled, max_size, max_object, ttl, (), disk)


@_part(lambda: None)
def _rate_limit(r: _Reader, raw: Any) -> UserRateLimit | None:
    """rate_limit: {rate: 20/s, burst: 40}: requests (and CONNECTs) per user."""
    if raw is None:
        return None
    path = ("rate_limit",)
    spec = r.mapping(raw, path, {"rate", "burst"})
    if "rate" not in spec:
        raise r.doc.error(path, "rate_limit needs a rate like 20/s")
    rate = r.convert(parse_rate, spec["rate"], path + ("rate",))
    return UserRateLimit(rate, _whole(r, spec, "burst", path, max(1, round(rate)), 10**6))

