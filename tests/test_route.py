"""Routing with health: active checks, passive marks, backups, fallback pools, 503."""

import re
import socket
import time
from collections import Counter

import httpx

from edgecli.origins import Hangup, OriginServer
from tests.conftest import free_port, until


def served_by(e, n):
    with httpx.Client() as c:
        return Counter(c.get(f"{e.url}/echo").json()["origin"] for _ in range(n))


HEALTH = "health: {path: /health, interval: 200ms, timeout: 200ms, rise: 2, fall: 2}"


def test_active_checks_take_a_dead_origin_out_and_bring_it_back(origin, edge):
    a, b = origin("a"), origin("b")
    e = edge(f"pools:\n  p:\n    origins: [{a.url}, {b.url}]\n    {HEALTH}\n")
    route = e.master.addons.get("route")
    assert served_by(e, 4) == {"a": 2, "b": 2}
    a.stop()
    until(lambda: "down" in route.status().splitlines()[1])
    assert served_by(e, 10) == {"b": 10}                           # no client paid for a's death
    revived = OriginServer("a", port=a.port).start()
    try:
        until(lambda: route.status().splitlines()[1].endswith(": up"))
        assert served_by(e, 4) == {"a": 2, "b": 2}
    finally:
        revived.stop()


def test_a_quiet_dead_origin_is_probed_before_a_client_pays(origin, edge):
    b = origin("b")
    dead = free_port()
    e = edge(f"pools:\n  p:\n    origins: [http://127.0.0.1:{dead}, {b.url}]\n")
    assert served_by(e, 10) == {"b": 10}                            # not one 502
    assert "connect probe: ConnectionRefusedError" in e.master.commands.call("edge.status")


def test_an_origin_refusing_under_traffic_costs_no_request(origin, edge):
    a, b = origin("a"), origin("b")
    e = edge(f"pools:\n  p:\n    origins: [{a.url}, {b.url}]\n", access_log=None)
    assert served_by(e, 4) == {"a": 2, "b": 2}                      # both recently heard from: no probe
    a.stop()
    with httpx.Client() as c:                                       # a POST too: nothing reached a
        statuses = [c.post(f"{e.url}/echo", content=b"x").status_code for _ in range(2)]
    assert statuses == [200, 200]
    assert served_by(e, 10) == {"b": 10}
    assert re.search(r"unreachable (9|10)s \(connect probe: ConnectionRefusedError\)", e.master.commands.call("edge.status"))


def hangs_up(req, o):
    raise Hangup


def test_an_origin_failing_mid_request_is_retried_elsewhere_when_idempotent(origin, edge):
    broken = origin("broken", pages={"/echo": hangs_up})
    b = origin("b")
    e = edge(f"pools:\n  p:\n    origins: [{broken.url}, {b.url}]\n")
    got = httpx.get(f"{e.url}/echo?first")                          # round robin: `broken` first
    assert (got.status_code, got.json()["origin"]) == (200, "b")    # then b, before the client saw anything
    assert [(s.method, s.path) for s in broken.seen] == [("GET", "/echo?first")]


def test_a_request_that_may_have_reached_a_failing_origin_is_not_replayed(origin, edge):
    broken = origin("broken", pages={"/echo": hangs_up})
    b = origin("b")
    e = edge(f"pools:\n  p:\n    origins: [{broken.url}, {b.url}]\n")
    posted = httpx.post(f"{e.url}/echo", content=b"pay once")       # round robin: `broken` first
    assert posted.status_code == 502                                # bytes reached `broken`: no replay
    assert [s.method for s in broken.seen] == ["POST"] and not b.seen


def test_weights_change_at_run_time(origin, edge):
    a, b = origin("a"), origin("b")
    e = edge(f"pools:\n  p:\n    origins: [{a.url}, {b.url}]\n")
    assert e.master.commands.call("edge.weight", "p", a.url, 0) == f"p {a.url} weight 0"
    assert served_by(e, 6) == {"b": 6}                              # drained
    e.master.commands.call("edge.weight", "p", a.url, 2)
    assert served_by(e, 6) == {"a": 4, "b": 2}


def test_backup_only_when_the_primaries_are_gone(origin, edge):
    a, spare = origin("a"), origin("spare")
    e = edge(f"pools:\n  p:\n    origins:\n      - {a.url}\n      - {{url: {spare.url}, backup: true}}\n"
             f"    {HEALTH}\n")
    route = e.master.addons.get("route")
    assert served_by(e, 6) == {"a": 6}
    a.stop()
    until(lambda: "down" in route.status().splitlines()[1])
    assert served_by(e, 3) == {"spare": 3}


