"""mitmweb as the edge's console: the flow list shows the public URL the client asked (also for
requests refused before any origin was chosen), the verdict as a marker and a comment with one
decision per line, the status bar names the edge's listeners. Checked through a real web
master and mitmweb's own JSON API (what its UI renders), with the origin's view beside it."""

from __future__ import annotations

import json
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from addons.internals import CONSOLE_STYLE
from addons.console.verdict import MARKS, Verdict, comment, listen_address, public_parts, verdict
from mitmproxy import flowfilter

from tests.conftest import free_port
from tests.rawnet import CLOSE, RecordingOrigin, exchange, status_of
from tests.test_proxy import curl
from tests.test_shield import needs_crs

SITE = """
pools: {p: {origins: [%s]}}
sites:
  shop:
    hosts: [shop.example]
    routes:
      - {path: /api/, pool: p, strip_prefix: true}
      - {path: /, pool: p}
shield:
  bots: {block: [scanner]}
"""


# -- the pure part ------------------------------------------------------------------------------

def test_verdicts_and_their_markers():
    origin = {"pool": "eu", "origin": "http://127.0.0.1:9001"}
    cases = [
        ({"shield": "bots: scanner (403)"}, 403, True, None, "none", "refused", "refused (shield: bots: scanner (403))"),
        ({"site": "unknown host"}, 421, True, None, "none", "refused", "refused (site: unknown host)"),
        ({"cache": "hit; ttl=60", **origin}, 200, False, None, "hit", "hit", "hit"),
        ({"cache": "fwd=uri-miss; stored", **origin}, 200, False, None, "uri-miss", "miss",
         "miss → eu http://127.0.0.1:9001"),
        (origin, 200, False, None, "none", "forwarded", "forwarded → eu http://127.0.0.1:9001"),
        ({**origin, "stream": "response"}, 200, False, None, "none", "forwarded", "forwarded, streamed → eu http://127.0.0.1:9001"),
        ({**origin, "failover": ["127.0.0.1:9002 server closed connection"]}, 200, False, None, "none",
         "failed over", "failed over → eu http://127.0.0.1:9001 (after 127.0.0.1:9002)"),
        ({**origin, "upstream": "refused: connection refused"}, 502, True, None, "none", "error",
         "error (upstream: refused: connection refused)"),
        (origin, None, False, "client disconnected", "none", "error", "error (client disconnected)"),
        ({"failed": "Cache.response: KeyError", **origin}, 502, True, None, "none", "failed closed",
         "failed closed (failed: Cache.response: KeyError)"),
        ({"shield": "detect: waf: request blocked (403)", **origin}, 200, False, None, "none", "detected",
         "detected → eu http://127.0.0.1:9001 (shield: detect: waf: request blocked (403))"),
        ({"shield": "allow-listed", **origin}, 200, False, None, "none", "forwarded", "forwarded → eu http://127.0.0.1:9001"),
        ({"redirect": "https"}, 308, True, None, "none", "answered", "answered (redirect: https)"),
    ]
    for rec, status, by_edge, error, cache, word, headline in cases:
        v = verdict(rec, status, by_edge, error, cache)
        assert (v.word, v.headline, v.mark) == (word, headline, MARKS.get(word, "")), rec
    assert {MARKS["refused"], MARKS["hit"], MARKS["failed over"]} == {":no_entry:", ":zap:", ":repeat:"}
    assert "miss" not in MARKS and "forwarded" not in MARKS     # `~marked` finds what is unusual


def test_comment_has_one_decision_per_line():
    v = Verdict("miss", "", "miss → eu http://127.0.0.1:9001")
    rec = {"site": "shop", "route": "/api/", "pool": "eu", "origin": "http://127.0.0.1:9001",
           "geo": {"country": "DE", "continent": "EU", "pool": None}, "scrubbed": ["X-Powered-By", "Via"],
           "dropped": [], "cache": "fwd=uri-miss; stored"}
    assert comment(v, rec, "http://127.0.0.1:9001/users?id=1", "api.internal").split("\n") == [
        "miss → eu http://127.0.0.1:9001", "site: shop", "route: /api/", "pool: eu",
        "origin: http://127.0.0.1:9001/users?id=1", "geo: country=DE continent=EU",
        "scrubbed: X-Powered-By, Via", "cache: fwd=uri-miss; stored", "request Host: api.internal"]
    refused = Verdict("refused", ":no_entry:", "refused (shield: waf: request blocked (403))")
    assert "origin: http://127.0.0.1:9001" in comment(refused, rec, "http://127.0.0.1:9001/users?id=1").split("\n")


