"""The pure health rules: whose failure a message says it was, consecutive failures, the
max_ejected share, panic mode."""

import pytest

from addons.config import parse_config
from addons.route import Route
from addons.route.health import CONNECT_TIMEOUT, READ_TIMEOUT, Failure, Health, classify, ejection_allowed

# What mitmproxy 12.3 (under uvloop or asyncio) and the edge's own timers report, as observed
# through a real edge (tests/test_passive.py drives each case).
CONNECTING = [
    ("[Errno 111] Connection refused", Failure.CONNECT),                          # uvloop
    ("[Errno 111] Connect call failed ('127.0.0.1', 9)", Failure.CONNECT),        # asyncio
    ("Multiple exceptions: [Errno 111] Connect call failed ('::1', 9), [Errno 99] Cannot assign "
     "requested address", Failure.CONNECT),                    # one address refused: the origin's
    (CONNECT_TIMEOUT, Failure.CONNECT),                         # route's timer cancelled the connect
    ("[Errno -2] Name or service not known", Failure.CONNECT),
    ("Certificate verify failed: hostname mismatch", Failure.CONNECT),            # TLS to the origin
    ("client disconnected", Failure.CLIENT),                    # the client hung up while connecting
    ("closed by command", Failure.CLIENT),                      # a layer closed the stream's connection
    ("connection cancelled", Failure.CLIENT),
    ("Connection killed: refused by an addon", Failure.LOCAL),
    ("[Errno 24] Too many open files", Failure.LOCAL),          # the edge's own descriptors
    ("[Errno 99] Cannot assign requested address", Failure.LOCAL),                # out of ports
]
ANSWERING = [
    ("server closed connection", Failure.CLOSED),               # closed or reset before any byte
    ("peer closed connection", Failure.CLOSED),                 # an HTTP/2 origin's connection
    ("HTTP/2 connection closed: <ConnectionTerminated error_code:0>", Failure.CLOSED),
    ("unexpected server response: b'HTTP/1.1 20'", Failure.RESPONSE),            # a head cut short
    ("Cannot parse HTTP response: invalid content-length header: '2, 3'", Failure.RESPONSE),
    ("Cannot parse HTTP response: Bad HTTP response line: b'garbage'", Failure.RESPONSE),
    ("stream reset by client (REFUSED_STREAM)", Failure.RESPONSE),   # mitmproxy's words for an h2 origin
    (READ_TIMEOUT, Failure.TIMEOUT),
    ("Client disconnected.", Failure.CLIENT),
    ("something new in mitmproxy 13", Failure.RESPONSE),       # unknown: never counted
]


@pytest.mark.parametrize("message, failure", CONNECTING)
def test_connect_failures_are_classified(message, failure):
    assert classify(message, connecting=True, client_gone=False) is failure


@pytest.mark.parametrize("message, failure", ANSWERING)
def test_failures_before_the_response_head_are_classified(message, failure):
    assert classify(message, connecting=False, client_gone=False) is failure


@pytest.mark.parametrize("message", ["[Errno 111] Connection refused", "server closed connection"])
def test_nothing_counts_once_the_client_is_gone(message):
    assert classify(message, connecting=message.startswith("["), client_gone=True) is Failure.CLIENT


def test_only_the_origins_failures_count():
    assert {f for f in Failure if f.counts} == {Failure.CONNECT, Failure.CLOSED}


def test_consecutive_failures_eject_and_any_answer_starts_the_count_again():
    h = Health()
    assert not h.origin_failed("server closed connection", 0.0, failures=3, cooldown=10, may_eject=True)
    assert not h.origin_failed("server closed connection", 1.0, failures=3, cooldown=10, may_eject=True)
    assert h.available(1.0) and h.suspect(1.0, quiet=5) and h.describe(1.0).endswith("2 failed in a row "
                                                                                      "(server closed connection)")
    h.answered(200, 2.0)                                     # a normal client's answer in between
    assert (h.strikes, h.doubt) == (0, False)
    for t in (3.0, 4.0):
        assert not h.origin_failed("[Errno 111] Connection refused", t, 3, 10, True)
    assert h.origin_failed("[Errno 111] Connection refused", 5.0, 3, 10, True)     # the third in a row
    assert h.ejected(6.0) and not h.available(6.0) and h.reachable(6.0)
    assert h.describe(6.0) == "ejected 9s ([Errno 111] Connection refused)"
    assert h.available(15.0)                                 # the cool-down is over


def test_an_answer_lifts_an_ejection():
    h = Health()
    assert h.origin_failed("server closed connection", 0.0, failures=1, cooldown=10, may_eject=True)
    h.answered(200, 1.0)                                     # panic mode sent it a request: it works
    assert h.available(1.0) and h.back_at == 1.0


def test_an_ejection_without_room_waits_and_keeps_the_count():
    h = Health()
    for t in range(5):
        assert not h.origin_failed("server closed connection", float(t), 3, 10, may_eject=False)
    assert h.strikes == 3 and h.available(5.0)
    assert h.origin_failed("server closed connection", 5.0, 3, 10, may_eject=True)   # room again


