"""The shield: pure limits and deadlines, and every refusal through a real proxy."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import replace

import httpx
import pytest

from addons.config import ConfigError, Limits, Timeouts, config_from_origins, parse_config, parse_rate
from addons.shield.limits import ConnectionCounts, MemoryStore, rate_key, take
from addons.shield.slow import Deadlines

# -- pure ------------------------------------------------------------------------------------------


def test_token_bucket_allows_the_burst_then_the_rate():
    tokens, stamp, out = 3.0, 0.0, []
    for now in (0.0, 0.0, 0.0, 0.0, 0.5, 0.5):
        verdict, tokens = take(tokens, stamp, now, rate=2.0, burst=3)
        stamp = now
        out.append(verdict.allowed)
    assert out == [True, True, True, False, True, False]       # burst 3, then 2/s: one more after 0.5 s
    verdict, _ = take(0.0, 0.0, 0.1, rate=2.0, burst=3)
    assert not verdict.allowed and verdict.retry_after == pytest.approx(0.4)


def test_memory_store_forgets_idle_keys_and_is_bounded():
    store = MemoryStore(rate=10, burst=2, max_keys=100)
    assert [store.take("a", 0.0).allowed for _ in range(3)] == [True, True, False]
    for i in range(1000):
        store.take(f"k{i}", 0.0)
    assert len(store.buckets) == 100                               # bounded whatever the clients do
    assert store.buckets.ttl == pytest.approx(1.2)                 # a key idle for burst/rate (+1 s) is full again


def test_connection_counts_undo_only_what_they_admitted():
    counts = ConnectionCounts(limit=2)
    assert counts.admit("c1", "ip") and counts.admit("c2", "ip") and not counts.admit("c3", "ip")
    counts.release("c3")                                           # refused: nothing to undo
    assert counts.open["ip"] == 2
    counts.release("c1")
    assert counts.admit("c4", "ip")
    counts.release("c2"), counts.release("c4")
    assert not counts.open


def test_deadlines_for_head_body_and_idle():
    d = Deadlines(request_headers=10, request_body=30, idle=60)
    d.connected("a", 0.0)
    d.connected("b", 0.0)
    d.head_received("b", 5.0, body_expected=True)
    assert d.expired(9.9) == [] and d.expired(10.0) == [("a", "request headers timeout")]
    assert d.expired(34.9) == [] and d.expired(35.0) == [("b", "request body timeout")]
    d.connected("c", 0.0)
    d.head_received("c", 1.0, body_expected=False)
    d.answered("c", 2.0)
    assert d.expired(71.9) == [] and d.expired(72.0) == [("c", "idle timeout")]


def test_rate_keys():
    headers = {"X-Api-Key": "k1"}.get
    assert rate_key("client_ip", "1.2.3.4", "/a?b", headers) == "1.2.3.4"
    assert rate_key("path", "1.2.3.4", "/search?q=x", headers) == "path /search"
    assert rate_key("header:X-Api-Key", "1.2.3.4", "/", headers) == "header k1"
    assert rate_key("header:X-Other", "1.2.3.4", "/", headers) == "1.2.3.4"     # no header: its client


def test_rates():
    assert parse_rate("20/s") == 20 and parse_rate("600/m") == 10 and parse_rate("36/h") == 0.01
    with pytest.raises(ValueError):
        parse_rate("fast")


@pytest.mark.parametrize("shield, key, problem", [
    ("rate_limit: {burst: 3}", "shield.rate_limit", "needs a rate"),
    ("rate_limit: {rate: 1/s, key: cookie:x}", "shield.rate_limit.key", "client_ip, path or header:NAME"),
    ("rate_limit: {rate: 1/s, store: mongodb://x}", "shield.rate_limit.store", "redis://"),
    ("deny: [not-a-net]", "shield.deny[0]", "not an IP"),
    ("deny_countries: [CN]", "shield.deny_countries", "needs routing.geo"),
    ("timeouts: {idle: 0s}", "shield.timeouts.idle", "more than 0"),
    ("max_header_bytes: 100", "shield.max_header_bytes", "at least 1KB"),
    ("waf: {crs: /nowhere}", "shield.waf.crs", "no rules/ folder"),
    ("bots: {block: [robots]}", "shield.bots.block[0]", "expected one of browser"),
    ("mode: observe", "shield.mode", "block or detect"),
])
def test_shield_config_errors_name_the_line(shield, key, problem):
    with pytest.raises(ConfigError) as e:
        parse_config(f"pools: {{a: {{origins: [http://x]}}}}\nshield:\n  {shield}\n", "s.yaml")
    assert e.value.line == 3 and e.value.key == key and problem in e.value.problem


# -- through the proxy ---------------------------------------------------------------------------------

def shielded(edge, origin, shield: str, log=None, trusted: str = "[]"):
    o = origin("o")
    e = edge(f"trusted_proxies: {trusted}\npools: {{p: {{origins: [{o.url}]}}}}\nshield:\n" +
             "".join(f"  {line}\n" for line in shield.strip().splitlines()), access_log=log)
    return e, o


def raw_connect(e, source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection((e.host, e.port), timeout=5, source_address=(source, 0))
    return s


def closed_without_answer(s: socket.socket) -> bool:
    """Read until the edge closes the connection; True if it said nothing (a 431 is something)."""
    try:
        data = s.recv(1024)
        while data and (more := s.recv(1024)):
            data += more
        return data == b""
    except ConnectionResetError:
        return True


def test_a_denied_address_is_refused_at_connect_and_logged(origin, edge, tmp_path):
    log = tmp_path / "access.log"
    e, o = shielded(edge, origin, "deny: [127.0.0.2/32]", log=str(log))
    s = raw_connect(e, "127.0.0.2")
    s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    assert closed_without_answer(s)
    assert httpx.get(f"{e.url}/echo").status_code == 200            # everyone else is served
    assert [seen.path for seen in o.seen] == ["/echo"]              # only the allowed client's
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines[0]["client"] == "127.0.0.2" and lines[0]["edge"] == {"shield": "connection refused: address denied"}


def test_the_allow_list_bypasses_the_shield(origin, edge):
    e, _ = shielded(edge, origin, "allow: [127.0.0.1/32]\nrate_limit: {rate: 1/m, burst: 1}")
    with httpx.Client() as c:
        assert [c.get(f"{e.url}/echo").status_code for _ in range(3)] == [200, 200, 200]


def test_connections_per_ip(origin, edge):
    e, _ = shielded(edge, origin, "connections_per_ip: 2")
    first, second = raw_connect(e), raw_connect(e)
    for s in (first, second):                                       # both admitted and served
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(1024).startswith(b"HTTP/1.1 200")
    third = raw_connect(e)
    third.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert closed_without_answer(third)
    first.close()
    deadline = time.monotonic() + 5
    while True:                                                     # the slot comes back when mitmproxy has let go
        s = raw_connect(e)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            if s.recv(1024).startswith(b"HTTP/1.1 200"):
                break
        except ConnectionResetError:
            pass
        assert time.monotonic() < deadline, "slot never freed"
    for sock in (second, third, s):
        sock.close()


def test_rate_limit_answers_429_and_costs_the_origin_nothing(origin, edge, tmp_path):
    log = tmp_path / "access.log"
    e, o = shielded(edge, origin, "rate_limit: {rate: 1/m, burst: 3}", log=str(log))
    with httpx.Client() as c:
        answers = [c.get(f"{e.url}/echo") for _ in range(5)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429, 429]
    assert int(answers[3].headers["retry-after"]) > 1 and "request id" in answers[3].text
    assert len(o.seen) == 3
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["status"] == 429 and last["edge"]["shield"] == "rate: too many requests (429)"
    assert "pool" not in last["edge"] and "cache" not in last["edge"]      # refused before cache and routing
    assert e.master.addons.get("edge").snapshot()["shield"] == {"rate (429)": 2}    # what `edge status` shows


def test_rate_limit_by_header_and_detect_mode(origin, edge, tmp_path):
    log = tmp_path / "access.log"
    e, o = shielded(edge, origin, "rate_limit: {rate: 1/m, burst: 1, key: 'header:X-Api-Key', mode: detect}",
                    log=str(log))
    with httpx.Client() as c:
        codes = [c.get(f"{e.url}/echo", headers={"X-Api-Key": k}).status_code for k in ("a", "b", "a")]
    assert codes == [200, 200, 200]                                 # detect: recorded, not refused
    verdicts = [json.loads(line)["edge"].get("shield") for line in log.read_text().splitlines()]
    assert verdicts == [None, None, "detect: rate: too many requests (429)"]


def test_clients_behind_a_trusted_proxy_are_judged_by_their_own_address(origin, edge):
    e, o = shielded(edge, origin, "deny: [203.0.113.0/24]", trusted="[127.0.0.1/32]")
    with httpx.Client() as c:
        denied = c.get(f"{e.url}/echo", headers={"X-Forwarded-For": "203.0.113.9"})
        fine = c.get(f"{e.url}/echo", headers={"X-Forwarded-For": "198.51.100.7"})
    assert (denied.status_code, fine.status_code) == (403, 200)
    assert len(o.seen) == 1


def test_oversized_heads_get_431_parsed_or_not(origin, edge):
    e, o = shielded(edge, origin, "max_header_bytes: 8KB")
    assert httpx.get(f"{e.url}/echo", headers={"X-Big": "a" * 9000}).status_code == 431
    assert httpx.get(f"{e.url}/echo", headers={"X-Fine": "a" * 4000}).status_code == 200
    s = raw_connect(e)                                              # a head that has not ended at 10 KB
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Trickle: " + b"a" * 10_000 + b"\r\n")
    assert s.recv(1024).startswith(b"HTTP/1.1 431")                 # answered before it ended
    s = raw_connect(e)                                              # one that never ends, on a
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")           # connection that has been served
    assert s.recv(1024).startswith(b"HTTP/1.1 200")
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
    sent, line = 0, b"X-Trickle: " + b"a" * 65_000 + b"\r\n"
    try:
        while sent < 64 * 2**20:
            s.sendall(line)
            sent += len(line)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    # The edge answered 431 and closed it: what got through is at most the kernel's socket
    # buffers, not the 64 MB a proxy that kept buffering the head would have taken.
    assert sent < 32 * 2**20
    assert len(o.seen) == 2


def test_a_huge_first_segment_is_refused_and_the_socket_closed(origin, edge):
    """The same on a fresh connection whose first read is already past the cap. Under CPU load
    the 431's close used to race mitmproxy's event lock and leave the socket open with the
    client's sends blocked (internals: the handle_connection patch); now it is always closed."""
    e, o = shielded(edge, origin, "max_header_bytes: 8KB")
    s = raw_connect(e)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
    sent, line = 0, b"X-Trickle: " + b"a" * 65_000 + b"\r\n"
    with pytest.raises((BrokenPipeError, ConnectionResetError)):   # not TimeoutError: a leaked socket
        while sent < 64 * 2**20:
            s.sendall(line)
            sent += len(line)
    assert not o.seen


