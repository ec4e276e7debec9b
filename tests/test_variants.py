"""One origin fetch per object: the cache keeps the origin's representation and the codings the
edge made from it, through a real edge and an origin that counts what it serves. Bodies are read
raw (no client decoding) and decoded here, so a wrong or double coding shows."""

import gzip

import brotli
import httpx
import pytest

from addons.compress.negotiate import zstd
from addons.compress.variants import THREAD_MIN, acceptable, encoded_fields, plan, transformable, with_accept_encoding

TEXT = "".join(f"<li>item {i}: edge makes every coding of this page from one fetch</li>\n"
               for i in range(300)).encode()
CODINGS = ("br", "zstd", "gzip", "identity")
DECODE = {"br": brotli.decompress, "zstd": zstd.decompress, "gzip": gzip.decompress, None: lambda b: b}


def get(e, path, accept, method="GET", **headers):
    """The response and its body as sent (content-decoded here, by the coding it names)."""
    with httpx.Client() as c, c.stream(method, f"{e.url}{path}",
                                       headers={"Accept-Encoding": accept, **headers}) as r:
        raw = b"".join(r.iter_raw())
    return r, raw


def decoded(r, raw):
    return DECODE[r.headers.get("content-encoding")](raw)


def fetches(o, path):
    return sum(1 for s in o.seen if s.path == path and s.method == "GET")


def page(body=TEXT, etag='"t1"', cc="max-age=60", extra=()):
    def handler(req, o):
        if etag and req.headers.get("if-none-match") == etag:
            return 304, [("ETag", etag), ("Cache-Control", cc)], b""
        return 200, [("Content-Type", "text/html"), ("Cache-Control", cc), ("ETag", etag), *extra], body
    return handler


@pytest.fixture
def site(origin, edge):
    o = origin("eu", pages={"/page": page(), "/big": page(TEXT * 40)})
    return o, edge([o.url])


def test_four_codings_cost_one_origin_fetch_then_all_are_hits(site):
    o, e = site
    for coding in CODINGS:
        r, raw = get(e, "/page", coding)
        assert r.status_code == 200 and r.headers.get("content-encoding", "identity") == coding
        assert decoded(r, raw) == TEXT and int(r.headers["content-length"]) == len(raw)
        assert r.headers["vary"] == "Accept-Encoding"
    assert fetches(o, "/page") == 1
    assert o.seen[0].headers["accept-encoding"] == "identity"       # asked for the origin's representation
    for coding in CODINGS:
        r, raw = get(e, "/page", coding)
        assert r.headers["cache-status"].startswith("edge; hit") and decoded(r, raw) == TEXT
        assert r.headers.get("content-encoding", "identity") == coding
    assert fetches(o, "/page") == 1
    # every coding is its own stored entry: base + br + zstd + gzip
    assert len(e.master.addons.get("edge").cache.store.lru[f"{e.url}/page"]) == 4


def test_a_browser_accept_encoding_gets_the_preferred_coding_from_the_stored_base(site):
    o, e = site
    get(e, "/page", "identity")                                      # stores the base only
    r, raw = get(e, "/page", "gzip, deflate, br, zstd")
    assert r.headers["content-encoding"] == "br" and r.headers["cache-status"].startswith("edge; hit")
    assert brotli.decompress(raw) == TEXT and r.headers["etag"] == 'W/"t1"'
    assert fetches(o, "/page") == 1


def test_vary_from_the_origin_keeps_one_fetch_per_language(origin, edge):
    def lang(req, o):
        body = f"lang={req.headers.get('accept-language')}\n".encode() * 100
        return 200, [("Content-Type", "text/plain"), ("Cache-Control", "max-age=60"), ("Vary", "Accept-Language")], body
    o = origin("eu", pages={"/lang": lang})
    e = edge([o.url])
    for language in ("en", "fr"):
        for coding in CODINGS:
            r, raw = get(e, "/lang", coding, **{"Accept-Language": language})
            assert decoded(r, raw) == f"lang={language}\n".encode() * 100
            assert r.headers.get("content-encoding", "identity") == coding
            assert r.headers["vary"] == "Accept-Language, Accept-Encoding"
    assert fetches(o, "/lang") == 2
    assert sorted(s.headers["accept-language"] for s in o.seen) == ["en", "fr"]