def test_public_parts():
    assert public_parts("http://shop.example/a?b=c") == ("http", "shop.example", 80, "/a?b=c", "shop.example")
    assert public_parts("https://shop.example:8443/") == ("https", "shop.example", 8443, "/", "shop.example:8443")
    assert public_parts("http://[::1]:8080/x") == ("http", "::1", 8080, "/x", "[::1]:8080")
    assert public_parts("http://[::1]/x") == ("http", "::1", 80, "/x", "[::1]")
    assert public_parts("http://shop.example*") == ("http", "shop.example", 80, "*", "shop.example")
    for bad in ("shop.example/x", "ftp://a/x", "http://a:99999/", "http://a:b/", "http://:80/", "http://a:1:2/",
                "http://[::1/", "http://[::1]x/"):
        assert public_parts(bad) is None, bad
    assert listen_address([("127.0.0.1", 8080, "tcp"), ("127.0.0.1", 8443)]) == ("127.0.0.1", 8080)
    assert listen_address([]) is None


# -- through a real web master ------------------------------------------------------------------

class WebEdge:
    """A running edge under mitmweb and the JSON API its UI reads."""

    def __init__(self, e, web_port: int) -> None:
        self.e = e
        token = parse_qs(urlsplit(e.master.web_url).query)["token"][0]
        self.api = httpx.Client(base_url=f"http://127.0.0.1:{web_port}", headers={"Authorization": f"Bearer {token}"})

    def get(self, path: str):
        r = self.api.get(path)
        r.raise_for_status()
        return r.json()

    def flows(self, n: int) -> list[dict]:
        """The first n flows as mitmweb's UI gets them, once each is finished and annotated."""
        deadline = time.monotonic() + 10
        while True:
            got = self.get("/flows")
            if len(got) >= n and all(f["comment"] for f in got[:n]):
                return got[:n]
            assert time.monotonic() < deadline, got
            time.sleep(0.02)


def web_edge(edge, config, **kw) -> WebEdge:
    port = free_port()
    return WebEdge(edge(config, web=True, web_port=port, **kw), port)


def shown_url(f: dict) -> str:
    """The flow list's URL column, as mitmweb's UI builds it (RequestUtils.pretty_url)."""
    r = f["request"]
    default = {"http": 80, "https": 443}.get(r["scheme"])
    return f"{r['scheme']}://{r['pretty_host']}{'' if r['port'] == default else ':' + str(r['port'])}{r['path']}"


def lines(f: dict) -> list[str]:
    return f["comment"].split("\n")


def test_miss_hit_and_a_rewritten_path_show_the_public_url(edge, origin, tmp_path):
    o = origin("o")
    log = tmp_path / "access.log"
    w = web_edge(edge, SITE % o.url, access_log=str(log))
    with httpx.Client(base_url=w.e.url, headers={"Host": "shop.example"}) as c:
        assert c.get("/cacheable").status_code == 200
        assert c.get("/cacheable").status_code == 200
        assert c.get("/api/echo?x=1").json()["path"] == "/echo?x=1"
    miss, hit, api = w.flows(3)
    assert [shown_url(f) for f in (miss, hit, api)] == [
        "http://shop.example/cacheable", "http://shop.example/cacheable", "http://shop.example/api/echo?x=1"]
    assert lines(miss)[0] == f"miss → p {o.url}" and miss["marked"] == ""
    assert f"origin: {o.url}/cacheable" in lines(miss) and "site: shop" in lines(miss)
    assert lines(hit)[0] == "hit" and hit["marked"] == "⚡"
    assert lines(api)[0] == f"miss → p {o.url}"
    assert f"origin: {o.url}/echo?x=1" in lines(api)        # what the origin was asked, kept
    # what mitmproxy's Python side says (filters, exports) agrees with the list
    flows = list(w.e.master.view)
    assert [f.request.pretty_url for f in flows] == [shown_url(f) for f in (miss, hit, api)]
    assert [f.marked for f in flows] == ["", ":zap:", ""]
    # the origin got what it would get without mitmweb; the access log keeps the public URL
    assert [(s.path, s.headers["host"]) for s in o.seen] == [("/cacheable", "shop.example"), ("/echo?x=1", "shop.example")]
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["url"] for r in logged] == ["http://shop.example/cacheable"] * 2 + ["http://shop.example/api/echo?x=1"]
    assert [r["edge"].get("origin") for r in logged] == [o.url, None, o.url]


