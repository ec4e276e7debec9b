"""RFC 9111 / 9213 / 9211 rules, table-driven and without a proxy."""

import pytest

from addons.cache import policy
from addons.cache.policy import CacheStatus, ResponseRules, Use
from addons.cache.store import Entry

NOW = 1_000_000.0


def rules(cc=None, cdn=None):
    headers = {}
    if cc is not None:
        headers["cache-control"] = cc
    if cdn is not None:
        headers["cdn-cache-control"] = cdn
    return ResponseRules.read(headers)


@pytest.mark.parametrize("value, expected", [
    ("max-age=60, public", {"max-age": "60", "public": None}),
    ('Max-Age="60", no-cache="Set-Cookie, X-A"', {"max-age": "60", "no-cache": "Set-Cookie, X-A"}),
    ("max-age=1, max-age=3600", {"max-age": "1"}),          # the first occurrence wins
    ("", {}),
])
def test_parse_directives(value, expected):
    assert policy.parse_directives(value) == expected


@pytest.mark.parametrize("value, ok", [
    ("Sun, 06 Nov 1994 08:49:37 GMT", True),      # IMF-fixdate
    ("Sunday, 06-Nov-94 08:49:37 GMT", True),     # RFC 850
    ("Sun Nov  6 08:49:37 1994", True),           # asctime
    ("Sun, 06 Nov 1994 08:49:37 UTC", False),
    ("Sun, 06 Nov 94 08:49:37 GMT", False),
    ("Sun, 06-Nov-1994 08:49:37 GMT", False),
    ("Sun 06 Nov 1994 08:49:37 GMT", False),
    ("Sun, 06 Nov 1994 8:49:37 GMT", False),
    ("0", False), ("", False),
])
def test_http_dates_are_parsed_strictly(value, ok):
    assert (policy.http_date(value) == 784111777.0) is ok


@pytest.mark.parametrize("value, expected", [
    ("max-age=60", {"max-age": "60"}), ("max-age=60, must-revalidate", {"max-age": "60", "must-revalidate": None}),
    ("max-age=10000, &&&&&", None), ('max-age="10000"', None), ("max-age= 60", None), ("max-age =60", None),
    ("no-store=?1", {"no-store": None}), ("no-store=?0", None), (None, None),
])
def test_cdn_cache_control_is_a_structured_dictionary(value, expected):
    assert policy.parse_targeted(value) == expected


def test_targeted_field_replaces_cache_control():
    assert rules("no-store", cdn="max-age=60").cc == {"max-age": "60"}
    assert rules("no-store", cdn="max-age=\"60\"").cc == {"no-store": None}      # invalid: ignored


@pytest.mark.parametrize("cc, headers, expected", [
    ("s-maxage=10, max-age=60", {}, 10.0),
    ("max-age=60", {"expires": "Sun, 06 Nov 1994 08:49:37 GMT"}, 60.0),
    (None, {"date": "Sun, 06 Nov 1994 08:49:37 GMT", "expires": "Sun, 06 Nov 1994 09:49:37 GMT"}, 3600.0),
    (None, {"expires": "0"}, 0.0),                                     # invalid Expires: already expired
    ("max-age=abc", {}, 0.0),
    (None, {"date": "Sun, 06 Nov 1994 08:49:37 GMT", "last-modified": "Sun, 06 Nov 1994 07:49:37 GMT"}, 360.0),
    (None, {}, 0.0),
])
def test_freshness_lifetime(cc, headers, expected):
    assert policy.freshness_lifetime(200, headers, rules(cc), NOW) == expected


def test_heuristics_only_where_allowed_and_default_ttl():
    lm = {"date": "Sun, 06 Nov 1994 08:49:37 GMT", "last-modified": "Sun, 06 Nov 1994 07:49:37 GMT"}
    assert policy.freshness_lifetime(302, lm, rules(), NOW) == 0.0      # 302 is not heuristically cacheable
    assert policy.freshness_lifetime(302, lm, rules("public"), NOW) == 360.0
    assert policy.freshness_lifetime(200, {}, rules(), NOW, default_ttl=30) == 30.0


@pytest.mark.parametrize("method, status, request_headers, cc, extra, expected", [
    ("GET", 200, {}, "max-age=60", {}, None),
    ("POST", 200, {}, "max-age=60", {}, "method"),
    ("GET", 206, {}, "max-age=60", {}, "status"),
    ("GET", 200, {"cache-control": "no-store"}, "max-age=60", {}, "no-store"),
    ("GET", 200, {}, "no-store, max-age=60", {}, "no-store"),
    ("GET", 200, {}, "private, max-age=60", {}, "private"),
    ("GET", 200, {}, 'private="Set-Cookie", max-age=60', {}, None),
    ("GET", 200, {"authorization": "x"}, "max-age=60", {}, "authorization"),
    ("GET", 200, {"authorization": "x"}, "public, max-age=60", {}, None),
    ("GET", 200, {}, "max-age=60", {"vary": "*"}, "vary-star"),
    ("GET", 302, {}, None, {"etag": '"x"'}, "status"),
    ("GET", 200, {}, None, {}, "no-freshness"),
    ("GET", 200, {}, None, {"etag": '"x"'}, None),
    ("GET", 200, {}, "max-age=0, stale-while-revalidate=30", {}, None),
])
def test_storable(method, status, request_headers, cc, extra, expected):
    headers = dict(extra, **({"cache-control": cc} if cc else {}))
    r = ResponseRules.read(headers)
    why_not = policy.storable(method, status, request_headers, headers, r)
    if why_not is None and not policy.reusable(policy.freshness_lifetime(status, headers, r, NOW), headers, r):
        why_not = "no-freshness"
    assert why_not == expected


