"""The cache through a real edge, with origins that count what they receive."""

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from edgecli.origins import Seen

BIG = os.urandom(5000)          # incompressible: stays over max_object after compression


def page(cc=None, body=b"payload", etag=None, status=200, extra=()):
    """An origin page: answers 304 itself when the client's validator matches."""
    def handler(req: Seen, o):
        headers = [("Content-Type", "text/plain")]
        if cc is not None:
            headers.append(("Cache-Control", cc))
        if etag:
            headers.append(("ETag", etag))
            if req.headers.get("if-none-match") == etag:
                return 304, headers, b""
        return status, headers + list(extra), body
    return handler


@pytest.fixture
def site(origin, edge):
    """An origin with cacheable and uncacheable pages, and an edge (cache on) in front."""
    o = origin("eu", pages={
        "/fresh": page("max-age=60", b"fresh body", etag='"f1"'),
        "/nostore": page("no-store"),
        "/private": page("private, max-age=60"),
        "/cookie": page("max-age=60", extra=[("Set-Cookie", "sid=secret")]),
        "/cookie-private": page('max-age=60, private="Set-Cookie"', extra=[("Set-Cookie", "sid=secret")]),
        "/validate": page("max-age=0", b"validated body", etag='"v1"'),
        "/novalidator": page(None),
        "/swr": page("max-age=0, stale-while-revalidate=60", b"swr body"),
        "/sie": page("max-age=0, stale-if-error=60", b"stale body", etag='"s1"'),
        "/mustreval": page("max-age=0, must-revalidate", b"strict body", etag='"m1"'),
        "/lang": lambda req, o: (200, [("Cache-Control", "max-age=60"), ("Vary", "Accept-Language")],
                                 f"lang={req.headers.get('accept-language')}".encode()),
        "/targeted": page("no-store", b"cdn body", extra=[("CDN-Cache-Control", "max-age=60")]),
        "/public": page("public, max-age=60"),
        "/item": lambda req, o: (200, [("Cache-Control", "max-age=60")], f"item {req.method}".encode()),
        "/big": page("max-age=60", BIG),
    })
    e = edge(f"pools: {{eu: {{origins: [{o.url}]}}}}\ncache: {{max_size: 1MB, max_object: 4KB}}\n")
    return o, e


def hits(o, path):
    return sum(1 for s in o.seen if s.path == path)


def warm_then(e, path, method="GET", headers=None):
    """Store `path` with one GET, then make the request under test on the same connection."""
    with httpx.Client() as c:
        c.get(f"{e.url}{path}")
        return c.request(method, f"{e.url}{path}", headers=headers)


def test_fresh_response_is_served_from_memory(site):
    o, e = site
    with httpx.Client() as c:
        first = c.get(f"{e.url}/fresh")
        second = c.get(f"{e.url}/fresh")
    assert first.text == second.text == "fresh body"
    assert hits(o, "/fresh") == 1
    # ttl is 60 less the age, which the origin's whole-second Date can make up to a second
    assert first.headers["cache-status"] in ('edge; fwd=uri-miss; fwd-status=200; stored; ttl=60',
                                              'edge; fwd=uri-miss; fwd-status=200; stored; ttl=59')
    assert second.headers["cache-status"].startswith("edge; hit; ttl=")
    assert int(second.headers["age"]) >= 0 and second.headers["etag"] == '"f1"'
    assert second.headers["server"] == "edge" and "x-powered-by" not in second.headers   # hits are scrubbed too


@pytest.mark.parametrize("path, why", [("/nostore", "no-store"), ("/private", "private"),
                                       ("/novalidator", "no-freshness")])
def test_uncacheable_responses_are_not_stored(site, path, why):
    o, e = site
    with httpx.Client() as c:
        statuses = [c.get(f"{e.url}{path}").headers["cache-status"] for _ in range(2)]
    assert hits(o, path) == 2
    assert statuses[1] == f'edge; fwd=uri-miss; fwd-status=200; detail="not stored: {why}"'


def test_set_cookie_on_an_explicitly_fresh_response_is_stored(site):
    """RFC 9111 7.3: an origin that marks a response with a cookie cacheable means it (a guessed
    lifetime never applies to one: test_cache_keys)."""
    o, e = site
    r = warm_then(e, "/cookie")
    assert r.headers["cache-status"].startswith("edge; hit") and hits(o, "/cookie") == 1
    assert r.headers["set-cookie"] == "sid=secret"


