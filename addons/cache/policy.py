"""RFC 9111 (HTTP caching) rules for a shared cache, with RFC 9213 (CDN-Cache-Control) and
RFC 9211 (Cache-Status). Pure: header values in, decisions out; no mitmproxy imports.

Headers are passed as plain mappings of lower-case name -> value (repeated fields joined
with ", "), the way RFC 9110 5.3 combines them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from urllib.parse import unquote

Headers = Mapping[str, str]

# RFC 9110 15.1: "heuristically cacheable" status codes (206 is left out: we store full responses).
CACHEABLE_BY_DEFAULT = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
# RFC 9110 9.2.1: safe methods never invalidate.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
HEURISTIC_FRACTION = 0.1            # RFC 9111 4.2.2: "10% of the interval since Last-Modified"
HEURISTIC_MAX = 24 * 3600.0         # and never more than a day on a guess
# Headers a 304 must not replace in the stored response (RFC 9111 3.2).
NOT_UPDATED_BY_304 = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "te",
                                "trailer", "upgrade"})

_DIRECTIVE = re.compile(r'\s*([^\s=,]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^,]*))?\s*(?:,|$)')


def parse_directives(value: str | None) -> dict[str, str | None]:
    """A Cache-Control style list: names lower-cased, quoted values unquoted. The first
    occurrence of a directive wins."""
    out: dict[str, str | None] = {}
    if not value:
        return out
    for m in _DIRECTIVE.finditer(value):
        name, arg = m[1].lower(), m[2]
        if arg is not None:
            arg = arg.strip()
            if arg.startswith('"') and arg.endswith('"') and len(arg) >= 2:
                arg = re.sub(r"\\(.)", r"\1", arg[1:-1])
        out.setdefault(name, arg)
    return out


_SF_KEY = r"[a-z*][a-z0-9_\-.*]*"
_SF_BARE = r'-?\d{1,15}(?:\.\d{1,3})?|"(?:[^"\\\x00-\x1f\x7f]|\\["\\])*"|[A-Za-z*][!#$%&\'*+\-.^_`|~:/\w]*|\?[01]'
_SF_PARAMS = rf"(?:;\s*{_SF_KEY}(?:=(?:{_SF_BARE}))?)*"
_SF_MEMBER = re.compile(rf"({_SF_KEY})(?:=({_SF_BARE}))?{_SF_PARAMS}")
_INTEGER_DIRECTIVES = frozenset({"max-age", "s-maxage", "stale-while-revalidate", "stale-if-error"})


def parse_targeted(value: str | None) -> dict[str, str | None] | None:
    """A targeted cache-control field (RFC 9213) as an RFC 8941 Dictionary: None when absent
    or invalid. Time directives must be Integers; a Boolean true is a bare directive."""
    if value is None:
        return None
    out: dict[str, str | None] = {}
    for member in value.split(","):
        m = _SF_MEMBER.fullmatch(member.strip(" \t"))
        if m is None:
            return None
        name, arg = m[1], m[2]
        if name in _INTEGER_DIRECTIVES and (arg is None or not re.fullmatch(r"\d{1,15}", arg)):
            return None
        if arg == "?0":
            continue
        out[name] = None if arg in (None, "?1") else arg.strip('"')
    return out or None


def delta_seconds(value: str | None) -> int | None:
    """RFC 9111 1.2.2: a non-negative integer; anything else is invalid (None)."""
    if value is None or not value.isdigit():
        return None
    return min(int(value), 2**31)


_MONTHS = {m: i for i, m in enumerate("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), 1)}
_DAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_MON = r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = r"(\d{2}):(\d{2}):(\d{2})"
_IMF_FIXDATE = re.compile(rf"{_DAY}, (\d{{2}}) {_MON} (\d{{4}}) {_TIME} GMT")
_RFC850 = re.compile(rf"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), (\d{{2}})-{_MON}-(\d{{2}}) {_TIME} GMT")
_ASCTIME = re.compile(rf"{_DAY} {_MON} ([ \d]\d) {_TIME} (\d{{4}})")


def http_date(value: str | None) -> float | None:
    """RFC 9110 5.6.7: IMF-fixdate, or the obsolete RFC 850 and asctime forms; anything else
    (other spellings Python's lenient parser would take) is invalid: None."""
    if not value:
        return None
    value = value.strip()
    if m := _IMF_FIXDATE.fullmatch(value):
        day, mon, year, hh, mm, ss = m.groups()
    elif m := _RFC850.fullmatch(value):
        day, mon, yy, hh, mm, ss = m.groups()
        year = str(2000 + int(yy) if int(yy) < 70 else 1900 + int(yy))
    elif m := _ASCTIME.fullmatch(value):
        mon, day, hh, mm, ss, year = m.groups()
    else:
        return None
    try:
        return datetime(int(year), _MONTHS[mon], int(day), int(hh), int(mm), int(ss), tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


def field_names(value: str | None) -> list[str]:
    return [n.strip().lower() for n in (value or "").split(",") if n.strip()]


@dataclass
class ResponseRules:
    """What a response says about caching, read once when it is stored or validated."""
    cc: dict[str, str | None]
    targeted: bool              # CDN-Cache-Control was present and used instead of Cache-Control

    @classmethod
    def read(cls, headers: Headers) -> ResponseRules:
        """RFC 9213: a valid CDN-Cache-Control replaces Cache-Control for this cache; an
        invalid one (not a Structured Field Dictionary of the right types) is ignored."""
        targeted = parse_targeted(headers.get("cdn-cache-control"))
        if targeted is not None:
            return cls(targeted, True)
        return cls(parse_directives(headers.get("cache-control")), False)

    def has(self, name: str) -> bool:
        return name in self.cc

    def seconds(self, name: str) -> int | None:
        return delta_seconds(self.cc.get(name))

    @property
    def must_revalidate_when_stale(self) -> bool:
        """must-revalidate, proxy-revalidate and s-maxage (RFC 9111 5.2.2.10) forbid stale use."""
        return any(d in self.cc for d in ("must-revalidate", "proxy-revalidate", "s-maxage"))

    @property
    def always_revalidate(self) -> bool:
        """no-cache without field names: every use needs the origin's consent."""
        return "no-cache" in self.cc and not self.cc["no-cache"]


def freshness_lifetime(status: int, headers: Headers, rules: ResponseRules, response_time: float,
                       default_ttl: float | None = None, guess: bool = True) -> float:
    """RFC 9111 4.2.1 for a shared cache: s-maxage, then max-age, then Expires - Date, then a
    heuristic (4.2.2) where allowed, or default_ttl in its place; `guess=False` (see
    `guess_refused`) allows neither. Seconds; 0 means stale on arrival."""
    for name in ("s-maxage", "max-age"):
        if rules.has(name):
            value = rules.seconds(name)
            return float(value) if value is not None else 0.0
    if not rules.targeted and "expires" in headers:
        expires = http_date(headers["expires"])
        if expires is None:
            return 0.0                      # an invalid Expires means "already expired"
        date = http_date(headers.get("date")) or response_time
        return max(0.0, expires - date)
    heuristic_allowed = status in CACHEABLE_BY_DEFAULT or rules.has("public")
    if not heuristic_allowed or not guess:
        return 0.0
    if default_ttl is not None:
        return float(default_ttl)
    last_modified = http_date(headers.get("last-modified"))
    if last_modified is None:
        return 0.0
    date = http_date(headers.get("date")) or response_time
    return min(HEURISTIC_MAX, max(0.0, (date - last_modified) * HEURISTIC_FRACTION))


def unstorable_fields(headers: Headers, rules: ResponseRules) -> set[str]:
    """Fields a shared cache must not keep (RFC 9111 3.1, 5.2.2.4, 5.2.2.7): those the
    Connection header names, and those named by qualified no-cache and private."""
    names = set(field_names(headers.get("connection")))
    for directive in ("no-cache", "private"):
        names.update(field_names(rules.cc.get(directive)))
    return names


def has_validator(headers: Headers) -> bool:
    return "etag" in headers or "last-modified" in headers


def storable(method: str, status: int, request: Headers, headers: Headers, rules: ResponseRules) -> str | None:
    """RFC 9111 3 for a shared cache. None if the response may be stored, else why not.
    (Whether it is worth storing depends on its lifetime: see `reusable`.)"""
    if method != "GET":
        return "method"
    if status < 200 or status in (206, 304) or status >= 600:
        return "status"
    req_cc = parse_directives(request.get("cache-control"))
    if "no-store" in req_cc or rules.has("no-store"):
        return "no-store"
    if rules.has("private") and not rules.cc["private"]:
        return "private"              # qualified private="field" only keeps those fields out
    if "authorization" in request and not any(rules.has(d) for d in ("must-revalidate", "public", "s-maxage")):
        return "authorization"
    if "*" in field_names(headers.get("vary")):
        return "vary-star"
    explicit = any(rules.has(d) for d in ("max-age", "s-maxage", "public")) or \
        (not rules.targeted and "expires" in headers)
    if not explicit and status not in CACHEABLE_BY_DEFAULT:
        return "status"
    return None


def reusable(lifetime: float, headers: Headers, rules: ResponseRules) -> bool:
    """Could a stored copy ever answer without the origin's full response? Not without
    freshness, a validator or a stale-* allowance: such a response is not worth storing."""
    return lifetime > 0 or has_validator(headers) or rules.has("stale-while-revalidate") \
        or rules.has("stale-if-error")


def age_seconds(value: str | None) -> int:
    """An Age value: the first of repeated values; an invalid one ("7200.0", "abc") is ignored."""
    return delta_seconds((value or "").split(",", 1)[0].strip()) or 0


def initial_age(date: float | None, age_header: str | None, request_time: float, response_time: float) -> float:
    """RFC 9111 4.2.3 corrected_initial_age: how old the response was when it arrived."""
    apparent_age = max(0.0, response_time - date) if date is not None else 0.0
    corrected_age_value = age_seconds(age_header) + (response_time - request_time)
    return max(apparent_age, corrected_age_value)



# -- safety rules beyond RFC 9111 -----------------------------------------------------------------
# RFC 9111 lets a shared cache guess a lifetime (heuristic freshness; our default_ttl stands
# for a guess) for any response. Varnish's builtin.vcl and Cloudflare's Cache Deception Armor
# refuse to in the cases below; each rule names the attack it stops.

def has_content(request: Headers) -> bool:
    """A GET/HEAD whose framing announces content (RFC 9110 9.3.1: it has no defined meaning).
    Stops the "fat GET": an origin that reads parameters from the body (Rails, PHP, Express)
    answers for the body while the cache would store that answer under the body-less URL for
    everyone. Such a request bypasses the cache both ways (Varnish strips the body instead,
    which breaks the APIs that use one; nginx forwards it and caches the answer)."""
    length = request.get("content-length")
    return "transfer-encoding" in request or (length is not None and length.strip() not in ("", "0"))


def explicitly_fresh(headers: Headers, rules: ResponseRules) -> bool:
    """The origin gave this cache a freshness lifetime or said `public` (s-maxage, max-age,
    public, Expires; CDN-Cache-Control's own). Only then does RFC 9111 apply unguarded."""
    return any(rules.has(d) for d in ("s-maxage", "max-age", "public")) or \
        (not rules.targeted and "expires" in headers)


# The type a URL's extension promises, for the extensions caches treat as static (Cloudflare's
# default cached list, a subset): extension -> acceptable media types. Binary kinds also accept
# application/octet-stream, which servers use for files they cannot type.
_TYPES = {
    "css": ("text/css",),
    "js": ("text/javascript", "application/javascript", "application/x-javascript", "application/ecmascript"),
    "mjs": ("text/javascript", "application/javascript"),
    "json": ("application/json",), "xml": ("application/xml", "text/xml"), "txt": ("text/plain",),
    "csv": ("text/csv", "text/plain"), "svg": ("image/svg+xml",), "html": ("text/html",), "htm": ("text/html",),
}
_BINARY = {
    "png": ("image/png",), "jpg": ("image/jpeg",), "jpeg": ("image/jpeg",), "gif": ("image/gif",),
    "webp": ("image/webp",), "avif": ("image/avif",), "bmp": ("image/bmp",), "tif": ("image/tiff",),
    "tiff": ("image/tiff",), "ico": ("image/x-icon", "image/vnd.microsoft.icon"),
    "woff": ("font/woff", "application/font-woff"), "woff2": ("font/woff2",),
    "ttf": ("font/ttf", "font/sfnt", "application/x-font-ttf"), "otf": ("font/otf", "font/sfnt"),
    "eot": ("application/vnd.ms-fontobject",), "mp3": ("audio/mpeg",), "mp4": ("video/mp4",),
    "webm": ("video/webm", "audio/webm"), "ogg": ("audio/ogg", "video/ogg", "application/ogg"),
    "flac": ("audio/flac",), "pdf": ("application/pdf",), "zip": ("application/zip",),
    "gz": ("application/gzip", "application/x-gzip"), "zst": ("application/zstd",),
    "wasm": ("application/wasm",),
}
EXTENSION_TYPES = {**_TYPES, **{ext: (*types, "application/octet-stream") for ext, types in _BINARY.items()}}


def extension_contradicted(path: str, content_type: str | None) -> bool:
    """The URL ends in a known static extension (percent-decoded, before any query or path
    parameter) and the response's Content-Type is another type, or absent. Stops web cache
    deception: `/account.php/x/nonexistent.css` reaches the account page (path info, or a
    router that ignores the tail) and its answer would be kept as a stylesheet for everyone
    (Cloudflare's Cache Deception Armor makes the same check)."""
    last = unquote(path.split("?", 1)[0]).rsplit("/", 1)[-1]
    ext = last.rsplit(".", 1)[1].split(";", 1)[0].lower() if "." in last else ""     # x.css;v=1: css
    accepted = EXTENSION_TYPES.get(ext)
    if accepted is None:
        return False
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media not in accepted


def guess_refused(request: Headers, headers: Headers, path: str) -> str | None:
    """Why neither heuristic freshness nor default_ttl may be used for this exchange, or None.
    A request with Cookie or Authorization is answered for one person: a guessed lifetime would
    hand that answer to everyone, as would one for a response setting a cookie (Varnish's
    builtin.vcl passes requests with either header and responses with Set-Cookie). A response
    whose type contradicts its URL's extension is the web cache deception above."""
    for name in ("cookie", "authorization"):
        if name in request:
            return name
    if "set-cookie" in headers:
        return "set-cookie"
    if extension_contradicted(path, headers.get("content-type")):
        return "content-type"
    return None


def unsafe_to_store(request: Headers, headers: Headers, rules: ResponseRules, path: str) -> str | None:
    """The safety rules for a response RFC 9111 would store: why not, or None. An explicit
    lifetime is the origin's word and keeps RFC 9111 behaviour, a Set-Cookie included (7.3: an
    origin that marks such a response cacheable means it; `private="Set-Cookie"` keeps the page
    and not the cookie). Without one the response is not stored at all when guessing is
    refused (stored with a validator alone, the next visitor's revalidation could be answered
    304 by the origin and get the first visitor's page)."""
    if explicitly_fresh(headers, rules):
        return None
    return guess_refused(request, headers, path)


class Use(Enum):
    FRESH = "fresh"                       # serve it
    STALE_WHILE_REVALIDATE = "swr"        # serve it, refresh in the background
    REVALIDATE = "revalidate"             # ask the origin (conditionally)
    STALE_OK = "stale-ok"                 # client accepts this much staleness (max-stale)


def usable(rules: ResponseRules, lifetime: float, age: float, request: Headers) -> Use:
    """RFC 9111 4 and 5.2.1: may a stored response answer this request without the origin?"""
    req_cc = parse_directives(request.get("cache-control"))
    if "no-cache" in req_cc or ("cache-control" not in request and "no-cache" in request.get("pragma", "").lower()):
        return Use.REVALIDATE
    if rules.always_revalidate:
        return Use.REVALIDATE
    max_age = delta_seconds(req_cc.get("max-age")) if "max-age" in req_cc else None
    if max_age is not None and age > max_age:
        return Use.REVALIDATE
    min_fresh = delta_seconds(req_cc.get("min-fresh"))
    fresh = lifetime > age
    if fresh and (min_fresh is None or lifetime - age >= min_fresh):
        return Use.FRESH
    if fresh:
        return Use.REVALIDATE
    staleness = age - lifetime
    if rules.must_revalidate_when_stale:
        return Use.REVALIDATE
    if "max-stale" in req_cc:
        limit = delta_seconds(req_cc["max-stale"]) if req_cc["max-stale"] is not None else None
        if limit is None or staleness <= limit:
            return Use.STALE_OK
    swr = rules.seconds("stale-while-revalidate")
    if swr is not None and staleness <= swr:
        return Use.STALE_WHILE_REVALIDATE
    return Use.REVALIDATE


def stale_on_error(rules: ResponseRules, lifetime: float, age: float, request: Headers) -> bool:
    """RFC 9111 4.2.4 and RFC 5861: may a stale response answer when the origin is down or
    answers 5xx? Yes unless the origin forbade stale use; stale-if-error bounds it."""
    if rules.must_revalidate_when_stale or rules.always_revalidate:
        return False
    staleness = max(0.0, age - lifetime)
    limits = [delta_seconds(d.get("stale-if-error")) for d in (rules.cc, parse_directives(request.get("cache-control")))
              if "stale-if-error" in d]
    limits = [x for x in limits if x is not None]
    return staleness <= max(limits) if limits else True


def vary_names(vary: str | None) -> tuple[str, ...] | None:
    """The request headers a response varies on, sorted and unique; None for Vary: *."""
    names = field_names(vary)
    return None if "*" in names else tuple(sorted(set(names)))


def selection(names: tuple[str, ...], request: Headers) -> tuple[tuple[str, str], ...]:
    """The request's values of those headers, whitespace around commas folded."""
    return tuple((n, ",".join(p.strip() for p in request.get(n, "").split(","))) for n in names)


def vary_key(vary: str | None, request: Headers) -> tuple[tuple[str, str], ...] | None:
    """The request values a stored response was selected by (RFC 9111 4.1); None for Vary: *."""
    names = vary_names(vary)
    return None if names is None else selection(names, request)


def weak_match(etag: str | None, if_none_match: str) -> bool:
    """RFC 9110 13.1.2: If-None-Match uses the weak comparison."""
    if etag is None:
        return False
    if if_none_match.strip() == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(t.strip().removeprefix("W/") == bare for t in if_none_match.split(","))


def not_modified(request: Headers, stored: Headers) -> bool:
    """RFC 9110 13.2.2 for a GET/HEAD the cache answers itself: does the client's copy match?"""
    if "if-none-match" in request:
        return weak_match(stored.get("etag"), request["if-none-match"])
    if "if-modified-since" not in request:
        return False                    # most hits: no date to parse
    ims = http_date(request["if-modified-since"])
    last_modified = http_date(stored.get("last-modified"))
    return ims is not None and last_modified is not None and last_modified <= ims


def content_range(value: str) -> tuple[int, int, int | None] | None:
    """RFC 9110 14.4 `bytes FIRST-LAST/COMPLETE` (COMPLETE may be `*`): (first, last, complete
    or None), or None for anything else (an unsatisfied range, another unit, a malformed one)."""
    unit, _, rest = value.strip().partition(" ")
    span, _, complete = rest.strip().partition("/")
    first, _, last = span.partition("-")
    if unit.lower() != "bytes" or not (first.isdigit() and last.isdigit()) or not (complete.isdigit() or complete == "*"):
        return None
    if int(first) > int(last) or (complete.isdigit() and int(last) >= int(complete)):
        return None
    return int(first), int(last), int(complete) if complete.isdigit() else None


def byte_range(range_header: str, size: int) -> tuple[int, int] | None:
    """One satisfiable `bytes=` range as (first, last) inclusive; None to serve the whole
    representation (multiple ranges, a bad header, or an unsatisfiable one handled by caller)."""
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", range_header)
    if not m or (not m[1] and not m[2]):
        return None
    if m[1]:
        first = int(m[1])
        last = min(int(m[2]), size - 1) if m[2] else size - 1
        if m[2] and int(m[2]) < first:
            return None
    else:
        suffix = int(m[2])
        if suffix == 0:
            return None
        first, last = max(0, size - suffix), size - 1
    return (first, last) if first < size else (size, size)       # (size, size): unsatisfiable


@dataclass
class CacheStatus:
    """One RFC 9211 Cache-Status member for this cache."""
    hit: bool = False
    fwd: str | None = None               # uri-miss | vary-miss | miss | stale | request | method | bypass
    fwd_status: int | None = None
    stored: bool = False
    ttl: int | None = None
    detail: str | None = None

    def render(self, name: str = "edge") -> str:
        parts = [name]
        if self.hit:
            parts.append("hit")
        if self.fwd:
            parts.append(f"fwd={self.fwd}")
        if self.fwd_status is not None:
            parts.append(f"fwd-status={self.fwd_status}")
        if self.stored:
            parts.append("stored")
        if self.ttl is not None:
            parts.append(f"ttl={self.ttl}")
        if self.detail:
            parts.append(f'detail="{self.detail}"')
        return "; ".join(parts)
