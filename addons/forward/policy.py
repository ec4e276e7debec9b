"""The forward proxy's decisions, pure: which rule a request matches, whether a tunnel is
decrypted, who may use the proxy, what the activity log says, what a block page shows.

The policy is a list of rules, first match wins (Squid's http_access, Cloudflare Gateway's
order): a rule matches by group (of the authenticated user) and/or list (a domain list naming
the host, or for a decrypted or plain-HTTP request its URL), and says allow, block, log
(allowed, marked in the activity log as watched) or intercept (the tunnel is decrypted so each
request inside is decided and logged with its URL). A block rule with `intercept: true`
answers HTTPS with a block page inside TLS (the client must trust the edge's CA); without it a
blocked CONNECT is refused before any TLS. Nothing matched: blocked (fail closed).
"""

from __future__ import annotations

import datetime
import html
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ACTIONS = ("allow", "block", "log", "intercept")


@dataclass(frozen=True)
class Rule:
    index: int
    action: str
    group: str | None = None
    list: str | None = None
    intercept: bool = False          # block rules: the block page inside TLS

    @property
    def name(self) -> str:
        return f"policy[{self.index}]"


@dataclass(frozen=True)
class Decision:
    action: str
    rule: Rule | None                # None: no rule matched (blocked)
    category: str | None             # the matched rule's list
    group: str | None                # the user's group the decision is for

    @property
    def decrypts(self) -> bool:
        """Does this decision need the tunnel decrypted (before `never` and the CA are asked)?"""
        return self.action == "intercept" or (self.action == "block" and self.rule is not None and self.rule.intercept)

    @property
    def blocked(self) -> bool:
        return self.action == "block"

    @property
    def rule_name(self) -> str | None:
        return self.rule.name if self.rule is not None else None

    def reason(self) -> str:
        """What a block says: the rule, and the list that named the site."""
        if self.rule is None:
            return "no policy rule allows this site"
        return f"blocked by {self.rule.name}" + (f" (list {self.category})" if self.category else "")


def groups_of(user: str | None, groups: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """The groups a user is in, in config order: those listing the name, and those listing
    "*" (every authenticated user). Nobody is in a group without authentication."""
    if user is None:
        return ()
    return tuple(name for name, members in groups.items() if user in members or "*" in members)


def decide(rules: Sequence[Rule], lists: Mapping, host: str, url: str | None, groups: Sequence[str]) -> Decision:
    """The first rule matching this host (and URL, when the request is readable) for a user
    in `groups`."""
    host = host.lower().rstrip(".")
    for rule in rules:
        if rule.group is not None and rule.group not in groups:
            continue
        if rule.list is not None and not lists[rule.list].matches(host, url):
            continue
        return Decision(rule.action, rule, rule.list, rule.group or (groups[0] if groups else None))
    return Decision("block", None, None, groups[0] if groups else None)


def stricter(first: Decision, second: Decision) -> Decision:
    """Two names for one tunnel (the CONNECT's host and the ClientHello's SNI): a block of
    either stands, else the first."""
    return second if second.blocked and not first.blocked else first


def never_decrypted(host: str, never: Sequence[str]) -> bool:
    """`bank.example` covers it and its subdomains; `*.health.example` its subdomains only."""
    host = host.lower().rstrip(".")
    for pattern in never:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]):
                return True
        elif host == pattern or host.endswith("." + pattern):
            return True
    return False


def client_allowed(ip: str, networks: Sequence) -> bool:
    """May this client address use the proxy (allow_clients)? An address that does not parse
    may not."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == net.version and address in net for net in networks)


def is_own_address(host: str, port: int, listen: tuple[str, int], resolved: Sequence[str] = ()) -> bool:
    """Is host:port the proxy itself (a request to it would loop)? `resolved`: the addresses
    the host name resolves to, when known. A wildcard listener is every local address; only
    loopback ones are recognised without asking the system."""
    listen_host, listen_port = listen
    if port != listen_port:
        return False
    candidates = [host.strip("[]").lower(), *resolved]
    if "localhost" in candidates:
        candidates.append("127.0.0.1")
    try:
        own = ipaddress.ip_address(listen_host.strip("[]"))
    except ValueError:
        own = None
    for candidate in candidates:
        try:
            address = ipaddress.ip_address(candidate)
        except ValueError:
            continue
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if own is None or own.is_unspecified:
            if address.is_loopback or address.is_unspecified:
                return True
        elif address == own or (address.is_unspecified and own.is_loopback):    # 0.0.0.0 reaches this host
            return True
    return False

def without_h3(alt_svc: str) -> str | None:
    """An Alt-Svc value without its HTTP/3 (QUIC) alternatives, so browsers stay on TCP
    through the proxy where the policy applies; None when nothing is left."""
    kept = []
    for entry in alt_svc.split(","):
        protocol = entry.strip().split("=", 1)[0].strip().lower()
        if not protocol or protocol == "h3" or protocol.startswith(("h3-", "quic")):
            continue
        kept.append(entry.strip())
    return ", ".join(kept) or None


def activity_line(*, when: float, user: str | None, group: str | None, client: str, method: str, host: str,
                  port: int, url: str | None, scheme: str, decision: Decision | None, status: int | None,
                  bytes_in: int, bytes_out: int, duration: float, cache: str | None) -> dict:
    """One activity-log record, with exactly the fields the report reads."""
    stamp = datetime.datetime.fromtimestamp(when, datetime.timezone.utc)
    return {
        "time": stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z",
        "user": user, "group": group, "client": client, "method": method, "host": host, "port": port,
        "url": url, "scheme": scheme,
        "category": decision.category if decision is not None else None,
        "rule": decision.rule_name if decision is not None else None,
        "action": decision.action if decision is not None else "block",
        "status": status, "bytes_in": bytes_in, "bytes_out": bytes_out,
        "duration_ms": round(duration * 1000, 3), "cache": cache,
    }


def block_page(host: str, url: str | None, decision: Decision, request_id: str) -> bytes:
    """The HTML a blocked plain-HTTP or decrypted request gets: the site, the rule, the list."""
    what = html.escape(url or host)
    rule = html.escape(decision.rule_name or "no matching rule")
    category = f"<p>List: <b>{html.escape(decision.category)}</b></p>" if decision.category else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Blocked: "
        f"{html.escape(host)}</title><style>body{{font:16px system-ui,sans-serif;max-width:40em;margin:4em auto;"
        "color:#222}}h1{{color:#b00020}}code{{background:#eee;padding:0 .2em}}</style></head><body>"
        f"<h1>This site is blocked</h1><p>The organisation's proxy does not allow <code>{what}</code>.</p>"
        f"<p>Rule: <b>{rule}</b></p>{category}<p>{html.escape(decision.reason())}.</p>"
        f"<p><small>request id: {html.escape(request_id)}</small></p></body></html>\n"
    ).encode()
