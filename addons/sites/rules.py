"""What a site does to the messages it answers, as plain functions on header fields: the
header rules (remove, set, add), the https redirect's Location, HSTS. Pure (no mitmproxy)."""

from __future__ import annotations

from addons.config import HeaderRules

Fields = tuple[tuple[bytes, bytes], ...]
CHALLENGE = "/.well-known/acme-challenge/"      # HTTP-01: answered over plain HTTP, never redirected


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
    return site_redirects and not tls and method != "PURGE" and not path.startswith(CHALLENGE)


def hsts_field(value: str | None, tls: bool) -> str | None:
    """Strict-Transport-Security is only meaningful (RFC 6797 7.2: only sent) over TLS."""
    return value if value is not None and tls else None
