"""Request-head rules of RFC 9110/9112/9113 the edge enforces before anything else looks at a
request, and the one framing each forwarded request gets. Pure: bytes in, verdicts out.

Every rule exists because two parsers could read the same bytes two ways: the edge (mitmproxy)
one way, the origin another. A request that could mean two things is refused, not repaired,
except where the RFC says how to repair it (the absolute-form authority replaces Host).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

Fields = tuple[tuple[bytes, bytes], ...]

H1_VERSIONS = frozenset({b"HTTP/1.0", b"HTTP/1.1"})
H2_VERSION = b"HTTP/2.0"
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")           # RFC 9110 5.6.2
_TOKENS = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?:\x00[!#$%&'*+\-.^_`|~0-9A-Za-z]+)*\Z")   # NUL-joined
_LOWER = re.compile(rb"[a-z]")
# RFC 9110 5.5: a field value is visible characters, SP, HTAB and obs-text; nothing else
_BAD_VALUE_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# a request target: no controls, no SP (it would split the request line upstream), no DEL
_BAD_TARGET_BYTE = re.compile(rb"[\x00-\x20\x7f]")
# Host and the absolute-form authority: a DNS-style name, an IPv4 address or an [IPv6] literal,
# with an optional port. Stricter than RFC 3986's reg-name (no sub-delims, no %-escapes): a
# comma or semicolon in a Host would reach X-Forwarded-Host, Forwarded and the cache key.
_AUTHORITY = re.compile(rb"(?:[A-Za-z0-9_~-]+(?:\.[A-Za-z0-9_~-]+)*\.?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?\Z")
_CHUNKED_LAST = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+[ \t]*,[ \t]*)*chunked\Z", re.I)


@dataclass(frozen=True)
class Refusal:
    status: int         # 400, or 505 for an HTTP version the edge does not speak
    reason: str         # for the client: fixed text, nothing of the input echoed
    detail: str         # for the trace: may name the field at fault


def _field(name: bytes) -> str:
    return name[:40].decode("latin-1")


def _value_problem(value: bytes) -> str | None:
    bad = _BAD_VALUE_BYTE.search(value)
    if bad is None:
        return None
    if b"\n" in value:
        return "obsolete line folding"         # mitmproxy joins a folded line with CRLF SP
    return {b"\r": "a bare CR", b"\x00": "a NUL"}.get(bad[0], "a control character")


def check_request(method: bytes, target: bytes, authority: bytes, version: bytes, fields: Fields,
                  *, h2: bool) -> Refusal | None:
    """Why this request head must be refused, or None. `target` is the path (origin-form, or
    the path part of an absolute-form target), `authority` the absolute-form authority (HTTP/1)
    or :authority (HTTP/2), empty when there is none; `h2`: it came over HTTP/2."""
    if version not in ({H2_VERSION} if h2 else H1_VERSIONS):
        return Refusal(505, "HTTP version not supported", f"version {version[:16]!r}")
    if not _TOKEN.match(method):
        return Refusal(400, "invalid request method", "method is not a token")
    # Method names are case-sensitive (RFC 9110 9.1), so `purge` is not PURGE; but mitmproxy's
    # own framing compares them case-insensitively (an answer to `head` is read as bodiless)
    # and origins disagree (nginx and Node refuse `get`, Werkzeug upper-cases it into GET).
    # Refused, as nginx does, rather than forwarded with two meanings (browsers upper-case the
    # methods fetch normalises; a script's `patch` goes as written and nginx refuses it too).
    if _LOWER.search(method):
        return Refusal(400, "unknown request method (method names are case-sensitive)",
                       f"lower-case method {method[:16].decode('latin-1')}")
    if b"#" in target:
        return Refusal(400, "a fragment is not allowed in the request target", "fragment in target")
    if _BAD_TARGET_BYTE.search(target) or not (target.startswith(b"/") or (target == b"*" and method == b"OPTIONS")):
        return Refusal(400, "invalid request target", "target is not origin-form")
    names, values = b"\x00".join(k for k, _ in fields), b"\t".join(v for _, v in fields)
    if (fields and not _TOKENS.match(names)) or _BAD_VALUE_BYTE.search(values):     # one look at all
        for name, value in fields:                                                  # then: which one
            if not _TOKEN.match(name):
                return Refusal(400, "invalid header field name", "field name is not a token")
            problem = _value_problem(value)
            if problem is not None:
                return Refusal(400, f"{problem} in a header field value is not allowed",
                               f"{problem} in {_field(name)}")
    return _check_host(authority, version, fields, h2) or _check_framing(version, fields, h2)


def _values(fields: Fields, name: bytes) -> list[bytes]:
    return [v for k, v in fields if k.lower() == name]


def _check_host(authority: bytes, version: bytes, fields: Fields, h2: bool) -> Refusal | None:
    """RFC 9112 3.2: one Host in every HTTP/1.1 request, never two (HTTP/1.0 may have none);
    RFC 9113 8.3.1: :authority or Host, the same if both."""
    hosts = _values(fields, b"host")
    if len(hosts) > 1:
        return Refusal(400, "more than one Host header", "repeated Host")
    if not hosts and not authority and version != b"HTTP/1.0":
        return Refusal(400, "missing Host header", "no Host")
    if not h2 and authority and not hosts and version == b"HTTP/1.1":
        return Refusal(400, "missing Host header", "absolute-form without Host")
    if authority and not _AUTHORITY.match(authority):
        return Refusal(400, "invalid request target", "invalid authority in target")
    if h2 and hosts and authority and hosts[0] != authority:
        return Refusal(400, ":authority and Host differ", "Host differs from :authority")
    if hosts and not (authority and not h2) and not _AUTHORITY.match(hosts[0]):
        return Refusal(400, "invalid Host header", "invalid Host")
    return None


def _check_framing(version: bytes, fields: Fields, h2: bool) -> Refusal | None:
    """RFC 9112 6.1-6.3: one framing a recipient cannot read two ways. mitmproxy checks most
    of this too, unless its validate_inbound_headers option is switched off."""
    te, cl = _values(fields, b"transfer-encoding"), _values(fields, b"content-length")
    if te and (h2 or version != b"HTTP/1.1"):
        return Refusal(400, "Transfer-Encoding is not allowed here", f"Transfer-Encoding in {version.decode()}")
    if te and cl:
        return Refusal(400, "Content-Length and Transfer-Encoding together", "Content-Length with Transfer-Encoding")
    if len(te) > 1 or (te and (not _CHUNKED_LAST.match(te[0]) or te[0].lower().count(b"chunked") > 1)):
        return Refusal(400, "invalid Transfer-Encoding", "Transfer-Encoding does not end in one chunked")
    if len(cl) > 1 or (cl and not cl[0].isdigit()):
        return Refusal(400, "invalid Content-Length", "repeated or non-numeric Content-Length")
    return None


def host_from_target(authority: bytes, fields: Fields) -> Fields:
    """RFC 9112 3.2.2: for an absolute-form target, its authority replaces the Host field (in
    place, so the order of fields is kept)."""
    return tuple((k, authority) if k.lower() == b"host" else (k, v) for k, v in fields)


def closes(version: bytes, fields: Fields) -> bool:
    """Does the connection end after the answer to this request (RFC 9112 9.3)? When the
    client says `close`, and always for HTTP/1.0: its keep-alive is a Connection option, which
    the scrub removes as hop-by-hop, so mitmproxy closes those connections."""
    tokens = {t.strip().lower() for v in _values(fields, b"connection") for t in v.split(b",")}
    return b"close" in tokens or version == b"HTTP/1.0"


def http1_fields(fields: Fields, authority: bytes) -> Fields:
    """An HTTP/2 request's fields for HTTP/1.1: Host from :authority when it has none, and its
    Cookie fields joined into one (HTTP/2 splits them; RFC 9113 8.2.3)."""
    cookies = _values(fields, b"cookie")
    out: list[tuple[bytes, bytes]] = [(b"Host", authority)] if authority and not _values(fields, b"host") else []
    joined = False
    for name, value in fields:
        if len(cookies) > 1 and name.lower() == b"cookie":
            if not joined:
                out.append((name, b"; ".join(cookies)))
                joined = True
            continue
        out.append((name, value))
    return tuple(out)


def declared_length(fields: Fields) -> int | None:
    """The one valid Content-Length, or None."""
    cl = _values(fields, b"content-length")
    return int(cl[0]) if len(cl) == 1 and cl[0].isdigit() else None


def framed(fields: Fields, *, has_body: bool, length: int | None) -> tuple[Fields, bool]:
    """The request's fields with exactly one framing for an HTTP/1.1 origin, and whether the
    body is to be sent chunked. `has_body`: content follows the head; `length`: how many
    bytes exactly, when known (a buffered body, or a stream whose Content-Length holds).

    The client's chunked coding is kept (Content-Length beside it dropped, RFC 9112 6.3); a
    body of known length is sent with that one Content-Length; one whose length is not known
    yet (an HTTP/2 stream without content-length) goes chunked; no body, no framing (or a
    Content-Length of 0, never a length that no bytes follow). Without this an HTTP/2 body
    with no content-length reached the origin unframed, to be read as further requests."""
    rest = tuple(f for f in fields if f[0].lower() != b"content-length")
    if _values(fields, b"transfer-encoding"):
        return rest, True
    cl = _values(fields, b"content-length")
    if not has_body:
        length = 0                  # whatever a Content-Length said (a re-sent stream has no body left)
    if length is None:
        return rest + ((b"Transfer-Encoding", b"chunked"),), True
    if cl == [str(length).encode()] or (length == 0 and not cl):
        return fields, False
    return rest + ((b"Content-Length", str(length).encode()),), False