def test_oversized_bodies_get_413_before_the_origin_sees_them(origin, edge, tmp_path):
    log = tmp_path / "access.log"
    e, o = shielded(edge, origin, "max_body: 1KB", log=str(log))
    with httpx.Client() as c:
        assert c.post(f"{e.url}/echo", content=b"x" * 2048).status_code == 413
        assert c.post(f"{e.url}/echo", content=iter([b"x" * 600, b"x" * 600])).status_code == 413    # chunked
        assert c.post(f"{e.url}/echo", content=b"x" * 1000).status_code == 200
    assert [len(s.body) for s in o.seen] == [1000]
    assert json.loads(log.read_text().splitlines()[0])["edge"]["shield"] == "size: request body too large (413)"


def test_slow_clients_are_cut_off_while_others_are_served(origin, edge, tmp_path):
    log = tmp_path / "access.log"
    e, o = shielded(edge, origin, "timeouts: {request_headers: 500ms, request_body: 500ms, idle: 500ms}",
                    log=str(log))
    loris, slow_post = raw_connect(e), raw_connect(e)
    loris.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")                 # and then nothing more
    slow_post.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
    started = time.monotonic()
    with httpx.Client() as c:
        while time.monotonic() - started < 1.0:                     # a normal client meanwhile
            assert c.get(f"{e.url}/health").status_code == 200
    for s in (loris, slow_post):
        s.settimeout(5)
        assert closed_without_answer(s)
    assert not [s for s in o.seen if s.method == "POST"]
    verdicts = {json.loads(line)["edge"].get("shield") for line in log.read_text().splitlines()}
    assert {"connection closed: request headers timeout", "connection closed: request body timeout"} <= verdicts


