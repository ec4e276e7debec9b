"""Origin masking rules on header values: pure."""

import pytest

from addons.scrub.masking import OriginMask

MASK = OriginMask([("127.0.0.1", 9001), ("backend.internal", 8000), ("203.0.113.50", 80)])
BASE, HOST = "https://shop.example", "shop.example"


@pytest.mark.parametrize("value, leaks", [
    ("10.0.3.7", True),
    ("served-by=127.0.0.1:9001", True),
    ("backend.internal", True),
    ("http://backend.internal:8000/x", True),
    ("upstream 203.0.113.50", True),             # a public origin address is still the origin
    ("fd00::7", True),
    ("[::1]:8080", True),
    ("client 198.51.100.4", False),              # a public address that is not an origin
    ("text/html; charset=utf-8", False),
    ("12:34:56", False),                         # colon lists that are not addresses
    ("Apache/2.4.58", False),
    ("mybackend.internal.example", False),       # not the origin's name, only contains it
])
def test_leaks(value, leaks):
    assert MASK.leaks(value, HOST) is leaks


def test_edge_own_address_is_not_a_leak():
    # clients reaching the edge at 127.0.0.1:8080 see 127.0.0.1 in rewritten URLs
    assert not MASK.leaks("http://127.0.0.1:8080/next", "127.0.0.1")
    assert MASK.leaks("http://127.0.0.1:9001/next", "127.0.0.1")     # the origin's port is


@pytest.mark.parametrize("url, expected", [
    ("http://127.0.0.1:9001/login?next=/a", "https://shop.example/login?next=/a"),
    ("http://backend.internal:8000", "https://shop.example/"),
    ("http://10.9.9.9/x", "https://shop.example/x"),             # internal address: the origin itself
    ("http://203.0.113.50/x", "https://shop.example/x"),         # default port of a public origin
    ("https://other.example/x", "https://other.example/x"),     # elsewhere: untouched
    ("/relative/path", "/relative/path"),
    ("http://127.0.0.1:9999/x", "https://shop.example/x"),      # loopback is internal
])
def test_rewrite_url(url, expected):
    assert MASK.rewrite_url(url, BASE, HOST) == expected


def test_rewrite_link_refresh_cookie():
    assert MASK.rewrite_links('<http://127.0.0.1:9001/a.css>; rel=preload, <https://cdn.example/b.js>; rel=preload',
                              BASE, HOST) == '<https://shop.example/a.css>; rel=preload, <https://cdn.example/b.js>; rel=preload'
    assert MASK.rewrite_refresh("5; url=http://backend.internal:8000/done", BASE, HOST) == "5; url=https://shop.example/done"
    assert MASK.rewrite_cookie_domain("sid=1; Domain=.backend.internal; Path=/", BASE, HOST) == "sid=1; Domain=shop.example; Path=/"
    assert MASK.rewrite_cookie_domain("sid=1; domain=10.0.0.5", BASE, HOST) == "sid=1; domain=shop.example"
    assert MASK.rewrite_cookie_domain("sid=1; Domain=shop.example", BASE, HOST) == "sid=1; Domain=shop.example"


def test_scrub_fields_in_one_pass():
    fields = ((b"Server", b"Apache"), (b"Date", b"Fri, 27 Nov 2026 10:00:00 GMT"), (b"X-Powered-By", b"PHP"),
              (b"Location", b"http://127.0.0.1:9001/x"), (b"X-Debug", b"10.0.0.3"), (b"ETag", b'"10.0.0.3"'),
              (b"Set-Cookie", b"a=1; Domain=backend.internal"), (b"Set-Cookie", b"b=2"), (b"VIA", b"1.1 lb"))
    out, removed, rewritten = MASK.scrub_fields(fields, BASE, HOST, frozenset({b"x-powered-by", b"via"}), b"edge")
    assert out == ((b"Date", b"Fri, 27 Nov 2026 10:00:00 GMT"), (b"Location", b"https://shop.example/x"),
                   (b"ETag", b'"10.0.0.3"'), (b"Set-Cookie", b"a=1; Domain=shop.example"), (b"Set-Cookie", b"b=2"),
                   (b"Server", b"edge"))
    assert removed == ["X-Powered-By", "X-Debug", "VIA"]
    assert rewritten == ["Location", "Set-Cookie"]
    out, _, _ = MASK.scrub_fields(((b"Server", b"Apache"),), BASE, HOST, frozenset(), None)
    assert out == ()