def test_private_set_cookie_stores_the_response_without_its_cookie(site):
    """private="Set-Cookie" (RFC 9111 5.2.2.7) is the origin's way to share the page, not the cookie."""
    o, e = site
    with httpx.Client() as c:
        first, second = c.get(f"{e.url}/cookie-private"), c.get(f"{e.url}/cookie-private")
    assert first.headers["set-cookie"] == "sid=secret"
    assert second.headers["cache-status"].startswith("edge; hit") and "set-cookie" not in second.headers
    assert hits(o, "/cookie-private") == 1


def test_stale_entry_is_revalidated_with_its_validator(site):
    o, e = site
    r = warm_then(e, "/validate")
    assert r.status_code == 200 and r.text == "validated body"
    assert o.seen[-1].headers["if-none-match"] == '"v1"'          # the origin answered 304
    assert r.headers["cache-status"].startswith("edge; fwd=stale; fwd-status=304")


def test_client_validator_is_answered_304_from_memory(site):
    o, e = site
    r = warm_then(e, "/fresh", headers={"If-None-Match": '"f1"'})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == '"f1"'
    assert hits(o, "/fresh") == 1


def test_head_is_answered_from_a_stored_get(site):
    o, e = site
    r = warm_then(e, "/fresh", "HEAD")
    assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == str(len("fresh body"))
    assert hits(o, "/fresh") == 1


def test_range_is_cut_from_the_stored_response(site):
    o, e = site
    with httpx.Client() as c:
        c.get(f"{e.url}/fresh")
        r = c.get(f"{e.url}/fresh", headers={"Range": "bytes=0-4"})
        beyond = c.get(f"{e.url}/fresh", headers={"Range": "bytes=100-"})
    assert r.status_code == 206 and r.content == b"fresh" and r.headers["content-range"] == "bytes 0-4/10"
    assert beyond.status_code == 416 and beyond.headers["content-range"] == "bytes */10"
    assert hits(o, "/fresh") == 1


def test_vary_keeps_one_variant_per_header_value(site):
    o, e = site
    with httpx.Client() as c:
        en = c.get(f"{e.url}/lang", headers={"Accept-Language": "en"}).text
        fr = c.get(f"{e.url}/lang", headers={"Accept-Language": "fr"})
        en_again = c.get(f"{e.url}/lang", headers={"Accept-Language": "en"})
    assert (en, fr.text, en_again.text) == ("lang=en", "lang=fr", "lang=en")
    assert fr.headers["cache-status"].startswith("edge; fwd=vary-miss")
    assert en_again.headers["cache-status"].startswith("edge; hit")
    assert hits(o, "/lang") == 2


def test_cdn_cache_control_overrides_cache_control(site):
    o, e = site
    r = warm_then(e, "/targeted")
    assert r.text == "cdn body" and r.headers["cache-status"].startswith("edge; hit")
    assert hits(o, "/targeted") == 1


def test_authorized_requests_are_stored_only_when_the_origin_says_public(site):
    o, e = site
    auth = {"Authorization": "Bearer t"}
    with httpx.Client() as c:
        for _ in range(2):
            c.get(f"{e.url}/fresh?auth", headers=auth)
            c.get(f"{e.url}/public", headers=auth)
    assert sum(1 for s in o.seen if s.path == "/fresh?auth") == 2
    assert hits(o, "/public") == 1


def test_objects_over_max_object_pass_through(site):
    o, e = site
    with httpx.Client() as c:
        bodies = [c.get(f"{e.url}/big").content for _ in range(2)]
    assert bodies == [BIG] * 2 and hits(o, "/big") == 2


def test_stale_while_revalidate_answers_without_waiting(site):
    o, e = site
    r = warm_then(e, "/swr")
    assert r.text == "swr body"
    assert r.headers["cache-status"].startswith("edge; hit") and "stale-while-revalidate" in r.headers["cache-status"]