def test_fallback_pool_then_503(origin, edge):
    eu, us = origin("eu"), origin("us")
    e = edge(f"pools:\n  eu:\n    origins: [{eu.url}]\n    {HEALTH}\n    fallback: us\n"
             f"  us:\n    origins: [{us.url}]\n    {HEALTH}\nrouting: {{default_pool: eu}}\n")
    route = e.master.addons.get("route")
    eu.stop()
    until(lambda: "down" in route.status().splitlines()[1])
    assert served_by(e, 3) == {"us": 3}
    us.stop()
    until(lambda: route.choose("eu", time.monotonic()) is None)
    r = httpx.get(f"{e.url}/echo")
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert "no origin is available" in r.text and str(us.port) not in r.text and str(eu.port) not in r.text


def test_health_check_expects_a_status(origin, edge):
    sick = origin("sick", pages={"/health": lambda req, o: (500, [], b"broken"),
                                 "/echo": lambda req, o: (200, [], b'{"origin": "sick"}')})
    fine = origin("fine")
    e = edge(f"pools:\n  p:\n    origins: [{sick.url}, {fine.url}]\n    {HEALTH}\n")
    route = e.master.addons.get("route")
    until(lambda: "answered 500" in route.status())
    assert served_by(e, 4) == {"fine": 4}


def test_a_burst_after_a_quiet_spell_shares_one_probe(origin, edge):
    from concurrent.futures import ThreadPoolExecutor
    a = origin("a")
    e = edge([a.url])
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: httpx.get(f"{e.url}/echo").status_code, range(8)))
    assert statuses == [200] * 8
    assert a.connections == 1 + 8          # one probe, then one upstream connection per client connection


def test_hash_balancing_is_sticky_per_key(origin, edge):
    a, b = origin("a"), origin("b")
    e = edge(f"pools:\n  p:\n    origins: [{a.url}, {b.url}]\n    balance: hash\n    hash_key: header:X-User\n")
    with httpx.Client() as c:
        first = {u: c.get(f"{e.url}/echo", headers={"X-User": u}).json()["origin"] for u in map(str, range(40))}
        again = {u: c.get(f"{e.url}/echo", headers={"X-User": u}).json()["origin"] for u in map(str, range(40))}
    assert first == again                                          # each user keeps its origin
    assert set(first.values()) == {"a", "b"}                       # and users are spread


def test_hash_by_cookie_falls_back_to_the_client_ip(origin, edge):
    a, b = origin("a"), origin("b")
    e = edge(f"pools:\n  p:\n    origins: [{a.url}, {b.url}]\n    balance: hash\n    hash_key: cookie:sid\n")
    with httpx.Client() as c:
        anonymous = {c.get(f"{e.url}/echo").json()["origin"] for _ in range(6)}
        by_cookie = {s: c.get(f"{e.url}/echo", headers={"Cookie": f"sid={s}"}).json()["origin"]
                     for s in map(str, range(20))}
    assert len(anonymous) == 1                                     # one client IP: one origin
    assert set(by_cookie.values()) == {"a", "b"}


def test_least_conn_avoids_the_busy_origin(origin, edge):
    import threading
    release, busy = threading.Event(), threading.Event()

    def slow(req, o):
        busy.set()
        release.wait(10)
        return 200, [], b"slow"
    a = origin("a")
    b = origin("b")
    for o in (a, b):
        o.pages["/slow"] = slow
    e = edge(f"pools:\n  p:\n    origins: [{a.url}, {b.url}]\n    balance: least_conn\n")
    stuck = threading.Thread(target=httpx.get, args=(f"{e.url}/slow",), kwargs={"timeout": 20})
    stuck.start()
    try:
        assert busy.wait(10)                                       # one request is in flight
        busy_one = "a" if any(s.path == "/slow" for s in a.seen) else "b"
        other = {"a": "b", "b": "a"}[busy_one]
        assert served_by(e, 5) == {other: 5}
    finally:
        release.set()
        stuck.join(10)
    assert served_by(e, 2) == {"a": 1, "b": 1}                     # idle again: ties take turns


def overloaded(origin):
    return origin("sick", pages={"/echo": lambda req, o: (503, [("Cache-Control", "no-store")], b"overloaded")})


def test_answers_of_503_do_not_take_an_origin_out_by_default(origin, edge):
    sick, fine = overloaded(origin), origin("fine")
    e = edge(f"pools:\n  p:\n    origins: [{sick.url}, {fine.url}]\n")
    with httpx.Client() as c:                  # a 503 is the origin's answer (maybe for one URL only)
        statuses = [c.get(f"{e.url}/echo").status_code for _ in range(12)]
    assert statuses.count(503) == 6
    assert e.master.commands.call("edge.status").count(": up") == 2


