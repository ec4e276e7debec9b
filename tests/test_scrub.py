"""Origin masking through a real edge: what the origin is told, and what the client never sees."""

import json

import httpx
import pytest

from edgecli.origins import demo_pages


def leaky_pages(o):
    """Pages that leak every way the scrub addon knows about."""
    pages = demo_pages()
    pages["/everything"] = lambda req, o: (200, [
        ("Location", f"{o.url}/next"),
        ("Content-Location", f"{o.url}/everything.json"),
        ("Refresh", f"3; url={o.url}/later"),
        ("Link", f"<{o.url}/a.css>; rel=preload, <https://cdn.example/b.js>; rel=preload"),
        ("Set-Cookie", f"a=1; Domain={o.host}; Path=/"),
        ("Set-Cookie", "b=2; Path=/"),
        ("Via", "1.1 varnish-internal"),
        ("X-Runtime", "0.004"),
        ("X-AspNet-Version", "4.0.30319"),
        ("X-Upstream", f"{o.host}:{o.port}"),
        ("X-Node", "fd00::17"),
        ("X-Served-By", "cache 192.168.10.4 fra"),
        ("X-Client-Seen", "198.51.100.4"),          # a public address that is not the origin: kept
        ("X-Custom", "hello"),
    ], b"ok")
    return pages


@pytest.fixture
def leaky(origin):
    o = origin("eu")
    o.pages = leaky_pages(o)
    return o


def test_client_never_sees_the_origin(leaky, edge):
    e = edge([leaky.url])
    r = httpx.get(f"{e.url}/everything", headers={"Host": "shop.example"})
    assert r.status_code == 200
    h = r.headers
    assert h["server"] == "edge"
    for gone in ("x-powered-by", "via", "x-runtime", "x-aspnet-version", "x-upstream", "x-node", "x-served-by"):
        assert gone not in h, gone
    assert h["location"] == "http://shop.example/next"
    assert h["content-location"] == "http://shop.example/everything.json"
    assert h["refresh"] == "3; url=http://shop.example/later"
    assert h["link"] == "<http://shop.example/a.css>; rel=preload, <https://cdn.example/b.js>; rel=preload"
    assert h.get_list("set-cookie") == ["a=1; Domain=shop.example; Path=/", "b=2; Path=/"]
    assert h["x-client-seen"] == "198.51.100.4" and h["x-custom"] == "hello"
    raw = "\n".join(f"{k}: {v}" for k, v in h.multi_items())
    assert str(leaky.port) not in raw and "Apache" not in raw and "PHP" not in raw


def test_redirect_to_the_edge_itself_keeps_loopback(origin, edge):
    o = origin("eu")
    e = edge([o.url])
    r = httpx.get(f"{e.url}/redirect")
    assert r.status_code == 302
    assert r.headers["location"] == f"{e.url}/"        # the edge's own 127.0.0.1 is not a leak


def test_server_header_can_be_removed(origin, edge):
    o = origin("eu")
    e = edge(f"pools: {{eu: {{origins: [{o.url}]}}}}\nscrub: {{server_header: null, strip: []}}\n")
    r = httpx.get(f"{e.url}/")
    assert "server" not in r.headers
    assert r.headers["x-powered-by"] == "PHP/8.3.1"     # strip list emptied on purpose


def test_origin_is_told_who_the_client_is_and_spoofing_is_dropped(origin, edge):
    o = origin("eu")
    e = edge([o.url])
    httpx.get(f"{e.url}/echo", headers={
        "Host": "shop.example", "X-Forwarded-For": "6.6.6.6", "X-Real-IP": "6.6.6.6",
        "Forwarded": "for=6.6.6.6", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"})
    seen = o.seen[-1].headers
    assert seen["host"] == "shop.example"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http" and seen["x-forwarded-host"] == "shop.example"
    assert seen["forwarded"] == 'for=127.0.0.1;proto=http;host="shop.example"'
    assert "x-real-ip" not in seen and "6.6.6.6" not in json.dumps(seen)


def test_trusted_proxy_forwarding_is_believed(origin, edge):
    o = origin("eu")
    e = edge(f"trusted_proxies: [127.0.0.1/32]\npools: {{eu: {{origins: [{o.url}]}}}}\n")
    httpx.get(f"{e.url}/echo", headers={"X-Forwarded-For": "6.6.6.6, 198.51.100.7",
                                         "X-Forwarded-Proto": "https", "X-Forwarded-Host": "shop.example"})
    seen = o.seen[-1].headers
    assert seen["x-forwarded-for"] == "198.51.100.7"    # right-most untrusted; the spoofed hop is gone
    assert seen["forwarded"] == 'for=198.51.100.7;proto=https;host="shop.example"'


def test_hop_by_hop_headers_do_not_reach_the_origin(origin, edge):
    o = origin("eu")
    e = edge([o.url])
    httpx.get(f"{e.url}/echo", headers={"Connection": "keep-alive, X-Secret", "X-Secret": "s3cret",
                                         "Keep-Alive": "timeout=5", "TE": "trailers",
                                         "Proxy-Authorization": "Basic Zm9vOmJhcg==", "X-Kept": "1"})
    seen = o.seen[-1].headers
    for gone in ("x-secret", "keep-alive", "te", "proxy-authorization"):
        assert gone not in seen, gone
    assert seen["x-kept"] == "1"
