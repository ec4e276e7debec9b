"""Origin masking rules on header values and error bodies: pure."""

import gzip
import ipaddress

import brotli
import pytest

from addons.scrub.masking import MAX_BODY_SCAN, OriginMask, decoded, public_address, split_items

MASK = OriginMask([("127.0.0.1", 9001), ("backend.internal", 8000), ("203.0.113.50", 80), ("10.0.0.5", 22001)],
                  internal_domains=["internal.example"])
BASE, HOST = "https://shop.example", "shop.example"
PUB = public_address(BASE, HOST)


@pytest.mark.parametrize("value, leaks", [
    ("10.0.3.7", True),
    ("served-by=127.0.0.1:9001", True),
    ("backend.internal", True),
    ("http://backend.internal:8000/x", True),
    ("upstream 203.0.113.50", True),             # a public origin address is still the origin
    ("upstream:10.0.0.9", True),
    ("fd00::7", True),
    ("[::1]:8080", True),
    ("client 198.51.100.4", False),              # a public address that is not an origin
    ("text/html; charset=utf-8", False),
    ("12:34:56", False),                         # colon lists that are not addresses
    ("Apache/2.4.58", False),
    ("mybackend.internal.example", True),        # under a declared internal domain
    ("origin-7.internal.example", True),
    ("internal.example", True),                  # a declared domain is internal itself
    ("shop.internal.example.com", False),        # not under it: a public name that contains it
])
def test_leaks(value, leaks):
    assert MASK.leaks(value, PUB) is leaks


@pytest.mark.parametrize("value", [
    # every spelling of 10.1.2.3 a browser accepts as a URL host
    "http://10.1.2.3/", "http://167838211/", "http://0x0a010203/", "http://012.1.2.3/", "http://0x0a.1.2.3/",
    "http://10.1.515/", "http://10.1.2.3./", "http://%31%30.1.2.3/", "http://user:pw@10.1.2.3/",
    "http://[::ffff:10.1.2.3]/", "http://[::ffff:a01:203]/", "http://[::10.1.2.3]/", "http://[2002:a01:203::1]/",
    "http://[64:ff9b::10.1.2.3]/", "http://[fe80::1%25eth0]:8080/", "//10.1.2.3/x", "\\\\10.1.2.3\\x", "/\\10.1.2.3/x",
    "http://10.1/",                               # shortened: 10.0.0.1
    "http://0/", "http://0.0.0.0:5000/",          # "this host": Flask's and others' bind address
    # outside URLs: dotted quads in any base, IPv6 spellings
    "node 10.1.2.3", "node 012.1.2.3", "node 010.001.002.003", "x=::ffff:10.1.2.3", "x=::ffff:a01:203",
    "fe80::1%eth0", "at [fd00::1]:443",
    # internal names
    "ip-10-1-2-3.ec2.internal", "ip-10-1-2-3", "ip-10-1-2-3.eu-west-1.compute.internal",
    "db.prod.svc.cluster.local", "printer.local", "nas.home.arpa", "git.corp", "router.lan",
    "metadata.google.internal", "localhost", "localhost:3000", "http://localhost:3000/", "web.localhost",
    "http://jenkins:8080/job", "http://app/",      # a dotless host in a URL: no public name has no dot
    # an origin's port alone
    'h3=":22001"', "x :22001",
])
def test_internal_spellings_leak(value):
    assert MASK.leaks(value, PUB), value


@pytest.mark.parametrize("value", [
    "1.2.3.4.5", "version 10.1.2.3.4", "build 2026.12.01.1", "Tue, 01 Dec 2026 07:40:00 GMT", "12:30",
    "12:34:56.789", "10:20:30:40", "167838211", "0x0a010203", "id=10.1", "ratio 3.5:1", "8.8.8.8",
    "2001:db8::1", "[2001:db8::1]:443", "http://198.51.100.7/", "http://[2002:cb00:7101::1]/",  # 6to4 of public
    "https://cdn.example.com/app.local", "</static/settings.local>; rel=x", "max-age=31536000",
    "private", "no-store, private", "local", "https://www.internal.com/", "https://local.example.org/",
    "https://shop.example/", "https://shop.example:8443/", "h3=\":443\"", "h3=\":8443\"",  # not an origin port
    "a/b//c", "x :80", "std::string", "https://example.com/?a=1:2", "sid=abc; Path=/; HttpOnly",
])
def test_not_an_address(value):
    assert not MASK.leaks(value, PUB), value


