"""Compression: negotiation rules, and each coding through a real edge, decoded by curl."""

import gzip
import subprocess

import brotli
import httpx
import pytest

from addons.compress.negotiate import choose, compressible, encode, weak_etag, zstd

TEXT = ("<p>edge compresses text once and serves it many times</p>\n" * 200).encode()


@pytest.mark.parametrize("header, expected", [
    ("gzip, deflate, br, zstd", "br"),            # equal q: our preference
    ("gzip;q=1.0, br;q=0.5", "gzip"),
    ("zstd;q=0.9, gzip;q=0.9", "zstd"),
    ("*", "br"),
    ("br;q=0, *;q=0.5", "zstd"),
    ("gzip;q=0", None),
    ("identity", None),
    ("", None), (None, None),
    ("GZIP", "gzip"),
    ("gzip;q=2", "gzip"),                         # an invalid q is ignored, not fatal
    ("deflate", None),
])
def test_choose(header, expected):
    assert choose(header) == expected


def test_choose_respects_the_offered_set():
    assert choose("br, gzip", ("gzip",)) == "gzip"


@pytest.mark.parametrize("ctype, ok", [
    ("text/html; charset=utf-8", True), ("application/json", True), ("application/problem+json", True),
    ("image/svg+xml", True), ("image/png", False), ("application/octet-stream", False), (None, False),
])
def test_compressible(ctype, ok):
    assert compressible(ctype) is ok


def test_encodings_round_trip():
    assert brotli.decompress(encode(TEXT, "br")) == TEXT
    assert zstd.decompress(encode(TEXT, "zstd")) == TEXT
    assert gzip.decompress(encode(TEXT, "gzip")) == TEXT
    assert weak_etag('"a"') == 'W/"a"' and weak_etag('W/"a"') == 'W/"a"'


def text_page(req, o):
    return 200, [("Content-Type", "text/html"), ("Cache-Control", "max-age=60"), ("ETag", '"t1"')], TEXT


@pytest.fixture
def site(origin, edge):
    o = origin("eu", pages={"/text": text_page,
                            "/png": lambda req, o: (200, [("Content-Type", "image/png"),
                                                          ("Cache-Control", "max-age=60")], TEXT),
                            "/tiny": lambda req, o: (200, [("Content-Type", "text/plain")], b"tiny")})
    return o, edge([o.url])


def curl(url, accept):
    out = subprocess.run(["curl", "-s", "--compressed", "-H", f"Accept-Encoding: {accept}", "-D", "-", url],
                         capture_output=True, check=True).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head.decode().split("\r\n")[1:])}
    return headers, body


@pytest.mark.parametrize("coding", ["br", "zstd", "gzip"])
def test_each_coding_is_decoded_by_a_real_client(site, coding):
    o, e = site
    headers, body = curl(f"{e.url}/text", coding)
    assert body == TEXT
    assert headers["content-encoding"] == coding and int(headers["content-length"]) < len(TEXT) / 5
    assert headers["vary"] == "Accept-Encoding" and headers["etag"] == 'W/"t1"'
    assert o.seen[-1].headers["accept-encoding"] == "identity"    # the edge makes the coding itself


def test_one_origin_fetch_serves_every_coding_and_hits_never_recompress(site):
    o, e = site
    for accept in ("gzip, deflate, br", "br", "gzip", "br;q=1, gzip;q=0.5", "zstd", "identity"):
        headers, body = curl(f"{e.url}/text", accept)
        assert body == TEXT
    statuses = [curl(f"{e.url}/text", a)[0]["cache-status"] for a in ("br", "gzip", "zstd", "identity")]
    assert [s.split(";")[1].strip() for s in statuses] == ["hit"] * 4
    assert sum(1 for s in o.seen if s.path == "/text") == 1


def test_identity_when_the_client_wants_none(site):
    o, e = site
    r = httpx.get(f"{e.url}/text", headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in r.headers and r.content == TEXT and r.headers["vary"] == "Accept-Encoding"


def test_not_compressed_when_not_worth_it(site):
    o, e = site
    png = httpx.get(f"{e.url}/png", headers={"Accept-Encoding": "br"})
    tiny = httpx.get(f"{e.url}/tiny", headers={"Accept-Encoding": "br"})
    assert "content-encoding" not in png.headers and "vary" not in png.headers
    assert "content-encoding" not in tiny.headers and tiny.content == b"tiny" and "vary" not in tiny.headers


def test_already_encoded_responses_are_not_compressed_twice(origin, edge):
    pre = gzip.compress(TEXT)
    o = origin("eu", pages={"/pre": lambda req, o: (200, [("Content-Type", "text/html"),
                                                          ("Content-Encoding", "gzip")], pre)})
    e = edge([o.url])
    headers, body = curl(f"{e.url}/pre", "br, gzip")
    assert headers["content-encoding"] == "gzip" and body == TEXT
