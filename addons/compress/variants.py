"""The codings of one stored response: which representation each client gets, and the fields
and bytes of one the edge makes from the origin's. Pure: no mitmproxy.

The cache keeps the origin's representation once (the base) and each coding made from it as its
own entry (a variant), so one origin fetch serves every coding and a hit never encodes again.
The origin is asked for identity; one that sends a coding anyway is respected: its bytes go to
every client that accepts that coding, and only the others get it decoded (never re-encoded into
another coding, never encoded twice)."""

from __future__ import annotations

from collections.abc import Mapping

from addons.compress.negotiate import accepted, compressible, encode, weak_etag
from addons.scrub.masking import decoded

Fields = tuple[tuple[bytes, bytes], ...]
THREAD_MIN = 64 * 1024      # bodies from this size are encoded off the event loop (br: ~3 ms per 64 KiB)
VARIANT = "edge/"           # the Accept-Encoding a variant entry is selected by: "edge/br"
DECODE_MAX = 32 << 20       # an origin's coding is undone only up to this size (a 40 KB gzip can hold 40 MB)
DECODABLE = frozenset({"gzip", "br", "zstd"})
_REPLACED = frozenset({b"content-encoding", b"content-length", b"etag"})


def transformable(status: int, headers: Mapping[str, str], size: int, min_size: int) -> bool:
    """A 200 of a compressible type, not encoded yet, that the origin lets us transform."""
    return (status == 200 and size >= min_size and "content-encoding" not in headers
            and compressible(headers.get("content-type"))
            and "no-transform" not in headers.get("cache-control", "").lower())


def decodable(status: int, headers: Mapping[str, str]) -> bool:
    """A 200 of a compressible type the origin encoded itself, in a coding we can undo."""
    return (status == 200 and headers.get("content-encoding", "").strip().lower() in DECODABLE
            and compressible(headers.get("content-type"))
            and "no-transform" not in headers.get("cache-control", "").lower())


def acceptable(accept_encoding: str | None, coding: str) -> bool:
    """Does the client take this coding (RFC 9110 12.5.3)? No Accept-Encoding counts as
    identity only, as `choose` does: what curl and most tools without a flag can read."""
    prefs = accepted(accept_encoding)
    return prefs.get(coding, prefs.get("*", 0.0)) > 0


def plan(status: int, headers: Mapping[str, str], size: int, min_size: int, negotiated: str,
         accept_encoding: str | None) -> tuple[bool, str | None]:
    """Whether this response varies on Accept-Encoding at the edge, and the coding to make of
    it for this client (None: it is sent as it is). `negotiated` is `choose`'s answer."""
    own = headers.get("content-encoding")
    if own is None:
        if not transformable(status, headers, size, min_size):
            return False, None
        return True, None if negotiated == "identity" else negotiated
    if not decodable(status, headers):
        return False, None
    return True, None if acceptable(accept_encoding, own.strip().lower()) else "identity"


def represent(body: bytes, own: str | None, target: str) -> bytes | None:
    """`target` made from a body in coding `own`: encoded from identity, or decoded (None if
    it does not decode within DECODE_MAX)."""
    if target == "identity":
        return decoded(body, own, DECODE_MAX)
    return encode(body, target)


def with_accept_encoding(vary: str | None) -> str | None:
    """The Vary of a response the edge encodes per client; None when it already says so."""
    if vary and ("accept-encoding" in vary.lower() or "*" in vary):
        return None
    return f"{vary}, Accept-Encoding" if vary else "Accept-Encoding"


def encoded_fields(fields: Fields, coding: str, length: int) -> Fields:
    """The base's fields for its `coding` representation of `length` bytes: Content-Encoding
    (none for identity), Content-Length, and a weak ETag (the bytes are not the origin's)."""
    out = [(k, v) for k, v in fields if k.lower() not in _REPLACED]
    etag = next((v for k, v in fields if k.lower() == b"etag"), None)
    if etag is not None:
        out.append((b"ETag", weak_etag(etag.decode("latin-1")).encode("latin-1")))
    if coding != "identity":
        out.append((b"Content-Encoding", coding.encode()))
    out.append((b"Content-Length", str(length).encode()))
    return tuple(out)
