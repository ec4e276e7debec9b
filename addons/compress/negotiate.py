"""Which content coding a client gets (RFC 9110 12.5.3) and what is worth compressing. Pure."""

from __future__ import annotations

import re
import zlib
from functools import lru_cache

import brotli

try:
    from compression import zstd            # Python 3.14
except ImportError:                         # earlier: the backport mitmproxy also uses
    from backports import zstd

# Server preference when the client rates codings equally: best ratio for its cost first.
PREFERENCE = ("br", "zstd", "gzip")
COMPRESSIBLE_TYPES = frozenset({
    "application/json", "application/javascript", "application/ecmascript", "application/x-javascript",
    "application/xml", "application/xhtml+xml", "application/rss+xml", "application/atom+xml",
    "application/manifest+json", "application/ld+json", "application/wasm", "image/svg+xml",
    "image/x-icon", "font/ttf", "font/otf"})
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_QVALUE = re.compile(r"q\s*=\s*(0(?:\.\d{0,3})?|1(?:\.0{0,3})?)", re.IGNORECASE)


def accepted(accept_encoding: str | None) -> dict[str, float]:
    """Codings (lower case) with their q-values; malformed members are skipped."""
    out: dict[str, float] = {}
    for member in (accept_encoding or "").split(","):
        coding, *params = (p.strip() for p in member.split(";"))
        if not _TOKEN.fullmatch(coding):
            continue
        q = 1.0
        for param in params:
            if m := _QVALUE.fullmatch(param):
                q = float(m[1])
        out.setdefault(coding.lower(), q)
    return out


@lru_cache(maxsize=4096)     # a handful of distinct Accept-Encoding values serve most clients
def choose(accept_encoding: str | None, offered: tuple[str, ...] = PREFERENCE) -> str | None:
    """The coding to send: the client's highest-rated one we offer (ties go to our order);
    `*` stands for codings the client did not name. None means identity."""
    prefs = accepted(accept_encoding)
    star = prefs.get("*")
    best, best_q = None, 0.0
    for coding in offered:
        q = prefs.get(coding, star if star is not None else 0.0)
        if q > best_q:
            best, best_q = coding, q
    return best


def compressible(content_type: str | None) -> bool:
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    return mime.startswith("text/") or mime in COMPRESSIBLE_TYPES or mime.endswith(("+json", "+xml"))


def encode(body: bytes, coding: str) -> bytes:
    """Levels for a cache that compresses once and serves many times: better ratio than
    mitmproxy's interception defaults (br 0, zstd 1), still fast enough per miss."""
    if coding == "br":
        return brotli.compress(body, quality=5)
    if coding == "zstd":
        return zstd.compress(body, level=3)
    if coding == "gzip":
        c = zlib.compressobj(6, zlib.DEFLATED, 31)
        return c.compress(body) + c.flush()
    raise ValueError(f"unknown coding {coding!r}")


def weak_etag(etag: str) -> str:
    """A compressed body is not byte-identical to the origin's: its validator becomes weak."""
    return etag if etag.startswith("W/") else f"W/{etag}"
