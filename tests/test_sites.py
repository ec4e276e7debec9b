"""Sites: host and path routing in front of real origins, the per-route overrides, redirects,
HSTS and header rules, the cache per site, and hostile hosts and paths."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request

import httpx
import pytest

from addons.admin import format_status
from addons.config import ConfigError, RouteShield, parse_config
from addons.sites.rules import FieldEdit, client_location, hsts_field, https_location, path_prefixes, redirects
from addons.sites.table import SiteTable, host_key, key_query, normalise_path, origin_target
from tests.rawnet import RecordingOrigin, exchange, status_of
from tests.test_shield import needs_crs

POOLS = """
pools:
  web: {origins: [%(web)s]}
  api: {origins: [%(api)s]}
  blog: {origins: [%(blog)s]}
routing: {default_pool: web}
"""

SITES = POOLS + """
sites:
  shop:
    hosts: [shop.example, "*.shop.example"]
    headers:
      request: {set: {X-Site: shop}, remove: [X-Drop-Me]}
      response: {set: {X-Frame-Options: DENY}, add: {X-Served-By: [edge-a, edge-b]}, remove: [X-Debug]}
    routes:
      - {path: /, pool: web}
      - {path: /api/, pool: api, strip_prefix: true, cache: {enabled: false}}
      - {path: /api/v2/, pool: blog}
      - {path: /static/, pool: web, cache: {default_ttl: 1h, ignore_query: [utm_source]}}
      - {path: /beta/, pool: api, headers: {X-Beta: "~^(1|yes)$"}}
      - {path: /beta/, pool: web, methods: [GET]}
  blog:
    hosts: [blog.example, "*.eu.blog.example"]
    hsts: {max_age: 1d, include_subdomains: true}
    routes: [{path: /, pool: blog, origin_path: /blog}]
  secure:
    hosts: [secure.example]
    https_redirect: true
    hsts: 365d
default_site: null
"""


def parse(text: str):
    return parse_config(text, "test.yaml")


def _table(text: str = SITES) -> SiteTable:
    c = parse(text % {"web": "http://127.0.0.1:1", "api": "http://127.0.0.1:2", "blog": "http://127.0.0.1:3"})
    return SiteTable(c.sites, c.default_site)


def _where(table: SiteTable, host: str, path: str, method: str = "GET", headers=None):
    found = table.match(host, path, method, headers or {})
    return None if found is None else (found[0].name, found[1].path, found[1].pool)


# -- the pure table -----------------------------------------------------------------------------


def test_hosts_exact_then_longest_wildcard_case_port_and_trailing_dot_ignored():
    t = _table()
    assert _where(t, "shop.example", "/x") == ("shop", "/", "web")
    assert _where(t, "SHOP.Example.:8080", "/x") == ("shop", "/", "web")
    assert _where(t, "www.shop.example", "/x")[0] == "shop"
    assert _where(t, "a.b.shop.example", "/x")[0] == "shop"        # any depth, as nginx
    assert _where(t, "x.eu.blog.example", "/")[0] == "blog"
    assert _where(t, "eu.blog.example", "/") is None                 # a wildcard never covers its suffix
    assert _where(t, "blog.example", "/")[0] == "blog"
    assert _where(t, "evilshop.example", "/") is None                # a suffix, not a label
    assert _where(t, "shop.example.evil", "/") is None
    assert _where(t, "", "/") is None


def test_the_longest_prefix_wins_then_the_listed_order():
    t = _table()
    assert _where(t, "shop.example", "/api/x") == ("shop", "/api/", "api")     # `/` is listed first
    assert _where(t, "shop.example", "/api/v2/x") == ("shop", "/api/v2/", "blog")
    assert _where(t, "shop.example", "/api") == ("shop", "/", "web")           # a string prefix: /api/ needs the slash
    assert _where(t, "shop.example", "/beta/x", headers={"x-beta": "yes"}) == ("shop", "/beta/", "api")
    assert _where(t, "shop.example", "/beta/x", headers={"x-beta": "no"}) == ("shop", "/beta/", "web")
    assert _where(t, "shop.example", "/beta/x", "POST") == ("shop", "/", "web")   # methods: [GET] only


def test_paths_are_normalised_before_matching_and_hidden_dot_segments_refused():
    assert normalise_path("/api/../admin") == "/admin"
    assert normalise_path("//api//x") == "/api/x"
    assert normalise_path("/%61pi/%2e%2E/x") == "/x"
    assert normalise_path("/a/b/..") == "/a/"
    assert normalise_path("/../../etc/passwd") == "/etc/passwd"
    assert normalise_path("/a%2fb") == "/a%2Fb"          # an encoded slash stays a character of its segment
    for hidden in ("/api%2F..", "/api/x%2F..%2F..%2Fadmin", "/api/..%5Cadmin", "/api/..;/admin", "/api/.\\..\\x",
                   "/x/.;/y"):
        assert normalise_path(hidden) is None, hidden
    t = _table()
    assert _where(t, "shop.example", "/api/../admin") == ("shop", "/", "web")
    assert _where(t, "shop.example", "/static/..//api/x") == ("shop", "/api/", "api")


def test_the_origin_target_keeps_the_route_inside_its_prefix():
    t = _table()
    _, api = t.match("shop.example", "/api/x", "GET", {})
    _, blog = t.match("blog.example", "/", "GET", {})
    assert origin_target(api, "/api/x/y", "a=1") == "/x/y?a=1"
    assert origin_target(api, "/api/", None) == "/"
    assert origin_target(blog, "/", None) == "/blog/"
    assert origin_target(blog, "/p/1", "") == "/blog/p/1?"
    assert key_query("utm_source=x&id=2&utm_source=y", frozenset({"utm_source"})) == "id=2"
    assert key_query("utm_source=x", frozenset({"utm_source"})) is None
    assert key_query("a=1", frozenset()) == "a=1"


def test_host_key_and_the_answer_rules():
    assert host_key("[::1]:8080") == "::1" and host_key("Shop.Example.") == "shop.example"
    edit = FieldEdit(parse(POOLS % {"web": "http://127.0.0.1:1", "api": "http://127.0.0.1:2",
                                    "blog": "http://127.0.0.1:3"} + """
