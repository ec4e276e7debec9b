"""The codings of one stored response: which responses the edge may encode, and the fields of
an encoded representation made from the origin's (identity) one. Pure: no mitmproxy.

The cache keeps the origin's representation once (the base) and each coding made from it as its
own entry (a variant), so one origin fetch serves every coding and a hit never encodes again."""

from __future__ import annotations

from collections.abc import Mapping

from addons.compress.negotiate import compressible, weak_etag

Fields = tuple[tuple[bytes, bytes], ...]
THREAD_MIN = 64 * 1024      # bodies from this size are encoded off the event loop (br: ~3 ms per 64 KiB)
VARIANT = "edge/"           # the Accept-Encoding a variant entry is selected by: "edge/br"
_REPLACED = frozenset({b"content-encoding", b"content-length", b"etag"})


def transformable(status: int, headers: Mapping[str, str], size: int, min_size: int) -> bool:
    """A 200 of a compressible type, not encoded yet, that the origin lets us transform."""
    return (status == 200 and size >= min_size and "content-encoding" not in headers
            and compressible(headers.get("content-type"))
            and "no-transform" not in headers.get("cache-control", "").lower())


def with_accept_encoding(vary: str | None) -> str | None:
    """The Vary of a response the edge encodes per client; None when it already says so."""
    if vary and ("accept-encoding" in vary.lower() or "*" in vary):
        return None
    return f"{vary}, Accept-Encoding" if vary else "Accept-Encoding"


def encoded_fields(fields: Fields, coding: str, length: int) -> Fields:
    """The base's fields for its `coding` representation of `length` bytes: Content-Encoding,
    Content-Length, and a weak ETag (the bytes are not the origin's), in the base's order."""
    out = [(k, v) for k, v in fields if k.lower() not in _REPLACED]
    etag = next((v for k, v in fields if k.lower() == b"etag"), None)
    if etag is not None:
        out.append((b"ETag", weak_etag(etag.decode("latin-1")).encode("latin-1")))
    out += [(b"Content-Encoding", coding.encode()), (b"Content-Length", str(length).encode())]
    return tuple(out)