def test_refusals_before_any_origin_show_the_public_url(edge, origin):
    o = origin("o")
    w = web_edge(edge, SITE % o.url)
    with httpx.Client(base_url=w.e.url) as c:
        assert c.get("/admin?a=1", headers={"Host": "shop.example", "User-Agent": "sqlmap/1.7.2#stable"}).status_code == 403
        assert c.get("/x", headers={"Host": "other.example:8080"}).status_code == 421
        assert c.get("/", headers={"Host": "shop.example"}).status_code == 200      # a normal client beside them
    bot, unknown, normal = w.flows(3)
    assert [shown_url(f) for f in (bot, unknown, normal)] == [
        "http://shop.example/admin?a=1", "http://other.example:8080/x", "http://shop.example/"]
    assert lines(bot)[0].startswith("refused (shield: bots: ") and bot["marked"] == "⛔"
    assert lines(unknown)[0] == "refused (site: unknown host)" and unknown["marked"] == "⛔"
    assert not any(line.startswith("origin:") for line in lines(bot) + lines(unknown))
    assert normal["marked"] == "" and lines(normal)[0] == f"miss → p {o.url}"
    assert [s.path for s in o.seen] == ["/"]
    # the filters the README suggests, as mitmweb evaluates them
    flows = list(w.e.master.view)
    for expr, matched in [("~marker no_entry", [bot, unknown]), ("~comment shield", [bot]), ("~c 421", [unknown]),
                          ("~marked", [bot, unknown]), ("~comment \"^refused\"", [bot, unknown]),
                          ("~d shop.example", [bot, normal])]:
        assert [f.id for f in flows if flowfilter.parse(expr)(f)] == [f["id"] for f in matched], expr


@needs_crs
def test_a_waf_refusal_is_marked_with_its_rule(edge, origin):
    o = origin("o")
    w = web_edge(edge, SITE % o.url + "  waf: {paranoia: 1, anomaly_threshold: 5}\n")
    r = httpx.get(f"{w.e.url}/products?id=1%27%20OR%20%271%27%3D%271", headers={"Host": "shop.example"})
    assert r.status_code == 403
    (f,) = w.flows(1)
    assert shown_url(f) == "http://shop.example/products?id=1%27%20OR%20%271%27%3D%271"
    assert lines(f)[0] == "refused (shield: waf: request blocked (403))" and f["marked"] == "⛔"
    assert any(line.startswith("waf: ") and "942100" in line for line in lines(f))
    assert f"origin: {o.url}" in lines(f) or not any(line.startswith("origin:") for line in lines(f))  # not asked
    assert not o.seen


def test_tls_http2_and_a_trusted_proxys_public_address(edge, origin, tls):
    o = origin("o")
    w = web_edge(edge, SITE.replace("pools:", "trusted_proxies: [127.0.0.1/32]\npools:") % o.url, cert=str(tls.pem))
    status, headers, _ = curl("--http2", "--cacert", str(tls.ca), "-H", f"Host: shop.example:{w.e.port}",
                              f"https://127.0.0.1:{w.e.port}/api/echo")        # curl makes it the :authority
    assert status == 200 and headers[":version"] == "HTTP/2"
    refused = httpx.get(f"{w.e.url}/admin", headers={"Host": "lb.internal", "X-Forwarded-Host": "shop.example",
                                                     "X-Forwarded-Proto": "https", "User-Agent": "sqlmap/1.7.2"})
    assert refused.status_code == 403
    h2, bot = w.flows(2)
    assert shown_url(h2) == f"https://shop.example:{w.e.port}/api/echo" and o.seen[0].path == "/echo"
    assert f"origin: {o.url}/echo" in lines(h2) and not any(line.startswith("request Host") for line in lines(h2))
    # refused before the request scrub: the proxy's forwarded address is still believed
    assert shown_url(bot) == "https://shop.example/admin" and bot["marked"] == "⛔"
    assert "request Host: lb.internal" in lines(bot)
    assert w.e.master.view[1].request.pretty_url == "https://shop.example/admin"


def test_a_failover_is_marked(edge, origin):
    broken = RecordingOrigin(lambda _: CLOSE)       # accepts, then hangs up unanswered
    good = origin("good")
    try:
        w = web_edge(edge, f"pools:\n  p:\n    origins: [{broken.url}, {good.url}]\n")
        with httpx.Client(base_url=w.e.url) as c:
            answers = [c.get("/echo", headers={"Host": "shop.example"}) for _ in range(2)]
        assert [r.json()["origin"] for r in answers] == ["good", "good"]
        flows = w.flows(2)
        over = [f for f in flows if f["marked"] == "🔁"]
        assert len(over) == 1 and len(broken.requests) == 1
        assert lines(over[0])[0] == f"failed over → p {good.url} (after 127.0.0.1:{broken.port})"
        assert any(line.startswith(f"failover: 127.0.0.1:{broken.port} ") for line in lines(over[0]))
        assert shown_url(over[0]) == "http://shop.example/echo"
    finally:
        broken.stop()