def test_edge_own_address_is_not_a_leak():
    edge = public_address("http://127.0.0.1:8080", "127.0.0.1")
    assert not MASK.leaks("http://127.0.0.1:8080/next", edge)
    assert MASK.leaks("http://127.0.0.1:9001/next", edge)     # the origin's port is
    assert MASK.leaks("http://127.0.0.1:9999/next", edge)     # another service on the edge's machine
    local = public_address("http://localhost:8080", "localhost")
    assert not MASK.leaks("http://localhost:8080/", local)
    assert MASK.leaks("http://localhost:9001/", local)


def test_configured_internal_networks():
    mask = OriginMask([], internal_networks=[ipaddress.ip_network("198.18.0.0/15")])
    assert mask.leaks("http://198.18.4.4/", PUB) and mask.leaks("node 198.19.0.1", PUB)
    assert not MASK.leaks("node 198.19.0.1", PUB)


@pytest.mark.parametrize("url, expected", [
    ("http://127.0.0.1:9001/login?next=/a", "https://shop.example/login?next=/a"),
    ("http://backend.internal:8000", "https://shop.example/"),
    ("http://10.9.9.9/x", "https://shop.example/x"),             # internal address: the origin itself
    ("http://203.0.113.50/x", "https://shop.example/x"),         # default port of a public origin
    ("https://other.example/x", "https://other.example/x"),     # elsewhere: untouched
    ("/relative/path", "/relative/path"),
    ("next", "next"), ("5", "5"),                                # relative paths, not hosts
    ("http://127.0.0.1:9999/x", "https://shop.example/x"),      # loopback is internal
    ("//10.1.2.3/x", "https://shop.example/x"),                 # protocol-relative
    ("/\\10.1.2.3/x", "https://shop.example/x"),                # a browser reads /\ as //
    ("10.1.2.3/x", "https://shop.example/x"),                   # a bare IP where the URL starts
    ("10.1.2.3:8080", "https://shop.example/"),
    ("backend.internal:8000/a?b", "https://shop.example/a?b"),
    ("http://167838211/x", "https://shop.example/x"),
    ("http://localhost:3000/cb", "https://shop.example/cb"),
    ("ws://10.0.0.5:22001/live", "wss://shop.example/live"),
    ("https://sso.example/login?return=http://10.0.0.5:22001/app",
     "https://sso.example/login?return=https://shop.example/app"),   # a URL inside the query too
    ("ftp://10.1.2.3/x", "ftp://10.1.2.3/x"),                   # not a web URL: left, so it leaks (removed)
])
def test_rewrite_url(url, expected):
    assert MASK.rewrite_url(url, BASE, HOST) == expected


def test_rewrite_link_refresh_cookie():
    assert MASK._links('<http://127.0.0.1:9001/a.css>; rel=preload, <https://cdn.example/b.js>; rel=preload', PUB) \
        == '<https://shop.example/a.css>; rel=preload, <https://cdn.example/b.js>; rel=preload'
    assert MASK._links('<//10.0.0.5:22001/a.css>; rel=preload; anchor="http://backend.internal:8000/"', PUB) \
        == '<https://shop.example/a.css>; rel=preload; anchor="https://shop.example/"'
    # a link-value that cannot be rewritten is dropped, not the whole header
    assert MASK._links('<ftp://10.0.0.5/x>; rel=alternate, </b.css>; rel=preload', PUB) == '</b.css>; rel=preload'
    assert MASK.rewrite_urls("5; url=http://backend.internal:8000/done", PUB) == "5; url=https://shop.example/done"
    assert MASK._cookie("sid=1; Domain=.backend.internal; Path=/", PUB) == "sid=1; Domain=shop.example; Path=/"
    assert MASK._cookie("sid=1; domain=10.0.0.5", PUB) == "sid=1; domain=shop.example"
    assert MASK._cookie("sid=1; Domain=shop.example", PUB) == "sid=1; Domain=shop.example"


@pytest.mark.parametrize("csp, expected", [
    # the origin's own address becomes the public origin; the rest of the policy stays
    ("default-src 'self'; script-src 'self' http://10.0.0.5:22001 https://cdn.example 'nonce-abc'; object-src 'none'",
     "default-src 'self'; script-src 'self' https://shop.example https://cdn.example 'nonce-abc'; object-src 'none'"),
    # another internal host is dropped, never widened to the site
    ("script-src 'self' http://metrics.internal https://cdn.example; img-src *",
     "script-src 'self' https://cdn.example; img-src *"),
    ("img-src http://10.9.9.9 *.corp; frame-ancestors 'none'", "img-src 'none'; frame-ancestors 'none'"),
    ("connect-src 'self' ws://10.0.0.5:22001 backend.internal:8000/api/",
     "connect-src 'self' wss://shop.example shop.example/api/"),
    ("default-src 'self'; report-uri http://10.0.0.5:22001/csp /csp2",
     "default-src 'self'; report-uri https://shop.example/csp /csp2"),
    ("default-src 'self'; report-uri ftp://10.0.0.5/csp", "default-src 'self'"),
    ("script-src 'self' *.internal.example https://*.example.com",
     "script-src 'self' https://*.example.com"),
    ("sandbox allow-scripts; script-src 10.1.2.3", "sandbox allow-scripts; script-src 'none'"),
    ("default-src 'self', script-src http://10.0.0.5:22001", "default-src 'self', script-src https://shop.example"),
])
def test_csp_keeps_its_protection(csp, expected):
    assert MASK._csp(csp, PUB) == expected