# -- WAF: ModSecurity v3 with the OWASP CRS from Debian's modsecurity-crs --------------------------------

needs_crs = pytest.mark.skipif(not os.path.isdir("/usr/share/modsecurity-crs/rules"),
                               reason="Debian's modsecurity-crs is not installed (make test installs it)")

ATTACKS = {
    "sqli": ("GET", "/products?id=1%27%20OR%20%271%27%3D%271", {}, b""),
    "sqli in json": ("POST", "/api/search", {"Content-Type": "application/json"},
                     b'{"q": "1 UNION SELECT password FROM users--"}'),
    "xss": ("GET", "/search?q=%3Cscript%3Ealert(document.cookie)%3C/script%3E", {}, b""),
    "xss in form": ("POST", "/comment", {"Content-Type": "application/x-www-form-urlencoded"},
                    b"text=%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E"),
    "traversal": ("GET", "/download?file=../../../../etc/passwd", {}, b""),
    "rce": ("GET", "/ping?host=127.0.0.1%3Bcat%20/etc/passwd", {}, b""),
    "scanner": ("GET", "/", {"User-Agent": "sqlmap/1.7.2#stable (https://sqlmap.org)"}, b""),
    "scanner nikto": ("GET", "/", {"User-Agent": "Mozilla/5.00 (Nikto/2.1.6) (Evasions:None) (Test:000003)"}, b""),
}
ORDINARY = {
    "home": ("GET", "/", {}, b""),
    "search with quotes": ("GET", "/search?q=O%27Reilly+%22learning+python%22&page=2", {}, b""),
    "product": ("GET", "/products/42?sort=price&dir=asc", {}, b""),
    "login form": ("POST", "/login", {"Content-Type": "application/x-www-form-urlencoded"},
                   b"user=alice%40example.com&password=S3cret%21%23&remember=on"),
    "json api": ("POST", "/api/orders", {"Content-Type": "application/json"},
                 b'{"items": [{"sku": "A-1", "qty": 2}], "note": "Leave it at the neighbour\'s door, thanks!"}'),
    "comment": ("POST", "/comment", {"Content-Type": "application/x-www-form-urlencoded"},
                b"text=I+don%27t+agree+%E2%80%94+see+page+3+%26+4."),
}
BROWSER = {"Host": "shop.example", "User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
           "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
           "Accept-Language": "en-GB,en;q=0.5"}