sites:
  a: {hosts: [a.example], headers: {response: {set: {X-A: "1"}, add: {X-B: "2"}, remove: [X-Debug]}}}
""").sites["a"].response_headers)
    fields = ((b"X-Debug", b"d"), (b"x-a", b"old"), (b"x-a", b"older"), (b"X-B", b"0"), (b"Other", b"o"))
    assert edit(fields) == ((b"X-B", b"0"), (b"Other", b"o"), (b"X-A", b"1"), (b"X-B", b"2"))
    assert https_location("shop.example", "/a?b=1") == "https://shop.example/a?b=1"
    assert https_location("::1", "/", 8443) == "https://[::1]:8443/"
    assert redirects(True, False, "GET", "/x") and not redirects(True, True, "GET", "/x")
    assert not redirects(True, False, "GET", "/.well-known/acme-challenge/tok")
    assert not redirects(True, False, "PURGE", "/x") and not redirects(False, False, "GET", "/x")
    assert hsts_field("max-age=1", True) == "max-age=1" and hsts_field("max-age=1", False) is None
    blog = path_prefixes("/", False, "/blog")
    assert blog == ("/blog/", "/") and path_prefixes("/api/", True, "") == ("/", "/api/")
    assert path_prefixes("/api/", False, "") is None
    assert client_location("/blog?x=1", blog, "blog.example") == "/?x=1"
    assert client_location("/blogx", blog, "blog.example") is None
    assert client_location("//blog.example/blog/x", blog, "blog.example") is None      # another host's form
    assert client_location("HTTPS://BLOG.example/blog/x", blog, "blog.example") == "HTTPS://BLOG.example/x"


@pytest.mark.parametrize("sites, key, problem", [
    ("{a: {hosts: [a.example], routes: [{path: /, pool: nope}]}}", "sites.a.routes[0].pool", "no pool named"),
    ("{a: {hosts: [a.example]}, b: {hosts: [A.example.]}}", "sites.b.hosts[0]", "already a host of site a"),
    ("{a: {hosts: [a.example], routes: [{path: api/}]}}", "sites.a.routes[0].path", "starting with /"),
    ("{a: {hosts: [a.example], routes: [{path: /a/../b/}]}}", "sites.a.routes[0].path", "normalised"),
    ("{a: {hosts: [a.example:8080]}}", "sites.a.hosts[0]", "without a port"),
    ("{a: {hosts: [a.*.example]}}", "sites.a.hosts[0]", "leading *."),
    ("{a: {hosts: []}}", "sites.a.hosts", "at least one host"),
    ("{a: {hosts: [a.example], routes: [{path: /, pol: web}]}}", "sites.a.routes[0].pol", "unknown key"),
    ("{a: {hosts: [a.example], headers: {response: {set: {Content-Length: '1'}}}}}",
     "sites.a.headers.response.set.Content-Length", "cannot be changed"),
    ("{a: {hosts: [a.example], routes: [{path: /, headers: {X-A: '~('}}]}}", "sites.a.routes[0].headers.X-A",
     "not a regular expression"),
    ("{a: {hosts: [a.example], routes: [{path: /, methods: [get]}]}}", "sites.a.routes[0].methods[0]", "upper case"),
    ("{a: {hosts: [a.example], hsts: forever}}", "sites.a.hsts", "duration"),
    ("{a: {hosts: [a.example], routes: [{path: /, cache: {ignore_query: ['a=b']}}]}}",
     "sites.a.routes[0].cache.ignore_query[0]", "query parameter"),
    ("{a: {hosts: [a.example], routes: [{path: /, shield: {waf: partly}}]}}", "sites.a.routes[0].shield.waf",
     "expected one of"),
    ("{a: {hosts: [a.example], routes: [{path: /, shield: {rate: off}}]}}", "sites.a.routes[0].shield.rate",
     "unknown key"),
])
def test_config_mistakes_name_the_line_and_key(sites, key, problem):
    text = POOLS % {"web": "http://127.0.0.1:1", "api": "http://127.0.0.1:2", "blog": "http://127.0.0.1:3"}
    with pytest.raises(ConfigError) as err:
        parse(text + "sites: " + sites + "\n")
    assert re.match(rf"test\.yaml:7: {re.escape(key)}: .*{problem}", str(err.value)), str(err.value)


def test_default_site_must_name_a_site_and_needs_sites():
    text = POOLS % {"web": "http://127.0.0.1:1", "api": "http://127.0.0.1:2", "blog": "http://127.0.0.1:3"}
    with pytest.raises(ConfigError, match=r"test\.yaml:8: default_site: no site named 'nope'"):
        parse(text + "sites: {a: {hosts: [a.example]}}\ndefault_site: nope\n")
    with pytest.raises(ConfigError, match=r"test\.yaml:7: default_site: needs a sites: section"):
        parse(text + "default_site: a\n")
    c = parse(text + "sites: {a: {hosts: [a.example]}}\ndefault_site: a\n")
    assert _where(SiteTable(c.sites, c.default_site), "other.example", "/x") == ("a", "/", None)
    assert parse(text).sites == {}      # no sites: the implicit one


# -- through a real edge ------------------------------------------------------------------------


def edge_addon(e):
    return next(a for a in e.master.addons.chain if type(a).__name__ == "Edge")


def answer(name: str, extra: str = "Cache-Control: no-store\r\n") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(name)}\r\nX-Debug: secret\r\n{extra}\r\n{name}".encode()


@pytest.fixture
def origins():
    made = {name: RecordingOrigin(answer(name)) for name in ("web", "api", "blog")}
    yield made
    for o in made.values():
        o.stop()


def seen(o: RecordingOrigin) -> tuple[str, str]:
    """The request line target and the Host of the origin's last request."""
    head = o.requests[-1].split(b"\r\n\r\n", 1)[0].decode("latin-1")
    target = head.split(" ")[1]
    host = re.search(r"(?im)^host: *(.*)$", head)[1].strip()
    return target, host