def test_www_authenticate():
    assert MASK._auth('Bearer realm="http://10.0.0.5:22001", authorization_uri="http://10.0.0.5:22001/oauth/authorize", '
                      'error="invalid_token"', PUB) == ('Bearer realm="https://shop.example", '
                                                        'authorization_uri="https://shop.example/oauth/authorize", '
                                                        'error="invalid_token"')
    assert MASK._auth('Basic realm="Login to backend.internal:8000", charset="UTF-8"', PUB) \
        == 'Basic realm="Login to shop.example", charset="UTF-8"'
    assert MASK._auth('Digest realm="ip-10-1-2-3", qop="auth", nonce="abc", Basic realm="x"', PUB) \
        == 'Digest realm="shop.example", qop="auth", nonce="abc", Basic realm="x"'


def test_alt_svc():
    assert MASK._alt_svc('h3=":22001"; ma=86400, h3-29=":22001", h2="alt.example:443"', PUB) == 'h2="alt.example:443"'
    assert MASK._alt_svc('h3="10.0.0.5:443"; ma=60, h3="backend.internal:443"', PUB) == ""
    assert MASK._alt_svc('h3=":443"; ma=86400', PUB) == 'h3=":443"; ma=86400'


def test_split_items_respects_quotes_and_brackets():
    assert split_items('<a,b>; rel=x, w; p="1,2", z') == ['<a,b>; rel=x', ' w; p="1,2"', ' z']


def scrub(fields, **kw):
    return MASK.scrub_fields(fields, BASE, HOST, frozenset({b"x-powered-by", b"via"}), b"edge", **kw)


def test_scrub_fields_in_one_pass():
    fields = ((b"Server", b"Apache"), (b"Date", b"Fri, 27 Nov 2026 10:00:00 GMT"), (b"X-Powered-By", b"PHP"),
              (b"Location", b"http://127.0.0.1:9001/x"), (b"X-Debug", b"10.0.0.3"), (b"ETag", b'"10.0.0.3"'),
              (b"Set-Cookie", b"a=1; Domain=backend.internal"), (b"Set-Cookie", b"b=2"), (b"VIA", b"1.1 lb"))
    out, removed, rewritten = scrub(fields)
    assert out == ((b"Date", b"Fri, 27 Nov 2026 10:00:00 GMT"), (b"Location", b"https://shop.example/x"),
                   (b"ETag", b'"10.0.0.3"'), (b"Set-Cookie", b"a=1; Domain=shop.example"), (b"Set-Cookie", b"b=2"),
                   (b"Server", b"edge"))
    assert removed == ["X-Powered-By", "X-Debug", "VIA"]
    assert rewritten == ["Location", "Set-Cookie"]
    out, _, _ = MASK.scrub_fields(((b"Server", b"Apache"),), BASE, HOST, frozenset(), None)
    assert out == ()


def test_scrub_fields_rewrites_inside_headers():
    fields = ((b"Content-Security-Policy", b"default-src 'self' http://10.0.0.5:22001; report-uri http://10.0.0.5:22001/r"),
              (b"Content-Security-Policy-Report-Only", b"script-src 'self' http://metrics.internal"),
              (b"WWW-Authenticate", b'Bearer authorization_uri="http://localhost:22001/auth"'),
              (b"Alt-Svc", b'h3=":22001"; ma=86400'),
              (b"Access-Control-Allow-Origin", b"http://10.0.0.9:3000"),
              (b"X-Frame-Options", b"ALLOW-FROM http://10.0.0.9/"))
    out, removed, rewritten = scrub(fields)
    assert dict(out) == {
        b"Content-Security-Policy": b"default-src 'self' https://shop.example; report-uri https://shop.example/r",
        b"Content-Security-Policy-Report-Only": b"script-src 'self'",
        b"WWW-Authenticate": b'Bearer authorization_uri="https://shop.example/auth"',
        b"Server": b"edge"}
    assert rewritten == ["Content-Security-Policy", "Content-Security-Policy-Report-Only", "WWW-Authenticate"]
    assert removed == ["Alt-Svc", "Access-Control-Allow-Origin", "X-Frame-Options"]