@pytest.mark.parametrize("ejected, size, share, allowed", [
    (0, 1, 0.5, False),          # a lone origin is never ejected (nginx's single-server rule)
    (0, 1, 1.0, True),
    (0, 2, 0.5, True), (1, 2, 0.5, False),
    (0, 3, 0.5, True), (1, 3, 0.5, False),
    (1, 4, 0.5, True), (2, 4, 0.5, False),
    (0, 10, 0.0, False),
])
def test_max_ejected_is_a_share_of_the_pool(ejected, size, share, allowed):
    assert ejection_allowed(ejected, size, share) is allowed


def test_a_failed_probe_is_hard_and_a_passing_one_lifts_only_that():
    h = Health()
    h.origin_failed("server closed connection", 0.0, failures=1, cooldown=10, may_eject=True)
    assert h.probe_failed("connect probe: ConnectionRefusedError", 1.0, cooldown=10) is False   # was ejected
    assert not h.reachable(2.0) and h.describe(2.0).startswith("unreachable 9s")
    h.probe_passed(3.0)
    assert h.reachable(3.0) and h.ejected(3.0) and not h.suspect(3.0, quiet=5)


def test_answers_of_5xx_eject_only_when_configured():
    h = Health()
    assert not any(h.answered(503, float(t)) for t in range(20))          # off by default
    assert h.available(20.0)
    assert not h.answered(503, 21.0, consecutive_5xx=2, cooldown=10, may_eject=True)
    assert h.answered(502, 22.0, consecutive_5xx=2, cooldown=10, may_eject=True)
    assert h.describe(23.0) == "ejected 9s (2 answers of 502 in a row)"


def pools(text: str) -> Route:
    route = Route()
    route.apply(parse_config(text, "t.yaml"))
    return route


def health(route: Route, port: int) -> Health:
    return route.health[("127.0.0.1", port)]


def test_panic_mode_serves_from_ejected_origins_never_from_unreachable_ones():
    route = pools("pools:\n  p:\n    origins: [http://127.0.0.1:1, http://127.0.0.1:2]\n")
    for port in (1, 2):
        health(route, port).ejected_until = 100.0
    assert route.choose("p", 50.0) is not None                            # both only ejected: panic
    health(route, 1).unreachable_until = 100.0
    assert {route.choose("p", 50.0)[1].port for _ in range(4)} == {2}     # the probe-proven one is out
    health(route, 2).up = False                                           # active checks say down
    assert route.choose("p", 50.0) is None                                # now, and only now: 503


def test_a_fallback_pool_with_available_origins_comes_before_panic():
    route = pools("pools:\n  eu:\n    origins: [http://127.0.0.1:1]\n    fallback: us\n"
                  "  us:\n    origins: [http://127.0.0.1:2]\nrouting: {default_pool: eu}\n")
    health(route, 1).ejected_until = 100.0
    assert route.choose("eu", 50.0)[0] == "us"
    health(route, 2).ejected_until = 100.0
    assert route.choose("eu", 50.0) == ("eu", route.balancers["eu"].pool.origins[0])     # panic, in order


def test_failover_never_picks_an_origin_the_request_already_failed_on():
    route = pools("pools:\n  p:\n    origins: [http://127.0.0.1:1, http://127.0.0.1:2]\n")
    assert {route.choose("p", 0.0, tried={("127.0.0.1", 1)})[1].port for _ in range(4)} == {2}
    assert route.choose("p", 0.0, tried={("127.0.0.1", 1), ("127.0.0.1", 2)}) is None


def test_passive_config_defaults_and_errors():
    from addons.config import ConfigError, PassiveHealth
    pool = parse_config("pools:\n  p:\n    origins: [http://a:1]\n", "t.yaml").pools["p"]
    assert (pool.passive, pool.read_timeout) == (PassiveHealth(3, 10.0, 0.5, 0), 60.0)
    pool = parse_config("pools:\n  p:\n    origins: [http://a:1]\n    read_timeout: 1s\n"
                        "    passive: {failures: 5, cooldown: 30s, max_ejected: 100%, consecutive_5xx: 4}\n",
                        "t.yaml").pools["p"]
    assert (pool.passive, pool.read_timeout) == (PassiveHealth(5, 30.0, 1.0, 4), 1.0)
    for bad, problem in [("passive: {failures: 0}", "t.yaml:4: pools.p.passive.failures: expected a whole"),
                         ("passive: {max_ejected: 50}", "t.yaml:4: pools.p.passive.max_ejected: 50: expected a "
                                                        "percentage"),
                         ("passive: {max_ejected: 101%}", "t.yaml:4: pools.p.passive.max_ejected:"),
                         ("passive: {cooldown: 2h}", "t.yaml:4: pools.p.passive.cooldown: must be"),
                         ("passive: {consecutive_5xx: yes}", "t.yaml:4: pools.p.passive.consecutive_5xx:"),
                         ("passive: {failure: 3}", "t.yaml:4: pools.p.passive.failure: unknown key"),
                         ("read_timeout: 0s", "t.yaml:4: pools.p.read_timeout: must be more than 0")]:
        with pytest.raises(ConfigError) as e:
            parse_config(f"pools:\n  p:\n    origins: [http://a:1]\n    {bad}\n", "t.yaml")
        assert str(e.value).startswith(problem), str(e.value)