def config_for(origins, text: str = SITES) -> str:
    return text % {k: o.url for k, o in origins.items()}


def get(e, host: str, path: str, **kw) -> httpx.Response:
    return httpx.get(e.url + path, headers={"Host": host, **kw.pop("headers", {})}, timeout=10, **kw)


def test_hosts_and_prefixes_reach_their_pools_with_the_path_and_host_the_origin_must_see(edge, origins):
    e = edge(config_for(origins))
    r = get(e, "shop.example", "/api/items?id=1")
    assert r.text == "api" and seen(origins["api"]) == ("/items?id=1", "shop.example")    # strip_prefix
    r = get(e, "WWW.Shop.Example.", "/api/v2/x")
    assert r.text == "blog" and seen(origins["blog"]) == ("/api/v2/x", "WWW.Shop.Example.")    # longest prefix
    r = get(e, "blog.example", "/post/1")
    assert r.text == "blog" and seen(origins["blog"]) == ("/blog/post/1", "blog.example")      # origin_path
    r = get(e, "shop.example:8080", "/")
    assert r.text == "web" and seen(origins["web"]) == ("/", "shop.example:8080")
    assert get(e, "x.eu.blog.example", "/").text == "blog"


def test_unknown_host_gets_421_over_http1_and_http2(edge, origins, tls):
    e = edge(config_for(origins), cert=str(tls.pem))
    before = sum(len(o.requests) for o in origins.values())
    raw = exchange(e.host, e.port, b"GET / HTTP/1.1\r\nHost: other.example\r\n\r\n", until_close=False)
    assert status_of(raw) == 421 and b"421 Misdirected Request: this host is not served here" in raw
    assert status_of(exchange(e.host, e.port, b"GET / HTTP/1.1\r\nHost: shop.example.evil\r\n\r\n",
                              until_close=False)) == 421
    out = subprocess.run(["curl", "-s", "--http2", "--cacert", str(tls.ca), "-H", "Host: other.example",
                          "-w", "\n%{http_code} %{http_version}", f"https://127.0.0.1:{e.port}/"],
                         capture_output=True, text=True, timeout=20).stdout
    assert out.endswith("421 2")
    out = subprocess.run(["curl", "-s", "--http2", "--cacert", str(tls.ca), "-H", "Host: shop.example",
                          "-w", "\n%{http_code} %{http_version}", f"https://127.0.0.1:{e.port}/"],
                         capture_output=True, text=True, timeout=20).stdout
    assert out == "web\n200 2"          # :authority picks the site
    assert sum(len(o.requests) for o in origins.values()) == before + 1


