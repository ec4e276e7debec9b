"""The cache's safety rules beyond RFC 9111 (policy.py), each against the attack it stops."""

import pytest

from addons.cache import policy
from addons.cache.policy import ResponseRules

NOW = 1_000_000.0
LAST_MODIFIED = "Sat, 10 Jan 1970 13:46:40 GMT"          # two days before NOW


def read(headers):
    return ResponseRules.read(headers)


@pytest.mark.parametrize("request_headers, has", [
    ({}, False),
    ({"content-length": "0"}, False),
    ({"content-length": "5"}, True),
    ({"content-length": " 12 "}, True),
    ({"transfer-encoding": "chunked"}, True),
])
def test_a_get_announcing_content_is_recognised(request_headers, has):
    """Fat GET: the body is what the origin answers for, the URL is what the cache keys on."""
    assert policy.has_content(request_headers) is has


@pytest.mark.parametrize("headers, explicit", [
    ({"cache-control": "max-age=60"}, True),
    ({"cache-control": "s-maxage=0"}, True),
    ({"cache-control": "public"}, True),
    ({"expires": "Thu, 01 Jan 2099 00:00:00 GMT"}, True),
    ({"cdn-cache-control": "max-age=60", "cache-control": "no-store"}, True),
    ({"cdn-cache-control": "must-revalidate", "expires": "Thu, 01 Jan 2099 00:00:00 GMT"}, False),  # CDN-CC replaces
    ({"last-modified": LAST_MODIFIED}, False),
    ({"cache-control": "must-revalidate"}, False),
    ({}, False),
])
def test_explicit_freshness(headers, explicit):
    assert policy.explicitly_fresh(headers, read(headers)) is explicit


@pytest.mark.parametrize("cc, why", [
    ("max-age=60", None),                               # the origin's word: RFC 9111 7.3
    ('max-age=60, private="Set-Cookie"', None),         # stored without the cookie
    (None, "set-cookie"),                               # a guess is never made for it
])
def test_a_set_cookie_is_stored_only_on_the_origins_word(cc, why):
    """Session fixation/theft through the cache: one visitor's cookie served to the next on a
    lifetime the cache guessed."""
    headers = {"set-cookie": "sid=1", "last-modified": LAST_MODIFIED, **({"cache-control": cc} if cc else {})}
    assert policy.unsafe_to_store({}, headers, read(headers), "/") == why


@pytest.mark.parametrize("path, content_type, contradicted", [
    ("/account.php/x/nonexistent.css", "text/html; charset=utf-8", True),   # web cache deception
    ("/account.php/x/nonexistent.css", None, True),
    ("/static/site.css", "text/css", False),
    ("/static/site.CSS?v=3", "Text/CSS; charset=utf-8", False),
    ("/app.js", "application/javascript", False),
    ("/app.js", "text/javascript", False),
    ("/profile%2Favatar.png", "text/html", True),                            # percent-encoded tail
    ("/profile;x.png", "text/html", True),                                   # path parameter tail
    ("/account.php/x.css;v=1", "text/html", True),
    ("/site.css;jsessionid=1", "text/css", False),
    ("/logo.png", "image/png", False),
    ("/font.woff2", "application/octet-stream", False),                      # binary: untyped is fine
    ("/site.css", "application/octet-stream", True),                         # text: it is not
    ("/index.html", "text/html", False),
    ("/account.php", "text/html", False),                                    # not a static extension
    ("/account", "text/html", False),
    ("/dir.css/", "text/html", False),                                       # the last segment is empty
    ("/x.css?file=y.html", "text/css", False),                               # the query does not count
])
def test_content_type_must_agree_with_a_static_extension(path, content_type, contradicted):
    assert policy.extension_contradicted(path, content_type) is contradicted


@pytest.mark.parametrize("request_headers, headers, why", [
    ({"cookie": "session=alice"}, {"content-type": "text/plain"}, "cookie"),
    ({"authorization": "Bearer x"}, {"content-type": "text/plain"}, "authorization"),
    ({}, {"set-cookie": "sid=1", "content-type": "text/plain"}, "set-cookie"),
    ({}, {"content-type": "text/html"}, "content-type"),                     # path below is .css
    ({}, {"content-type": "text/css"}, None),
])
def test_guessing_is_refused_for_one_persons_answers(request_headers, headers, why):
    assert policy.guess_refused(request_headers, headers, "/a/b.css") == why


def test_web_cache_deception_is_not_stored_on_a_guess():
    """The issue's case: a session cookie, /account.php/x/nonexistent.css, only Last-Modified."""
    headers = {"content-type": "text/html", "last-modified": LAST_MODIFIED}
    path = "/account.php/x/nonexistent.css"
    assert policy.unsafe_to_store({"cookie": "session=alice"}, headers, read(headers), path) == "cookie"
    assert policy.unsafe_to_store({}, headers, read(headers), path) == "content-type"
    # the origin's explicit word keeps RFC 9111 behaviour, cookie or not
    explicit = {**headers, "cache-control": "max-age=60"}
    assert policy.unsafe_to_store({"cookie": "session=alice"}, explicit, read(explicit), path) is None


def test_a_refused_guess_gives_no_lifetime_and_an_explicit_one_is_kept():
    heuristic = {"last-modified": LAST_MODIFIED, "date": "Mon, 12 Jan 1970 13:46:40 GMT"}
    assert policy.freshness_lifetime(200, heuristic, read(heuristic), NOW) == 2 * 86400 * policy.HEURISTIC_FRACTION
    assert policy.freshness_lifetime(200, heuristic, read(heuristic), NOW, guess=False) == 0.0
    assert policy.freshness_lifetime(200, {}, read({}), NOW, default_ttl=300) == 300.0
    assert policy.freshness_lifetime(200, {}, read({}), NOW, default_ttl=300, guess=False) == 0.0
    explicit = {"cache-control": "max-age=60"}
    assert policy.freshness_lifetime(200, explicit, read(explicit), NOW, default_ttl=300, guess=False) == 60.0