def test_an_origin_answering_503_in_a_row_is_taken_out_when_asked(origin, edge):
    sick, fine = overloaded(origin), origin("fine")
    e = edge(f"pools:\n  p:\n    origins: [{sick.url}, {fine.url}]\n    passive: {{consecutive_5xx: 3}}\n")
    with httpx.Client() as c:
        statuses = [c.get(f"{e.url}/echo").status_code for _ in range(6)]
    assert statuses.count(503) == 3                                 # then the sick origin is out
    assert served_by(e, 6) == {"fine": 6}
    assert re.search(r"ejected (9|10)s \(3 answers of 503 in a row\)", e.master.commands.call("edge.status"))


def test_edge_status_reads_a_running_edge_through_its_admin_endpoint(origin, edge):
    from click.testing import CliRunner
    from edgecli.main import cli
    a, b = origin("a"), origin("b")
    e = edge(f"admin: 127.0.0.1:0\npools:\n  p:\n    origins: [{a.url}, {{url: {b.url}, weight: 3}}]\n"
             f"    slow_start: 10s\n")
    host, port = e.master.addons.get("admin").bound
    e.master.commands.call("edge.weight", "p", a.url, 0)
    result = CliRunner().invoke(cli, ["status", "--admin", f"http://{host}:{port}"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "pool p (weighted_round_robin, default)",
        f"  {a.url} weight 0, 0 in flight: up",                      # the run-time weight
        f"  {b.url} weight 3, 0 in flight: up"]
    raw = httpx.get(f"http://{host}:{port}/status").json()
    assert raw["pools"]["p"]["origins"][1] == {"url": b.url, "weight": 3, "backup": False, "available": True,
                                               "state": "up", "in_flight": 0}
    assert httpx.post(f"http://{host}:{port}/status").status_code == 405
    assert httpx.get(f"http://{host}:{port}/other").status_code == 404


def test_metrics_in_prometheus_text(origin, edge):
    a, b = origin("a"), origin("b")
    e = edge(f"admin: 127.0.0.1:0\npools:\n  p:\n    origins: [{a.url}, {b.url}]\n"
             f"shield:\n  rate_limit: {{rate: 1/m, burst: 3}}\n")
    with httpx.Client() as c:
        codes = [c.get(f"{e.url}/cacheable").status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    host, port = e.master.addons.get("admin").bound
    r = httpx.get(f"http://{host}:{port}/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    from prometheus_client.parser import text_string_to_metric_families
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(r.text) for s in f.samples}
    assert samples[("edge_requests_total", (("cache", "uri-miss"), ("status", "2xx")))] == 1     # stored, then
    assert samples[("edge_requests_total", (("cache", "hit"), ("status", "2xx")))] == 2          # two hits
    assert samples[("edge_requests_total", (("cache", "none"), ("status", "4xx")))] == 1         # the 429
    assert samples[("edge_origin_requests_total", (("origin", a.url), ("pool", "p")))] == 1
    assert samples[("edge_origin_available", (("origin", b.url), ("pool", "p")))] == 1
    assert samples[("edge_shield_refusals_total", (("kind", "rate (429)"),))] == 1
    assert samples[("edge_cache_bytes", ())] > 0


def test_edge_status_says_clearly_when_no_edge_answers():
    from click.testing import CliRunner
    from edgecli.main import cli
    result = CliRunner().invoke(cli, ["status", "--admin", f"http://127.0.0.1:{free_port()}"])
    assert result.exit_code == 1 and "cannot reach the edge's admin endpoint" in result.output


def blackhole() -> tuple[socket.socket, list[socket.socket]]:
    """A loopback port that never completes a connect: a listener whose accept queue is full
    drops new SYNs, as a firewalled or frozen origin does."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(listener.getsockname())
        fillers.append(s)
    return listener, fillers


def test_a_connect_that_hangs_times_out_and_the_request_goes_elsewhere(origin, edge):
    listener, fillers = blackhole()
    try:
        b = origin("b")
        hole = f"http://127.0.0.1:{listener.getsockname()[1]}"
        e = edge(f"pools:\n  p:\n    origins: [{hole}, {b.url}]\n    connect_timeout: 300ms\n")
        e.master.addons.get("route").health[("127.0.0.1", listener.getsockname()[1])].last_ok = time.monotonic()
        with httpx.Client(timeout=10) as c:                          # (recently heard from: no probe first)
            r = c.get(f"{e.url}/echo")
            assert (r.status_code, r.json()["origin"]) == (200, "b")
            assert "up, 1 failed in a row (connect timeout)" in e.master.commands.call("edge.status")
            again = [c.get(f"{e.url}/echo") for _ in range(2)]      # its turn again: probed first
        assert [(r.status_code, r.json()["origin"]) for r in again] == [(200, "b")] * 2
        assert re.search(r"unreachable (9|10)s \(connect probe: TimeoutError\)", e.master.commands.call("edge.status"))
    finally:
        for s in [listener, *fillers]:
            s.close()