def test_redirect_to_https_keeps_path_and_query_but_not_acme_challenges(edge, origins):
    e = edge(config_for(origins))
    r = get(e, "Secure.Example:8080", "/a/b?x=1&y=%20")
    assert r.status_code == 308 and r.headers["location"] == "https://secure.example/a/b?x=1&y=%20"
    assert "strict-transport-security" not in r.headers      # not over TLS
    r = httpx.post(e.url + "/form", headers={"Host": "secure.example"}, content=b"a=1")
    assert r.status_code == 308                               # 308 keeps the method and body
    assert not origins["web"].requests
    r = get(e, "secure.example", "/.well-known/acme-challenge/token1")
    assert r.status_code == 200 and r.text == "web"       # without acme: left for the origin
    assert seen(origins["web"])[0] == "/.well-known/acme-challenge/token1"


def test_hsts_only_over_tls_and_header_rules_on_both_sides_also_on_a_hit(edge, tls):
    cached = RecordingOrigin(answer("page", "Cache-Control: max-age=60\r\n"))
    try:
        e = edge(config_for({"web": cached, "api": cached, "blog": cached}), cert=str(tls.pem))
        with httpx.Client(verify=tls.client_context(), base_url=f"https://127.0.0.1:{e.port}", timeout=10) as c:
            first = c.get("/p", headers={"Host": "shop.example", "X-Drop-Me": "1", "X-Site": "forged"})
            hit = c.get("/p", headers={"Host": "shop.example"})
            blog = c.get("/", headers={"Host": "blog.example"})
            secure = c.get("/", headers={"Host": "secure.example"})
        plain = get(e, "blog.example", "/")
    finally:
        cached.stop()
    assert len(cached.requests) == 4            # /p once (then a hit), blog over https and over http, secure
    head = cached.requests[0].split(b"\r\n\r\n")[0]
    assert b"\r\nX-Site: shop" in head and b"forged" not in head and b"X-Drop-Me" not in head
    for r in (first, hit):
        assert r.headers["x-frame-options"] == "DENY" and "x-debug" not in r.headers
        assert r.headers.get_list("x-served-by") == ["edge-a", "edge-b"]
        assert "strict-transport-security" not in r.headers       # shop has no hsts
    assert hit.headers["cache-status"].startswith("edge; hit")
    assert blog.headers["strict-transport-security"] == "max-age=86400; includeSubDomains"
    assert "x-frame-options" not in blog.headers and blog.headers["x-debug"] == "secret"   # rules are per site
    assert secure.status_code == 200 and secure.headers["strict-transport-security"] == "max-age=31536000"
    assert "strict-transport-security" not in plain.headers