def test_an_origin_that_encodes_itself_is_never_encoded_twice(origin, edge):
    pre = gzip.compress(TEXT)
    o = origin("eu", pages={"/pre": lambda req, o: (200, [("Content-Type", "text/html"), ("Content-Encoding", "gzip"),
                                                          ("Cache-Control", "max-age=60")], pre)})
    e = edge([o.url])
    for accept in ("br, gzip", "gzip", "zstd, gzip;q=0.5"):
        r, raw = get(e, "/pre", accept)
        assert r.headers["content-encoding"] == "gzip" and raw == pre       # the origin's bytes, not br of them
    assert fetches(o, "/pre") == 1 and o.seen[0].headers["accept-encoding"] == "identity"


@pytest.mark.parametrize("coding", CODINGS)
def test_if_none_match_with_each_codings_etag_is_answered_304_from_the_cache(site, coding):
    o, e = site
    r, _ = get(e, "/page", coding)
    etag = r.headers["etag"]
    assert etag == ('"t1"' if coding == "identity" else 'W/"t1"')
    r, raw = get(e, "/page", coding, **{"If-None-Match": etag})
    assert r.status_code == 304 and raw == b"" and r.headers["etag"] == etag
    assert r.headers["cache-status"].startswith("edge; hit") and "content-encoding" not in r.headers
    assert fetches(o, "/page") == 1


def test_head_has_the_headers_of_the_stored_coding(site):
    o, e = site
    for coding in CODINGS:
        g, raw = get(e, "/page", coding)
        h, body = get(e, "/page", coding, method="HEAD")
        assert body == b"" and h.headers["content-length"] == g.headers["content-length"] == str(len(raw))
        assert h.headers.get("content-encoding") == g.headers.get("content-encoding")
        assert h.headers["etag"] == g.headers["etag"]
    assert fetches(o, "/page") == 1


def test_a_range_is_served_from_the_identity_representation(site):
    o, e = site
    get(e, "/page", "br")
    r, raw = get(e, "/page", "br", Range="bytes=10-29")
    assert r.status_code == 206 and raw == TEXT[10:30] and "content-encoding" not in r.headers
    assert r.headers["content-range"] == f"bytes 10-29/{len(TEXT)}"
    # an If-Range with the br variant's weak ETag cannot match: the whole br representation
    r, raw = get(e, "/page", "br", Range="bytes=10-29", **{"If-Range": 'W/"t1"'})
    assert r.status_code == 200 and r.headers["content-encoding"] == "br" and brotli.decompress(raw) == TEXT
    assert fetches(o, "/page") == 1


def test_purge_drops_every_coding(site):
    o, e = site
    for coding in CODINGS:
        get(e, "/page", coding)
    assert httpx.request("PURGE", f"{e.url}/page").status_code == 200
    statuses = [get(e, "/page", coding)[0].headers["cache-status"] for coding in ("br", "gzip")]
    assert statuses[0].startswith("edge; fwd=uri-miss") and statuses[1].startswith("edge; hit")
    assert fetches(o, "/page") == 2


def test_a_304_refreshes_the_variants_without_a_new_fetch(origin, edge):
    o = origin("eu", pages={"/v": page(cc="max-age=0")})
    e = edge([o.url])
    for _ in range(2):
        for coding in ("br", "gzip"):
            r, raw = get(e, "/v", coding)
            assert r.status_code == 200 and r.headers["content-encoding"] == coding and decoded(r, raw) == TEXT
    full = [s for s in o.seen if "if-none-match" not in s.headers]
    conditional = [s for s in o.seen if s.headers.get("if-none-match") == '"t1"']
    assert len(full) == 1 and len(conditional) == 3                   # then only revalidations
    assert all(s.headers["accept-encoding"] == "identity" for s in o.seen)
    assert r.headers["cache-status"].startswith("edge; fwd=stale; fwd-status=304")