@pytest.mark.parametrize("cc, lifetime, age, req, expected", [
    ("max-age=60", 60, 10, {}, Use.FRESH),
    ("max-age=60", 60, 70, {}, Use.REVALIDATE),
    ("no-cache", 60, 1, {}, Use.REVALIDATE),
    ("max-age=60", 60, 10, {"cache-control": "no-cache"}, Use.REVALIDATE),
    ("max-age=60", 60, 10, {"pragma": "no-cache"}, Use.REVALIDATE),
    ("max-age=60", 60, 10, {"cache-control": "max-age=5"}, Use.REVALIDATE),
    ("max-age=60", 60, 10, {"cache-control": "min-fresh=55"}, Use.REVALIDATE),
    ("max-age=60", 60, 70, {"cache-control": "max-stale=20"}, Use.STALE_OK),
    ("max-age=60", 60, 90, {"cache-control": "max-stale=20"}, Use.REVALIDATE),
    ("max-age=60, must-revalidate", 60, 70, {"cache-control": "max-stale"}, Use.REVALIDATE),
    ("max-age=60, stale-while-revalidate=30", 60, 80, {}, Use.STALE_WHILE_REVALIDATE),
    ("max-age=60, stale-while-revalidate=30", 60, 100, {}, Use.REVALIDATE),
])
def test_usable(cc, lifetime, age, req, expected):
    assert policy.usable(rules(cc), lifetime, age, req) is expected


@pytest.mark.parametrize("cc, age, req, expected", [
    ("max-age=0", 100, {}, True),                        # disconnected: stale is allowed
    ("max-age=0, stale-if-error=60", 30, {}, True),
    ("max-age=0, stale-if-error=60", 90, {}, False),
    ("max-age=0", 90, {"cache-control": "stale-if-error=10"}, False),
    ("max-age=0, must-revalidate", 1, {}, False),
    ("s-maxage=0", 1, {}, False),
    ("no-cache", 1, {}, False),
])
def test_stale_on_error(cc, age, req, expected):
    assert policy.stale_on_error(rules(cc), 0.0, age, req) is expected


def test_age():
    # response took 2 s; origin said Age 10; Date 5 s before we received it: 12 s old on arrival
    assert policy.initial_age(NOW - 5, "10", NOW - 2, NOW) == 12
    assert policy.initial_age(NOW - 20, "10", NOW - 2, NOW) == 20       # the Date says older
    entry = Entry(200, b"OK", (), {"date": "Sun, 06 Nov 1994 08:49:37 GMT", "age": "10"}, b"", 784111777.0 - 2,
                  784111777.0, rules(), 60.0, ())
    assert entry.age(784111777.0 + 30) == 12 + 30                      # plus the time spent stored
    assert policy.age_seconds("7200, 0") == 7200 and policy.age_seconds("7200.0") == 0


def test_vary_selection_and_validators():
    assert policy.vary_key("Accept-Encoding, accept-language", {"accept-language": "en , fr"}) == \
        (("accept-encoding", ""), ("accept-language", "en,fr"))
    assert policy.vary_key("*", {}) is None
    assert policy.not_modified({"if-none-match": 'W/"a", "b"'}, {"etag": '"a"'})
    assert not policy.not_modified({"if-none-match": '"c"'}, {"etag": '"a"'})
    assert policy.not_modified({"if-modified-since": "Sun, 06 Nov 1994 08:49:37 GMT"},
                               {"last-modified": "Sun, 06 Nov 1994 08:49:37 GMT"})


@pytest.mark.parametrize("header, expected", [
    ("bytes=0-4", (0, 4)), ("bytes=5-", (5, 9)), ("bytes=-3", (7, 9)), ("bytes=3-100", (3, 9)),
    ("bytes=20-", (10, 10)), ("bytes=0-1,3-4", None), ("items=0-1", None), ("bytes=4-2", None),
])
def test_byte_range(header, expected):
    assert policy.byte_range(header, 10) == expected


def test_cache_status_rendering():
    assert CacheStatus(hit=True, ttl=42).render() == "edge; hit; ttl=42"
    assert CacheStatus(fwd="stale", fwd_status=304, detail="x").render() == 'edge; fwd=stale; fwd-status=304; detail="x"'