def send(c: httpx.Client, base: str, case) -> httpx.Response:
    method, path, headers, body = case
    return c.request(method, base + path, headers={**BROWSER, **headers}, content=body or None)


@needs_crs
def test_waf_blocks_attacks_and_passes_ordinary_traffic(origin, edge, tmp_path):
    log = tmp_path / "access.log"
    e, o = shielded(edge, origin, "waf: {paranoia: 1, anomaly_threshold: 5}", log=str(log))
    with httpx.Client() as c:
        blocked = {name: send(c, e.url, case) for name, case in ATTACKS.items()}
        passed = {name: send(c, e.url, case).status_code for name, case in ORDINARY.items()}
    assert {name: r.status_code for name, r in blocked.items()} == {name: 403 for name in ATTACKS}
    # no rule id (942100 ...) nor score on the page; the random request id may hold any digits
    assert all("request id" in r.text and not re.search(r"\b9\d{5}\b", r.text) and "score" not in r.text
               for r in blocked.values())
    assert set(passed.values()) == {200, 404} and len(o.seen) == len(ORDINARY)      # (the demo origin 404s some paths)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    served = e.master.addons.get("edge").trace.served_by
    assert sum(served.values()) == len(ORDINARY)                   # refused ones are not counted as served
    sqli = lines[0]["edge"]
    assert sqli["shield"] == "waf: request blocked (403)" and "942100" in sqli["waf"] and "score " in sqli["waf"]
    assert int(sqli["waf"].split("score ")[1].split(",")[0]) >= 5
    assert all(line["edge"]["waf"] == "score 0, rules -" for line in lines[len(ATTACKS):])


XSS = "?html=%3Cscript%3Ealert(1)%3C/script%3E"