def test_a_variant_made_from_an_older_base_is_never_served(origin, edge):
    version = {"n": 1}

    def changing(req, o):
        n = version["n"]
        etag = f'"v{n}"'
        if req.headers.get("if-none-match") == etag:
            return 304, [("ETag", etag), ("Cache-Control", "max-age=0")], b""
        return 200, [("Content-Type", "text/plain"), ("Cache-Control", "max-age=0"), ("ETag", etag)], \
            f"version {n}\n".encode() * 100
    o = origin("eu", pages={"/c": changing})
    e = edge([o.url])
    assert decoded(*get(e, "/c", "gzip")) == b"version 1\n" * 100          # base v1 + its gzip
    version["n"] = 2
    assert decoded(*get(e, "/c", "br")) == b"version 2\n" * 100            # revalidated: 200, base v2 + br
    r, raw = get(e, "/c", "gzip")                                          # 304 for v2: the v1 gzip is stale
    assert r.headers["cache-status"].startswith("edge; fwd=stale; fwd-status=304")
    assert decoded(r, raw) == b"version 2\n" * 100
    r, raw = get(e, "/c", "gzip")                                          # now a v2 gzip is stored
    assert r.headers["content-encoding"] == "gzip" and decoded(r, raw) == b"version 2\n" * 100


def test_large_bodies_are_encoded_off_the_event_loop_and_stored(site):
    o, e = site
    assert len(TEXT * 40) >= THREAD_MIN
    for coding in CODINGS:
        r, raw = get(e, "/big", coding)
        assert decoded(r, raw) == TEXT * 40 and r.headers.get("content-encoding", "identity") == coding
    r, raw = get(e, "/big", "zstd")
    assert r.headers["cache-status"].startswith("edge; hit") and zstd.decompress(raw) == TEXT * 40
    assert fetches(o, "/big") == 1


def test_uncacheable_responses_are_still_encoded_per_client(origin, edge):
    o = origin("eu", pages={"/nostore": page(cc="no-store")})
    e = edge([o.url])
    for coding in CODINGS:
        r, raw = get(e, "/nostore", coding)
        assert r.headers.get("content-encoding", "identity") == coding and decoded(r, raw) == TEXT
    assert fetches(o, "/nostore") == 4


# -- the pure rules ----------------------------------------------------------------------------------


def test_transformable():
    html = {"content-type": "text/html"}
    assert transformable(200, html, 300, 256)
    assert not transformable(200, html, 100, 256)                                   # below min_size
    assert not transformable(206, html, 300, 256)
    assert not transformable(200, {**html, "content-encoding": "gzip"}, 300, 256)   # never twice
    assert not transformable(200, {**html, "cache-control": "public, No-Transform"}, 300, 256)
    assert not transformable(200, {"content-type": "image/png"}, 300, 256)


def test_vary_gains_accept_encoding_once():
    assert with_accept_encoding(None) == "Accept-Encoding"
    assert with_accept_encoding("Accept-Language") == "Accept-Language, Accept-Encoding"
    assert with_accept_encoding("accept-encoding") is None and with_accept_encoding("*") is None


def test_encoded_fields_replace_length_coding_and_weaken_the_etag():
    fields = ((b"Content-Type", b"text/html"), (b"ETag", b'"a"'), (b"Content-Length", b"900"), (b"Age", b"3"))
    assert encoded_fields(fields, "br", 120) == (
        (b"Content-Type", b"text/html"), (b"Age", b"3"), (b"ETag", b'W/"a"'),
        (b"Content-Encoding", b"br"), (b"Content-Length", b"120"))


def test_an_origins_coding_is_decoded_only_for_clients_that_do_not_take_it(origin, edge):
    pre = gzip.compress(TEXT)
    o = origin("eu", pages={"/pre": lambda req, o: (200, [("Content-Type", "text/html"), ("Content-Encoding", "gzip"),
                                                          ("Cache-Control", "max-age=60"), ("ETag", '"g1"')], pre)})
    e = edge([o.url])
    for _ in range(2):
        for accept, want in (("gzip, br", "gzip"), ("br", None), ("identity", None), ("zstd;q=1, gzip;q=0.1", "gzip")):
            r, raw = get(e, "/pre", accept)
            assert r.headers.get("content-encoding") == want and r.headers["vary"] == "Accept-Encoding"
            if want == "gzip":
                assert raw == pre and r.headers["etag"] == '"g1"'      # the origin's own bytes and validator
            else:
                assert raw == TEXT and r.headers["etag"] == 'W/"g1"' and int(r.headers["content-length"]) == len(TEXT)
    assert r.headers["cache-status"].startswith("edge; hit") and fetches(o, "/pre") == 1