def test_acao_echoing_the_clients_own_origin_passes():
    fields = ((b"Access-Control-Allow-Origin", b"http://10.0.0.9:3000"),)
    assert scrub(fields, request_origin="http://10.0.0.9:3000")[0][0] == fields[0]
    assert scrub(fields, request_origin="http://10.0.0.8:3000")[0] == ((b"Server", b"edge"),)


def test_public_headers_pass_untouched():
    fields = ((b"Content-Security-Policy", b"default-src 'self'; script-src 'self' https://cdn.example.com 'nonce-x'; "
                                           b"report-uri https://csp.example.com/r"),
              (b"Access-Control-Allow-Origin", b"https://app.example.com"),
              (b"WWW-Authenticate", b'Bearer realm="api", authorization_uri="https://id.example.com/authorize"'),
              (b"Alt-Svc", b'h3=":443"; ma=86400'),
              (b"Link", b"</a.css>; rel=preload, <https://cdn.example.com/b.js>; rel=preload"),
              (b"Location", b"https://shop.example/next"))
    out, removed, rewritten = scrub(fields)
    assert out == (*fields, (b"Server", b"edge")) and removed == rewritten == []


@pytest.mark.parametrize("body, ctype, leaks", [
    (b"<h1>502</h1>upstream http://10.0.0.5:22001/ failed", "text/html", True),
    (b'{"error": "connect to backend.internal:8000 refused"}', "application/json", True),
    (b"Traceback: File /srv/app.py, host ip-10-1-2-3", None, True),
    (b"<h1>503 Service Unavailable</h1><p>Try again at 12:30.</p>", "text/html; charset=utf-8", False),
    (b"\x89PNG 10.0.0.5", "image/png", False),                  # not text: not scanned
])
def test_body_leaks(body, ctype, leaks):
    assert MASK.body_leaks(body, ctype, None, PUB) is leaks


def test_body_leaks_reads_codings_within_a_bound():
    page = b"<p>db at 10.0.0.7 is down</p>"
    assert MASK.body_leaks(gzip.compress(page), "text/html", "gzip", PUB)
    assert MASK.body_leaks(brotli.compress(page), "text/html", "br", PUB)
    assert not MASK.body_leaks(gzip.compress(b"<p>down</p>"), "text/html", "gzip", PUB)
    bomb = gzip.compress(b"a" * (MAX_BODY_SCAN + 10))
    assert len(bomb) < 10_000 and decoded(bomb, "gzip", MAX_BODY_SCAN) is None
    assert MASK.body_leaks(bomb, "text/html", "gzip", PUB)          # cannot be read within the bound: masked
    assert MASK.body_leaks(b"not gzip", "text/html", "gzip", PUB)
    assert MASK.body_leaks(b"x", "text/html", "compress", PUB)


def test_csp_directives_without_sources_stay():
    assert MASK._csp("upgrade-insecure-requests; default-src 'self' http://10.0.0.5:22001; block-all-mixed-content", PUB) \
        == "upgrade-insecure-requests; default-src 'self' https://shop.example; block-all-mixed-content"


def test_scanning_stays_linear_on_hostile_values():
    """A header echoing a client's 32 KB of `a.local` tokens: each name is looked for a bounded
    way back, not from the start of the value."""
    value = "x.local/" * 4000
    assert len(list(MASK._findings(value, PUB))) == 1          # only the first is a name (the others follow a /)
    value = "a.local " * 4000
    assert sum(1 for _ in MASK._findings(value, PUB)) == 4000


def test_an_origin_behind_the_sites_own_name():
    """The origin is reached as shop.example too (its own DNS view): the public name alone is
    not a leak, its origin port is."""
    mask = OriginMask([("shop.example", 8443), ("127.0.0.1", 9001)])
    assert not mask.leaks("a=1; Domain=shop.example", PUB)
    assert mask.leaks("https://shop.example:8443/x", PUB)
    edge = public_address("http://127.0.0.1:8080", "127.0.0.1")
    assert not mask.leaks("client 127.0.0.1", edge)       # the edge's own address, no port


@pytest.mark.parametrize("policy, expected", [
    ('geolocation=(self "http://10.0.0.5:22001"), camera=()', 'geolocation=(self "https://shop.example"), camera=()'),
    ('geolocation=(self "http://metrics.internal" "https://maps.example"), fullscreen=*',
     'geolocation=(self "https://maps.example"), fullscreen=*'),
    ('payment=("https://x.example" "http://10.1.1.1")', 'payment=("https://x.example")'),
])
def test_permissions_policy_keeps_its_features(policy, expected):
    assert MASK._permissions(policy, PUB) == expected