def test_per_route_cache_override_and_isolation_between_sites(edge):
    web = RecordingOrigin(lambda req: answer("web" + req.split(b" ")[1].decode(), "Cache-Control: max-age=60\r\n"))
    api = RecordingOrigin(answer("api", "Cache-Control: max-age=60\r\n"))
    heuristic = RecordingOrigin(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nblog")      # no freshness
    try:
        e = edge(config_for({"web": web, "api": api, "blog": heuristic}))
        a = [get(e, "shop.example", "/api/x") for _ in range(2)]
        assert len(api.requests) == 2 and "cache-status" not in a[1].headers      # cache: {enabled: false}
        w = [get(e, "shop.example", "/x") for _ in range(2)]
        assert len(web.requests) == 1 and w[1].headers["cache-status"].startswith("edge; hit")
        # blog.example/x is another site: its own entry, never shop's
        b = get(e, "blog.example", "/x")
        assert b.text == "blog" and len(heuristic.requests) == 1
        # static: default_ttl 1h makes the freshless answer cacheable, utm_source is not in the key
        s1 = get(e, "shop.example", "/static/a.css?v=1&utm_source=mail")
        s2 = get(e, "shop.example", "/static/a.css?utm_source=ad&v=1")
        s3 = get(e, "shop.example", "/static/a.css?v=2")
        assert s2.headers["cache-status"].startswith("edge; hit") and s1.text == s2.text
        assert len(web.requests) == 3 and seen(web)[0] == "/static/a.css?v=2"
        assert not s3.headers["cache-status"].startswith("edge; hit")
        # PURGE is per site: purging blog's /x leaves shop's /x cached
        assert httpx.request("PURGE", e.url + "/x", headers={"Host": "shop.example"}).status_code == 200
        assert get(e, "shop.example", "/x").headers["cache-status"].startswith("edge; fwd=uri-miss")
        assert httpx.request("PURGE", e.url + "/x", headers={"Host": "blog.example"}).status_code == 404
        assert get(e, "shop.example", "/x").headers["cache-status"].startswith("edge; hit")
        # the edge.purge command by URL finds the site and route
        assert e.master.commands.call("edge.purge", "http://shop.example/static/a.css?v=1") == "purged"
        assert get(e, "shop.example", "/static/a.css?v=1").headers["cache-status"].startswith("edge; fwd=uri-miss")
    finally:
        for o in (web, api, heuristic):
            o.stop()


def test_absolute_form_target_names_the_site_not_the_host_field(edge, origins):
    e = edge(config_for(origins))
    raw = exchange(e.host, e.port, b"GET http://blog.example/p HTTP/1.1\r\nHost: shop.example\r\n\r\n",
                   until_close=False)
    assert status_of(raw) == 200 and raw.endswith(b"blog")
    assert seen(origins["blog"]) == ("/blog/p", "blog.example")
    raw = exchange(e.host, e.port, b"GET http://other.example/p HTTP/1.1\r\nHost: shop.example\r\n\r\n",
                   until_close=False)
    assert status_of(raw) == 421 and not origins["web"].requests


@pytest.mark.parametrize("target, pool, sent", [
    (b"/api/../admin", "web", "/admin"),                   # leaves /api/: not the api pool, not stripped
    (b"//api/x", "api", "/x"),                              # merged slashes, then the route's strip
    (b"/api/./x/../y", "api", "/y"),
    (b"/%61pi/x", "api", "/x"),                             # an escaped letter is the letter
    (b"/../../etc/passwd", "blog", "/blog/etc/passwd"),     # blog: never above its origin_path
    (b"/%2e%2e/secret", "blog", "/blog/secret"),
])
def test_traversal_around_prefixes_stays_inside_the_route(edge, origins, target, pool, sent):
    e = edge(config_for(origins))
    host = b"blog.example" if pool == "blog" else b"shop.example"
    raw = exchange(e.host, e.port, b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", until_close=False)
    assert status_of(raw) == 200 and raw.endswith(pool.encode())
    assert seen(origins[pool])[0] == sent


@pytest.mark.parametrize("target", [b"/api%2F..", b"/api/x%2F..%2F..%2Fadmin", b"/api/..;/admin", b"/x/..%5Cy"])
def test_dot_segments_hidden_behind_encoded_slashes_are_refused(edge, origins, target):
    e = edge(config_for(origins))
    raw = exchange(e.host, e.port, b"GET " + target + b" HTTP/1.1\r\nHost: shop.example\r\n\r\n", until_close=False)
    assert status_of(raw) == 400 and b"dot segments" in raw
    assert not any(o.requests for o in origins.values())
    assert get(e, "shop.example", "/api/ok").text == "api"        # everyone else is served


def test_trace_access_log_status_and_metrics_per_site(edge, origins, tmp_path, confdir):
    log = tmp_path / "access.log"
    text = config_for(origins) + "admin: 127.0.0.1:0\n"
    e = edge(text, access_log=str(log))
    get(e, "shop.example", "/api/x?q=1")
    get(e, "blog.example", "/")
    get(e, "nobody.example", "/")
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines[0]["url"] == "http://shop.example/api/x?q=1"     # the client's URL, not the origin's
    assert lines[0]["edge"]["site"] == "shop" and lines[0]["edge"]["route"] == "/api/"
    assert lines[0]["edge"]["pool"] == "api"
    assert lines[1]["edge"]["site"] == "blog" and lines[2]["edge"]["site"] == "unknown host"
    assert lines[2]["status"] == 421
    admin = edge_addon(e).admin
    base = f"http://{admin.bound[0]}:{admin.bound[1]}"
    status = json.load(urllib.request.urlopen(base + "/status"))
    assert status["sites"]["shop"]["requests"] == 1 and status["misdirected"] == 1
    assert "site shop (shop.example, *.shop.example): 1 requests, routes / /api/ /api/v2/" in format_status(status)
    metrics = urllib.request.urlopen(base + "/metrics").read().decode()
    assert 'edge_site_requests_total{site="blog"} 1' in metrics and "edge_misdirected_requests_total 1" in metrics


def test_the_single_site_config_is_unchanged(edge, origins):
    """No sites: every host goes to the default pool, the path as sent, no 421, no trace key."""
    e = edge(POOLS % {k: o.url for k, o in origins.items()})
    r = get(e, "anything.example", "/api/../x")
    raw = exchange(e.host, e.port, b"GET /api/../x HTTP/1.1\r\nHost: any.example\r\n\r\n", until_close=False)
    assert r.text == "web" and status_of(raw) == 200
    assert seen(origins["web"]) == ("/api/../x", "any.example")


def test_answer_rules_on_a_streamed_response_and_per_route_compress(edge):
    text = "word " * 400
    chunked = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Debug: secret\r\nTransfer-Encoding: chunked\r\n"
               b"Cache-Control: no-store\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    page = (f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(text)}\r\n"
            f"Cache-Control: no-store\r\n\r\n{text}").encode()
    stream, pages = RecordingOrigin(chunked), RecordingOrigin(page)
    config = POOLS + """
sites:
  shop:
    hosts: [shop.example]
    headers: {response: {set: {X-Frame-Options: DENY}, remove: [X-Debug]}}
    routes:
      - {path: /, pool: web}
      - {path: /stream/, pool: api}
      - {path: /raw/, pool: web, compress: {enabled: false}}
"""
    try:
        e = edge(config % {"web": pages.url, "api": stream.url, "blog": pages.url})
        r = get(e, "shop.example", "/stream/x")
        assert r.text == "hello" and r.headers["x-frame-options"] == "DENY" and "x-debug" not in r.headers
        zipped = get(e, "shop.example", "/page", headers={"Accept-Encoding": "gzip"})
        raw = get(e, "shop.example", "/raw/page", headers={"Accept-Encoding": "gzip"})
    finally:
        stream.stop()
        pages.stop()
    assert zipped.headers["content-encoding"] == "gzip" and zipped.text == text
    assert "content-encoding" not in raw.headers and raw.text == text
    assert b"Accept-Encoding: gzip" in pages.requests[-1]       # the route's origin gets the client's


def test_a_background_refresh_goes_to_the_route_with_the_origin_path_once(edge):
    stale = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nCache-Control: max-age=1, stale-while-revalidate=60\r\nAge: 5\r\n\r\nblog"
    blog, web = RecordingOrigin(stale), RecordingOrigin(answer("web"))
    try:
        e = edge(config_for({"web": web, "api": web, "blog": blog}))
        assert get(e, "blog.example", "/p").text == "blog"
        second = get(e, "blog.example", "/p")
        assert second.headers["cache-status"].startswith("edge; hit") and "stale-while-revalidate" in \
            second.headers["cache-status"]
        requests = blog.wait_for_requests(2)
    finally:
        blog.stop()
        web.stop()
    assert [r.split(b" ")[1] for r in requests] == [b"/blog/p", b"/blog/p"]     # not /blog/blog/p
    assert not web.requests


def test_an_origin_location_in_its_own_paths_reaches_the_client_in_the_sites(edge):
    def redirect(location: str) -> bytes:
        return (f"HTTP/1.1 301 Moved\r\nLocation: {location}\r\nContent-Length: 0\r\n"
                f"Cache-Control: no-store\r\n\r\n").encode()

    def blog_script(request: bytes) -> bytes:
        target = request.split(b" ")[1]
        return redirect({b"/blog/old": "/blog/new?x=1", b"/blog/abs": "http://blog.example/blog/a",
                         b"/blog/away": "/elsewhere", b"/blog/other": "http://other.example/blog/x"}[target])

    blog, api = RecordingOrigin(blog_script), RecordingOrigin(redirect("/login?next=%2F"))
    try:
        e = edge(config_for({"web": api, "api": api, "blog": blog}))
        where = {path: get(e, "blog.example", path).headers["location"]
                 for path in ("/old", "/abs", "/away", "/other")}
        api_location = get(e, "shop.example", "/api/x").headers["location"]
        hit_location = get(e, "shop.example", "/x").headers["location"]        # the / route: as it is
    finally:
        blog.stop()
        api.stop()
    assert where == {"/old": "/new?x=1", "/abs": "http://blog.example/a", "/away": "/elsewhere",
                     "/other": "http://other.example/blog/x"}
    assert api_location == "/api/login?next=%2F" and hit_location == "/login?next=%2F"


def test_a_route_rate_limit_refuses_that_route_only(edge, origins):
    config = POOLS + """
sites:
  shop:
    hosts: [shop.example]
    routes:
      - {path: /, pool: web}
      - {path: /login, pool: api, rate_limit: {rate: 1/h, burst: 2}}
      - {path: /search, pool: api, rate_limit: {rate: 1/h, burst: 1, mode: detect}}
"""
    e = edge(config % {k: o.url for k, o in origins.items()})
    answers = [get(e, "shop.example", "/login") for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 429]
    assert int(answers[2].headers["retry-after"]) > 1000 and "request id" in answers[2].text
    assert len(origins["api"].requests) == 2
    assert get(e, "shop.example", "/").text == "web"             # the site's other routes are not limited
    assert [get(e, "shop.example", "/search").status_code for _ in range(2)] == [200, 200]   # detect only
    assert edge_addon(e).snapshot()["route_rate_refusals"] == 1


def test_a_route_rate_limit_is_kept_in_process():
    text = POOLS % {"web": "http://127.0.0.1:1", "api": "http://127.0.0.1:2", "blog": "http://127.0.0.1:3"}
    with pytest.raises(ConfigError, match=r"test\.yaml:11: sites\.a\.routes\[0\]\.rate_limit\.store: .*in-process"):
        parse(text + "sites:\n  a:\n    hosts: [a.example]\n    routes:\n"
                     "      - {path: /, rate_limit: {rate: 1/s, store: 'redis://127.0.0.1:1/0'}}\n")


def test_acme_names_take_the_sites_exact_hosts_and_redirects_name_the_tls_port(tmp_path):
    cfg = parse_config(f"""
listen: [127.0.0.1:8080, {{address: 127.0.0.1:8443, tls: true}}]
acme: {{directory: https://acme.example/dir, storage: {tmp_path}, names: [extra.example]}}
pools: {{web: {{origins: [http://127.0.0.1:9001]}}}}
routing: {{default_pool: web}}
sites:
  shop: {{hosts: [shop.example, "*.shop.example", 127.0.0.1], routes: [{{path: /, pool: web}}]}}
  blog: {{hosts: [blog.example, extra.example]}}
""", "t.yaml")
    assert cfg.acme_names() == ("extra.example", "shop.example", "blog.example")
    assert cfg.https_port == 8443
    assert parse_config("pools: {web: {origins: [http://127.0.0.1:9001]}}\n").https_port == 443


SHIELDED_SITE = """\
pools: {web: {origins: [%(web)s]}}
routing: {default_pool: web}
access_log: %(log)s
shield:
  waf: {paranoia: 1, anomaly_threshold: 5}
  bots: {block: [scanner, bad]}
sites:
  shop:
    hosts: [shop.example]
    routes:
      - {path: /, pool: web, headers: {X-Forwarded-Proto: https}, shield: {waf: off}}
      - {path: /, pool: web}
      - {path: /api/, pool: web, shield: {waf: off}}
      - {path: /beta/, pool: web, shield: {waf: detect, bots: detect}}
      - {path: /feeds/, pool: web, shield: {bots: off}}
"""
SQLI = "?id=1%27%20OR%20%271%27%3D%271"


@needs_crs
def test_a_routes_shield_profile_turns_parts_off_or_to_detect_for_that_route(edge, tmp_path):
    web = RecordingOrigin(answer("web"))
    log = tmp_path / "access.log"
    try:
        e = edge(SHIELDED_SITE % {"web": web.url, "log": log})
        scanner = {"User-Agent": ""}        # class `bad` (no User-Agent); the CRS only notes it (2 points)
        outcomes = {
            "sqli /": get(e, "shop.example", "/products" + SQLI).status_code,
            "sqli /api/": get(e, "shop.example", "/api/products" + SQLI).status_code,
            "sqli /beta/": get(e, "shop.example", "/beta/products" + SQLI).status_code,
            "scanner /": get(e, "shop.example", "/", headers=scanner).status_code,
            "scanner /feeds/": get(e, "shop.example", "/feeds/rss", headers=scanner).status_code,
            "scanner /beta/": get(e, "shop.example", "/beta/", headers=scanner).status_code,
            "sqli /feeds/": get(e, "shop.example", "/feeds/rss" + SQLI).status_code,
        }
        assert outcomes == {"sqli /": 403, "sqli /api/": 200, "sqli /beta/": 200, "scanner /": 403,
                            "scanner /feeds/": 200, "scanner /beta/": 200, "sqli /feeds/": 403}
        assert len(web.requests) == 4           # /api/, /beta/ (twice), /feeds/: the others were refused
        records = [json.loads(line) for line in log.read_text().splitlines()]
        by_path = {r["url"].split("shop.example", 1)[1]: r["edge"] for r in records}
        assert by_path["/api/products" + SQLI]["waf"] == "skipped on this route"
        assert by_path["/beta/products" + SQLI]["shield"].startswith("detect: waf")
        assert by_path["/feeds/rss"]["bot"] == "not judged on this route"
    finally:
        web.stop()


@needs_crs
def test_a_route_chosen_by_a_header_the_scrub_removes_is_not_inspected_under_its_profile(edge, tmp_path):
    """A route with its WAF off picked by `X-Forwarded-Proto: https`, which the request scrub then
    drops for an untrusted client: the shield judged it by the lax route, the request would go by
    the strict one. Fail closed: 403, and the origin gets nothing."""
    web = RecordingOrigin(answer("web"))
    try:
        e = edge(SHIELDED_SITE % {"web": web.url, "log": tmp_path / "access.log"})
        forged = get(e, "shop.example", "/products" + SQLI, headers={"X-Forwarded-Proto": "https"})
        assert forged.status_code == 403 and not web.requests
        assert get(e, "shop.example", "/products").status_code == 200        # a normal client beside it
        first = json.loads((tmp_path / "access.log").read_text().splitlines()[0])["edge"]
        assert first["waf"] == "skipped on this route"                       # what the shield saw
        assert first["route"] == "/: refused, inspected under another route's shield profile"
    finally:
        web.stop()


def test_a_route_shield_profile_reads_on_and_off_as_yaml_writes_them():
    text = POOLS % {"web": "http://127.0.0.1:1", "api": "http://127.0.0.1:2", "blog": "http://127.0.0.1:3"}
    c = parse(text + "sites: {a: {hosts: [a.example], routes: [{path: /, shield: {waf: off, bots: detect}}]}}\n")
    assert c.sites["a"].routes[0].shield == RouteShield(waf="off", bots="detect")