def test_stale_if_error_when_the_origin_is_down(site):
    o, e = site
    with httpx.Client() as c:
        c.get(f"{e.url}/sie")
        c.get(f"{e.url}/mustreval")
    o.stop()
    with httpx.Client() as c:                  # a new client connection: a new upstream connection
        r = c.get(f"{e.url}/sie")
        strict = c.get(f"{e.url}/mustreval")
    assert r.status_code == 200 and r.text == "stale body"
    assert 'detail="origin unreachable"' in r.headers["cache-status"]
    # must-revalidate: never stale; the first refused connection took the origin out, hence 503
    assert strict.status_code == 503


def test_stale_served_when_the_origin_answers_5xx(origin, edge):
    state = {"status": 200}
    o = origin("eu", pages={"/p": lambda req, o: (state["status"], [("Cache-Control", "max-age=0"), ("ETag", '"p"')],
                                                   b"good" if state["status"] == 200 else b"broken")})
    e = edge([o.url])
    with httpx.Client() as c:
        c.get(f"{e.url}/p")
        state["status"] = 503
        r = c.get(f"{e.url}/p")
    assert r.status_code == 200 and r.text == "good" and "fwd-status=503" in r.headers["cache-status"]


def test_unsafe_methods_invalidate(site):
    o, e = site
    with httpx.Client() as c:
        c.get(f"{e.url}/item")
        assert c.get(f"{e.url}/item").headers["cache-status"].startswith("edge; hit")
        assert c.post(f"{e.url}/item", content=b"x").text == "item POST"
        r = c.get(f"{e.url}/item")
    assert r.headers["cache-status"].startswith("edge; fwd=uri-miss")
    assert [s.method for s in o.seen if s.path == "/item"] == ["GET", "POST", "GET"]


def test_purge_by_method_and_command(site):
    o, e = site
    with httpx.Client() as c:
        c.get(f"{e.url}/fresh")
        assert c.request("PURGE", f"{e.url}/fresh").status_code == 200
        assert c.request("PURGE", f"{e.url}/fresh").status_code == 404
        assert c.get(f"{e.url}/fresh").headers["cache-status"].startswith("edge; fwd=uri-miss")
        assert e.master.commands.call("edge.purge", f"{e.url}/fresh") == "purged"
        assert c.get(f"{e.url}/fresh").headers["cache-status"].startswith("edge; fwd=uri-miss")
    assert hits(o, "/fresh") == 3 and all(s.method != "PURGE" for s in o.seen)


def test_purge_is_refused_from_other_addresses(origin, edge):
    o = origin("eu")
    e = edge(f"pools: {{eu: {{origins: [{o.url}]}}}}\ncache: {{purge_from: [10.0.0.0/8]}}\n")
    assert httpx.request("PURGE", f"{e.url}/").status_code == 403


def test_concurrent_misses_make_one_origin_request(origin, edge):
    release = threading.Event()

    def slow(req, o):
        release.wait(10)
        return 200, [("Cache-Control", "max-age=60")], b"once"
    o = origin("eu", pages={"/slow": slow})
    e = edge([o.url])
    cache = e.master.addons.get("cache")
    with ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(httpx.get, f"{e.url}/slow", timeout=20) for _ in range(10)]
        deadline = time.monotonic() + 10
        while sum(cache.waiting.values()) < 9 and time.monotonic() < deadline:
            time.sleep(0.01)                        # polling the edge's own count of waiters
        release.set()
        results = [f.result() for f in futures]
    assert [r.text for r in results] == ["once"] * 10
    assert hits(o, "/slow") == 1
    assert sum('detail="coalesced"' in r.headers["cache-status"] for r in results) == 9


def test_memory_stays_within_max_size(origin, edge):
    o = origin("eu", pages={f"/o{i}": page("max-age=60", os.urandom(8192)) for i in range(40)})
    e = edge(f"pools: {{eu: {{origins: [{o.url}]}}}}\ncache: {{max_size: 64KB, max_object: 16KB}}\n")
    cache = e.master.addons.get("cache")
    with httpx.Client() as c:
        for i in range(40):
            c.get(f"{e.url}/o{i}")
            assert cache.store.bytes <= 64 * 1024
        assert c.get(f"{e.url}/o39").headers["cache-status"].startswith("edge; hit")
        assert c.get(f"{e.url}/o0").headers["cache-status"].startswith("edge; fwd=uri-miss")   # evicted


