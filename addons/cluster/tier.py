"""The tiered cache's decisions, pure: which node of the cluster owns a cache key, and the
signed header a node sends its request to the owner with.

Ownership is weighted rendezvous hashing of the cache key over the live members' names (the
route balancer's `hash`, shared): every node with the same member list picks the same owner,
and a member joining or leaving moves only the keys it gains or had (about 1/N of them).

`Edge-Peer: <node>; t=<unix seconds>; client=<ip>; base=<scheme://host>; sig=<hex>` where sig
is HMAC-SHA256(secret) over `edge-peer/1`, node, t, client, base, method, authority and path,
one per line. The owner trusts, from a valid header only, the real client's address (its
shield, logs and X-Forwarded-For then name the client, not the peer) and the public base the
client used (so the owner keys its cache and answers as for the client: same scheme, same
host). A timestamp outside +-WINDOW seconds of the owner's clock is refused: a captured header
is good for WINDOW seconds, for that very method, authority and path only."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from addons.route.balance import rendezvous

HEADER = "Edge-Peer"
WINDOW = 60.0                   # seconds a signature is accepted around its timestamp
_TOKEN = re.compile(r"[!-~]{1,255}")            # visible ASCII: node names, addresses, bases
_VALUE = re.compile(r"\s*([a-z]+)=([^;\s]*)\s*")
_SIG = re.compile(r"[0-9a-f]{64}")


class MemberLike(Protocol):
    name: str
    host: str
    port: int


M = TypeVar("M", bound=MemberLike)


@dataclass(frozen=True)
class Peer:
    """A member of a static `cluster.peers` list."""
    name: str
    host: str
    port: int


@dataclass(frozen=True)
class Claim:
    """What a valid Edge-Peer header says: who sent it, for which client and public base."""
    node: str
    client: str
    base: str


def owner(key: str, members: Sequence[M], usable: Callable[[M], bool] | None = None) -> M | None:
    """The member that owns `key` among `members` that `usable` accepts (None: none is)."""
    return rendezvous(key, [(m, getattr(m, "weight", 1)) for m in members], lambda m: m.name, usable)


def _message(node: str, t: int, client: str, base: str, method: str, authority: str, path: str) -> bytes:
    return "\n".join(("edge-peer/1", node, str(t), client, base, method, authority, path)).encode(
        "utf-8", "surrogateescape")


def _mac(secret: bytes, message: bytes) -> str:
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign(secret: bytes, node: str, client: str, base: str, method: str, authority: str, path: str,
         now: float) -> str | None:
    """The Edge-Peer value for this request, or None if a part cannot travel in it (a value
    with a separator or space: such a request goes to the origin, unsigned)."""
    if not all(_TOKEN.fullmatch(v) and ";" not in v and "," not in v for v in (node, client, base)):
        return None
    t = int(now)
    sig = _mac(secret, _message(node, t, client, base, method, authority, path))
    return f"{node}; t={t}; client={client}; base={base}; sig={sig}"


def verify(secret: bytes | None, value: str, method: str, authority: str, path: str, now: float) -> Claim | None:
    """The claim of a valid header for this request; None for anything else (no secret, a
    malformed value, a timestamp out of the window, a signature that does not match). The
    signatures are compared in constant time."""
    if not secret or len(value) > 2048:
        return None
    node, _, rest = value.partition(";")
    node = node.strip()
    parts: dict[str, str] = {}
    for item in rest.split(";"):
        m = _VALUE.fullmatch(item)
        if m is None or m[1] in parts:
            return None
        parts[m[1]] = m[2]
    if set(parts) != {"t", "client", "base", "sig"} or not _TOKEN.fullmatch(node) or not parts["t"].isdigit():
        return None
    t = int(parts["t"])
    if abs(now - t) > WINDOW or not _SIG.fullmatch(parts["sig"]):
        return None
    expected = _mac(secret, _message(node, t, parts["client"], parts["base"], method, authority, path))
    if not hmac.compare_digest(expected, parts["sig"]):
        return None
    return Claim(node, parts["client"], parts["base"])


def why_not_shared(method: str, request: dict[str, str], tls: bool, site, route) -> str | None:
    """Why a cache miss goes to the origin rather than to its owner node, or None when it may
    go to the owner. `request`: lower-case field names to values; `site`, `route`: the Site and
    SiteRoute (addons/sites) or None. Only what every node would store alike is shared: a
    plain GET/HEAD, without credentials, validators, a range or an upgrade, on a route whose
    answers the node's own answer rules would not change twice."""
    if method not in ("GET", "HEAD"):
        return "method"
    if "authorization" in request or "upgrade" in request or "range" in request:
        return "request"
    if "if-none-match" in request or "if-modified-since" in request:
        return "conditional"
    directives = {d.strip().split("=", 1)[0].lower() for d in request.get("cache-control", "").split(",")}
    if directives & {"no-store", "no-cache"}:
        return "no-store"
    if route is not None and (route.strip_prefix or route.origin_path):
        return "rewritten paths"            # the owner's answer has the client's Location already
    if site is not None and (site.response_headers.add or (tls and site.https_redirect)):
        return "site rules"                 # added twice; the owner (plain HTTP) would redirect
    return None