def test_a_gzip_bomb_from_the_origin_is_not_decoded(origin, edge):
    bomb = gzip.compress(b"\0" * (40 << 20), 9)
    o = origin("eu", pages={"/bomb": lambda req, o: (200, [("Content-Type", "text/plain"), ("Content-Encoding", "gzip"),
                                                           ("Cache-Control", "no-store")], bomb)})
    e = edge([o.url])
    r, raw = get(e, "/bomb", "identity")
    assert r.headers["content-encoding"] == "gzip" and raw == bomb          # sent as the origin sent it
    r, raw = get(e, "/page-elsewhere", "identity")                          # the edge goes on serving
    assert r.status_code == 404


def test_without_compression_the_origins_vary_on_accept_encoding_is_the_plain_rfc_selection(origin, edge):
    def own(req, o):
        ae = req.headers.get("accept-encoding", "")
        headers = [("Content-Type", "text/html"), ("Cache-Control", "max-age=60"), ("Vary", "Accept-Encoding")]
        if "gzip" in ae:
            return 200, headers + [("Content-Encoding", "gzip")], gzip.compress(TEXT)
        return 200, headers, TEXT
    o = origin("eu", pages={"/own": own})
    e = edge(f"pools: {{eu: {{origins: [{o.url}]}}}}\ncompress: {{enabled: false}}\n")
    for _ in range(2):
        for accept in ("gzip", "br"):
            r, raw = get(e, "/own", accept)
            assert decoded(r, raw) == TEXT and r.headers.get("content-encoding") == ("gzip" if accept == "gzip" else None)
    assert [s.headers["accept-encoding"] for s in o.seen] == ["gzip", "br"]     # the client's, one fetch each


def test_stale_while_revalidate_serves_each_coding(origin, edge):
    o = origin("eu", pages={"/swr": page(etag=None, cc="max-age=0, stale-while-revalidate=60")})
    e = edge([o.url])
    get(e, "/swr", "br")
    for coding in CODINGS:
        r, raw = get(e, "/swr", coding)
        assert 'detail="stale-while-revalidate"' in r.headers["cache-status"]
        assert r.headers.get("content-encoding", "identity") == coding and decoded(r, raw) == TEXT


def test_stale_if_error_serves_the_stored_coding(origin, edge):
    o = origin("eu", pages={"/sie": page(cc="max-age=0, stale-if-error=60")})
    e = edge([o.url])
    get(e, "/sie", "br")
    o.stop()            # (one request after: the refused connect takes the origin out, then 503)
    r, raw = get(e, "/sie", "br")
    assert r.status_code == 200 and 'detail="origin unreachable"' in r.headers["cache-status"]
    assert r.headers["content-encoding"] == "br" and decoded(r, raw) == TEXT


@pytest.mark.parametrize("headers, negotiated, accept, expected", [
    ({"content-type": "text/html"}, "br", "br, gzip", (True, "br")),
    ({"content-type": "text/html"}, "identity", "identity", (True, None)),          # the base itself
    ({"content-type": "image/png"}, "br", "br", (False, None)),
    ({"content-type": "text/html", "content-encoding": "gzip"}, "br", "br, gzip", (True, None)),   # the origin's
    ({"content-type": "text/html", "content-encoding": "gzip"}, "br", "br", (True, "identity")),
    ({"content-type": "text/html", "content-encoding": "gzip"}, "identity", None, (True, "identity")),
    ({"content-type": "text/html", "content-encoding": "deflate"}, "identity", None, (False, None)),  # cannot undo
    ({"content-type": "text/html", "content-encoding": "gzip", "cache-control": "no-transform"}, "identity", None,
     (False, None)),
])
def test_plan(headers, negotiated, accept, expected):
    assert plan(200, headers, 1000, 256, negotiated, accept) == expected


def test_acceptable():
    assert acceptable("gzip, br", "gzip") and acceptable("*", "zstd") and acceptable("br;q=0.1", "br")
    assert not acceptable(None, "gzip") and not acceptable("gzip;q=0", "gzip") and not acceptable("*;q=0", "br")