@needs_crs
def test_waf_skip_and_exclusions(origin, edge, tmp_path):
    exclusions = tmp_path / "exclusions.conf"
    exclusions.write_text('SecRule REQUEST_URI "@beginsWith /cms/" '
                          '"id:1000,phase:1,pass,nolog,ctl:ruleRemoveById=941100-941999"\n')
    e, o = shielded(edge, origin, f"waf: {{skip: ['~u /upload'], exclusions: {exclusions}}}")
    with httpx.Client() as c:
        assert c.get(f"{e.url}/upload{XSS}", headers=BROWSER).status_code == 404          # skipped: reached the origin
        assert c.get(f"{e.url}/cms/page{XSS}", headers=BROWSER).status_code == 404        # XSS rules excluded there
        assert c.get(f"{e.url}/blog{XSS}", headers=BROWSER).status_code == 403
    assert [s.path.split("?")[0] for s in o.seen] == ["/upload", "/cms/page"]


@needs_crs
def test_waf_detect_mode_records_without_blocking(origin, edge, tmp_path):
    log = tmp_path / "access.log"
    e, o = shielded(edge, origin, "waf: {mode: detect}", log=str(log))
    assert httpx.get(f"{e.url}/blog{XSS}", headers=BROWSER).status_code == 404
    rec = json.loads(log.read_text())["edge"]
    assert rec["shield"] == "detect: waf: request blocked (403)" and "941100" in rec["waf"]


@needs_crs
def test_waf_engine_failure_fails_closed(origin, edge):
    e, o = shielded(edge, origin, "waf: {}")
    shield = e.master.addons.get("shield")

    def broken(*args):
        raise RuntimeError("engine exploded")
    shield.waf.finish = broken                                      # fault injection into the engine
    r = httpx.get(f"{e.url}/echo", headers=BROWSER)
    assert r.status_code == 500 and "request id" in r.text and not o.seen
    assert httpx.get(f"{e.url}/echo?again", headers=BROWSER).status_code == 500    # and the proxy still answers


@needs_crs
def test_waf_config_errors_are_clear(tmp_path):
    from click.testing import CliRunner
    from edgecli.main import cli
    config = tmp_path / "edge.yaml"
    config.write_text("pools: {a: {origins: [http://127.0.0.1:1]}}\nshield:\n  waf: {skip: ['~u (']}\n")
    result = CliRunner().invoke(cli, ["check", "-c", str(config)])
    assert result.exit_code == 2 and "shield.waf: waf.skip: '~u (' is not a mitmproxy filter expression" in result.output


# -- the shared store: a real redis-server ---------------------------------------------------------------