def test_stale_while_revalidate_refreshes_in_the_background(origin, edge):
    versions = iter(range(1, 100))
    o = origin("eu", pages={"/news": lambda req, o: (
        200, [("Content-Type", "text/plain"), ("Cache-Control", "max-age=0, stale-while-revalidate=60")],
        f"v{next(versions)}".encode())})
    e = edge([o.url])
    cache = e.master.addons.get("cache")
    with httpx.Client() as c:
        assert c.get(f"{e.url}/news").text == "v1"
        stale = c.get(f"{e.url}/news")
        assert stale.text == "v1" and "stale-while-revalidate" in stale.headers["cache-status"]
        deadline = time.monotonic() + 10
        while (cache.refreshing or hits(o, "/news") < 2) and time.monotonic() < deadline:
            time.sleep(0.01)                        # polling the edge's own record of refreshes
        assert hits(o, "/news") == 2
        assert c.get(f"{e.url}/news").text == "v2"  # the refreshed copy, again without waiting


def test_purge_from_the_command_line(site):
    from click.testing import CliRunner

    from edgecli.main import cli
    o, e = site
    httpx.get(f"{e.url}/fresh")
    runner = CliRunner()
    r = runner.invoke(cli, ["purge", f"{e.url}/fresh", "--edge", e.url])
    assert r.exit_code == 0 and r.output.strip() == f"purged {e.url}/fresh"
    r = runner.invoke(cli, ["purge", f"{e.url}/fresh", "--edge", e.url])
    assert r.exit_code == 0 and r.output.strip() == f"not cached: {e.url}/fresh"
    r = runner.invoke(cli, ["purge", f"{e.url}/fresh", "--edge", "http://127.0.0.1:1"])
    assert r.exit_code == 1 and r.output.startswith("edge: cannot reach the edge at http://127.0.0.1:1")


def test_uncacheable_urls_are_not_coalesced(origin, edge):
    """After a URL proved uncacheable, concurrent requests go straight to the origin instead of
    queueing behind each other (Varnish's hit-for-miss)."""
    release = threading.Event()
    arrived = threading.Semaphore(0)

    def slow(req, o):
        arrived.release()
        release.wait(10)
        return 200, [("Cache-Control", "no-store")], b"private"
    o = origin("eu", pages={"/live": slow})
    e = edge([o.url])
    release.set()
    httpx.get(f"{e.url}/live")                     # learns: not cacheable
    arrived.acquire()
    release.clear()
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(httpx.get, f"{e.url}/live", timeout=20) for _ in range(3)]
        for _ in range(3):                          # all three reach the origin before any answer
            assert arrived.acquire(timeout=10)
        release.set()
        assert [f.result().text for f in futures] == ["private"] * 3


def test_host_case_and_default_port_share_one_key(site):
    o, e = site
    with httpx.Client() as c:
        c.get(f"{e.url}/fresh", headers={"Host": "Shop.Example:80"})
        r = c.get(f"{e.url}/fresh", headers={"Host": "shop.example"})
    assert r.headers["cache-status"].startswith("edge; hit") and hits(o, "/fresh") == 1


def test_unsafe_method_invalidates_location_and_content_location(origin, edge):
    o = origin("eu", pages={
        "/a": page("max-age=60", b"a"), "/b": page("max-age=60", b"b"), "/c": page("max-age=60", b"c"),
        "/form": lambda req, o: (303, [("Location", "/a"), ("Content-Location", f"{o.url}/b")], b""),
    })
    e = edge([o.url])
    with httpx.Client() as c:
        for path in ("/a", "/b", "/c"):
            c.get(f"{e.url}{path}")
        c.post(f"{e.url}/form", content=b"x")
        statuses = {p: c.get(f"{e.url}{p}").headers["cache-status"].split(";")[1].strip() for p in ("/a", "/b", "/c")}
    # /a is same-origin by relative Location; the origin's own URL in Content-Location names this site too
    assert statuses == {"/a": "fwd=uri-miss", "/b": "fwd=uri-miss", "/c": "hit"}


def test_only_if_cached_never_reaches_the_origin(site):
    o, e = site
    r = httpx.get(f"{e.url}/fresh", headers={"Cache-Control": "only-if-cached"})
    assert r.status_code == 504 and hits(o, "/fresh") == 0
    r = warm_then(e, "/fresh", headers={"Cache-Control": "only-if-cached"})
    assert r.status_code == 200 and r.headers["cache-status"].startswith("edge; hit") and hits(o, "/fresh") == 1