def test_hostile_hosts_are_shown_as_they_came(edge, origin):
    """A Host the public URL cannot be split from leaves the flow's URL as it was; every flow is
    annotated and every client answered."""
    o = origin("o")
    w = web_edge(edge, [o.url])
    hosts = [b"shop.example:99999", b"[::1", b"a:b:c", "ex\u00e4mple.com".encode(), b""]
    for host in hosts:
        answer = exchange(w.e.host, w.e.port, b"GET /x HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        assert status_of(answer) is not None, host
    assert httpx.get(f"{w.e.url}/", headers={"Host": "shop.example"}).status_code == 200
    flows = w.get("/flows")
    assert all(f["comment"] for f in flows) and shown_url(flows[-1]) == "http://shop.example/"
    assert [lines(f)[0] for f in flows[1:5]] == ["refused (protocol: refused: invalid Host)"] * 4
    assert shown_url(flows[0]).startswith("http://shop.example:99999")     # unsplittable: left as it was


def test_a_streamed_response_is_annotated_once_relayed(edge):
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nCache-Control: no-store\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    o = RecordingOrigin(lambda _: chunked)          # no length: streamed
    try:
        w = web_edge(edge, [o.url])
        assert httpx.get(f"{w.e.url}/live", headers={"Host": "shop.example"}).text == "hello"
        (f,) = w.flows(1)
        assert lines(f)[0] == f"miss, streamed → default {o.url}" and f["marked"] == ""
        assert shown_url(f) == "http://shop.example/live" and "stream: response" in lines(f)
    finally:
        o.stop()


def test_an_origin_that_cannot_be_reached_is_an_error(edge):
    w = web_edge(edge, f"pools:\n  p:\n    origins: [http://127.0.0.1:{free_port()}]\n")
    assert httpx.get(f"{w.e.url}/page", headers={"Host": "shop.example"}).status_code in (502, 503)
    (f,) = w.flows(1)
    assert lines(f)[0].startswith("error") and f["marked"] == "❌"
    assert shown_url(f) == "http://shop.example/page"


def test_live_update_carries_the_annotation(edge, origin):
    """mitmweb's view sent the flow to the UI before the edge's last hook: the console asks for
    an update (mitmproxy's `update` hook, which the UI's websocket follows) with the comment set."""
    seen: list[tuple[str, str]] = []

    class Watch:
        def update(self, flows) -> None:
            seen.extend((f.comment, f.request.pretty_url) for f in flows)

    o = origin("o")
    w = web_edge(edge, SITE % o.url, extra_addons=[Watch()])
    httpx.get(f"{w.e.url}/", headers={"Host": "shop.example"})
    (f,) = w.flows(1)
    assert seen[-1] == (f["comment"], "http://shop.example/") and lines(f)[0] == f"miss → p {o.url}"


def test_status_bar_names_the_listeners(edge, origin):
    o = origin("o")
    first, second = free_port(), free_port()
    w = web_edge(edge, f"listen: [127.0.0.1:{first}, 127.0.0.1:{second}]\npools: {{p: {{origins: [{o.url}]}}}}\n")
    options = w.get("/options")
    # mitmweb's status bar renders `${listen_host || "*"}:${listen_port || 8080}`
    assert (options["listen_host"]["value"], options["listen_port"]["value"]) == ("127.0.0.1", first)
    assert options["web_columns"]["value"][-1] == "comment"
    servers = w.get("/state")["servers"]
    assert sorted(tuple(a[:2]) for s in servers.values() for a in s["listen_addrs"]) == sorted(
        [("127.0.0.1", first), ("127.0.0.1", second)])
    assert httpx.get(f"http://127.0.0.1:{second}/").status_code == 200     # the defaults bind nothing else


def test_the_page_keeps_the_comments_line_breaks(edge, origin):
    w = web_edge(edge, [origin("o").url])
    page = w.api.get("/").text
    assert CONSOLE_STYLE.decode() in page and page.index(CONSOLE_STYLE.decode()) < page.index("</head>")
    assert 'src="./static/index-' in page                   # mitmweb's own page, with the style
    anonymous = httpx.get(w.api.base_url.join("/"))         # mitmweb's authentication stays
    assert anonymous.status_code == 403 and "password" in anonymous.text and CONSOLE_STYLE.decode() not in anonymous.text
    assert httpx.get(w.api.base_url.join("/flows")).status_code == 403