def test_two_edge_processes_share_one_limit_through_redis(origin, edge, redis_url, tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    from tests.conftest import free_port, wait_for_port
    o = origin("o")
    shield = f"shield:\n  rate_limit: {{rate: 1/m, burst: 4, store: '{redis_url}'}}\n"
    e = edge(f"pools: {{p: {{origins: [{o.url}]}}}}\n{shield}")
    port = free_port()
    config = tmp_path / "other.yaml"
    config.write_text(f"listen: 127.0.0.1:{port}\npools: {{p: {{origins: [{o.url}]}}}}\n{shield}")
    other = subprocess.Popen([Path(sys.executable).parent / "edge", "run", "-c", str(config),
                              "--confdir", str(tmp_path / "conf")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, other)
        with httpx.Client() as c:
            here = [c.get(f"{e.url}/echo").status_code for _ in range(3)]
            there = [c.get(f"http://127.0.0.1:{port}/echo").status_code for _ in range(3)]
    finally:
        other.terminate()
        other.wait(15)
    assert here == [200, 200, 200] and there == [200, 429, 429]       # one bucket of 4 for both edges
    assert len(o.seen) == 4


def test_an_unreachable_redis_keeps_limiting_in_process(origin, edge):
    from tests.conftest import free_port
    e, o = shielded(edge, origin, f"rate_limit: {{rate: 1/m, burst: 2, store: 'redis://127.0.0.1:{free_port()}/0'}}")
    with httpx.Client() as c:
        codes = [c.get(f"{e.url}/echo").status_code for _ in range(4)]
    assert codes == [200, 200, 429, 429]
    assert "ConnectionError" in e.master.addons.get("shield").limiter.last_error


# -- bots -----------------------------------------------------------------------------------------------

from addons.shield.bots import Behaviour, Challenge, classify  # noqa: E402

FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"


@pytest.mark.parametrize("ua, kind", [
    (FIREFOX, "browser"),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/17.0 Mobile/15E148 Safari/604.1", "browser"),
    (GOOGLEBOT, "search_engine"),
    ("Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)", "search_engine"),
    ("sqlmap/1.7.2#stable (https://sqlmap.org)", "scanner"),
    ("Mozilla/5.00 (Nikto/2.1.6) (Evasions:None) (Test:000003)", "scanner"),
    ("Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)", "bad"),
    ("", "bad"),
    ("curl/8.5.0", "unknown"),
    ("python-requests/2.31.0", "unknown"),
    ("NotARealClient/1.0", "unknown"),
])
def test_user_agent_classes(ua, kind):
    assert classify(ua) == kind


def test_behaviour_trap_paths_and_404_share():
    b = Behaviour(("/wp-login.php", "/.env"))
    assert b.requested("1.1.1.1", "/", 0.0) is None
    assert b.requested("1.1.1.1", "/wp-login.php?x=1", 1.0) == "trap path /wp-login.php"
    assert b.requested("1.1.1.1", "/", 2.0) == "trap path /wp-login.php"        # stays bad for a while
    assert b.requested("1.1.1.1", "/", 602.0) is None
    for i in range(19):
        b.answered("2.2.2.2", 404, float(i))
    assert b.requested("2.2.2.2", "/", 19.0) is None                           # not enough answers yet
    b.answered("2.2.2.2", 200, 19.5)
    assert b.requested("2.2.2.2", "/", 20.0) == "19 of 20 answers were 404"
    for i in range(119):
        b.requested("3.3.3.3", "/", i / 10)
    assert not b.busy("3.3.3.3")
    b.requested("3.3.3.3", "/", 12.0)
    assert b.busy("3.3.3.3")                                                   # 120 requests within a minute


def test_challenge_tokens_are_signed_bound_to_the_address_and_expire():
    c = Challenge(secret=b"k" * 32, ttl=60)
    token = c.issue("1.2.3.4", now=1000.0)
    assert c.valid(token, "1.2.3.4", now=1059.0)
    assert not c.valid(token, "1.2.3.5", now=1059.0)                           # another address
    assert not c.valid(token, "1.2.3.4", now=1061.0)                           # expired
    expiry, sig = token.split(".")
    assert not c.valid(f"{int(expiry) + 999}.{sig}", "1.2.3.4", now=1000.0)    # tampered expiry
    assert not c.valid("garbage", "1.2.3.4") and not c.valid(None, "1.2.3.4")
    assert not Challenge(ttl=60).valid(token, "1.2.3.4", now=1000.0)           # another secret


def test_bots_blocked_by_class_and_search_engines_served(origin, edge, tmp_path):
    from dnsserver import LoopbackDNS       # Googlebot is verified by reverse DNS: 127.0.0.1 is one here
    dns = LoopbackDNS()
    dns.zone.add("127.0.0.1", "crawl-127-0-0-1.googlebot.com")
    log = tmp_path / "access.log"
    e, o = shielded(edge, origin, f"bots: {{block: [scanner, bad], allow: [search_engine], resolver: '{dns.address}'}}",
                    log=str(log))
    with httpx.Client() as c:
        ua = lambda agent: c.get(f"{e.url}/echo", headers={"User-Agent": agent}).status_code
        assert ua("sqlmap/1.7.2#stable (https://sqlmap.org)") == 403
        assert ua("Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)") == 403
        assert ua(GOOGLEBOT) == 200 and ua(FIREFOX) == 200 and ua("curl/8.5.0") == 200
    assert len(o.seen) == 3
    first = json.loads(log.read_text().splitlines()[0])["edge"]
    assert first["bot"] == "scanner" and first["shield"] == "bots: automated clients of this kind are not served (403)"
    dns.stop()


def test_a_client_that_springs_a_trap_is_refused_afterwards(origin, edge):
    e, o = shielded(edge, origin, "bots: {trap_paths: [/wp-login.php]}")
    with httpx.Client(headers={"User-Agent": FIREFOX}) as c:
        assert c.get(f"{e.url}/echo").status_code == 200
        assert c.get(f"{e.url}/wp-login.php").status_code == 403
        assert c.get(f"{e.url}/echo").status_code == 403                        # bad for a while now
    assert [s.path for s in o.seen] == ["/echo"]


def test_the_cookie_challenge(origin, edge):
    e, o = shielded(edge, origin, "bots: {challenge: true}")
    with httpx.Client(headers={"User-Agent": "curl/8.5.0"}) as c:             # an `unknown` client
        first = c.get(f"{e.url}/echo")
        assert first.status_code == 403 and "Checking your browser" in first.text
        assert Challenge.COOKIE in c.cookies and not o.seen
        again = c.get(f"{e.url}/echo")
        assert again.status_code == 200                                         # came back with the cookie
        assert Challenge.COOKIE not in again.json()["headers"].get("cookie", "")   # the origin never sees it
    forged = httpx.get(f"{e.url}/echo", headers={"User-Agent": "curl/8.5.0",
                                                 "Cookie": f"{Challenge.COOKIE}=9999999999.{'0' * 32}"})
    assert forged.status_code == 403
    assert httpx.get(f"{e.url}/echo", headers={"User-Agent": FIREFOX}).status_code == 200    # browsers pass


def test_a_shared_challenge_secret_lets_another_edge_accept_the_cookie(origin, edge, tmp_path):
    secret = tmp_path / "challenge.key"
    secret.write_bytes(b"0123456789abcdef0123456789abcdef\n")
    e, o = shielded(edge, origin, f"bots: {{challenge: true, secret_file: {secret}}}")
    first = httpx.get(f"{e.url}/echo", headers={"User-Agent": "curl/8.5.0"})
    token = first.cookies[Challenge.COOKIE]
    assert Challenge(secret.read_bytes().strip()).valid(token, "127.0.0.1")     # what any other edge checks
    with pytest.raises(ConfigError) as bad:
        secret.write_bytes(b"short")
        parse_config(f"pools: {{a: {{origins: [http://x]}}}}\nshield:\n  bots: {{challenge: true, secret_file: {secret}}}\n")
    assert "fewer than 16 bytes" in str(bad.value)


# -- limits without a shield section -------------------------------------------------------------------

def unshielded(edge, origin, **limits):
    """An edge with no `shield:` section; `limits` stand in for what its keys would tune."""
    o = origin("o")
    return edge(replace(config_from_origins([o.url]), limits=Limits(**limits))), o


def test_without_a_shield_section_heads_are_capped_at_32kb(origin, edge):
    e, o = unshielded(edge, origin)
    assert e.config.shield is None
    assert httpx.get(f"{e.url}/echo", headers={"X-Big": "a" * 40_000}).status_code == 431
    assert httpx.get(f"{e.url}/echo", headers={"X-Fine": "a" * 20_000}).status_code == 200
    s = raw_connect(e)                                              # a head that has not ended at 40 KB
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Trickle: " + b"a" * 40_000)
    assert s.recv(1024).startswith(b"HTTP/1.1 431")
    assert len(o.seen) == 1


def test_without_a_shield_section_bodies_are_capped(origin, edge):
    e, o = unshielded(edge, origin)
    s = raw_connect(e)                                              # the default 10 MB, told before any body byte
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10485761\r\n\r\n")
    assert s.recv(1024).startswith(b"HTTP/1.1 413")
    assert not o.seen


def test_without_a_shield_section_a_half_sent_request_line_is_closed(origin, edge):
    e, o = unshielded(edge, origin, max_body=1024, timeouts=Timeouts(0.5, 0.5, 0.5))
    loris = raw_connect(e)
    loris.sendall(b"GET /health HTT")                               # and then nothing more
    started = time.monotonic()
    with httpx.Client() as c:
        while time.monotonic() - started < 1.0:                     # a normal client meanwhile
            assert c.get(f"{e.url}/health").status_code == 200
        assert c.post(f"{e.url}/echo", content=b"x" * 2048).status_code == 413
    loris.settimeout(5)
    assert closed_without_answer(loris)
    assert time.monotonic() - started < 5
    assert not [s for s in o.seen if s.method == "POST"]
