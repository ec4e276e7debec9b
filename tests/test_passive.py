"""Health that cannot be weaponised, through a real edge: bad answers to some URLs, clients that
hang up or reset streams, and slow origins cost those requests only; consecutive origin
failures eject within max_ejected; panic mode; the read timeout's 504."""

import re
import socket
import threading
import time

import h2.config
import h2.connection
import h2.events
import httpx

from tests.conftest import until
from tests.rawnet import CLOSE, OK, RecordingOrigin, exchange, status_of
from tests.test_route import blackhole

GET = b"GET %s HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n"
BAD = {
    b"/close": CLOSE,                                                           # closes, no answer
    b"/dup": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",   # two lengths
    b"/head": b"garbage\r\n\r\n",                                               # not HTTP
    b"/both": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok",  # smuggling-prone
}


def ask(e, path: bytes, timeout: float = 10) -> bytes:
    """One request on a new connection; its response (head and Content-Length body)."""
    return exchange(e.host, e.port, GET % path, timeout=timeout, until_close=False)


def by_path(answers: dict, default=OK):
    """A RecordingOrigin script answering by request target."""
    def script(request: bytes):
        return answers.get(request.split(b" ", 2)[1], default)
    return script


def status(e) -> str:
    return e.master.commands.call("edge.status")


def origin_lines(e) -> list[str]:
    return [line for line in status(e).splitlines() if line.startswith("  ")]


def test_a_lone_origin_survives_bad_answers_to_some_urls(edge):
    o = RecordingOrigin(by_path(BAD))
    try:
        e = edge([o.url])
        got = []
        for _ in range(3):                              # a bad answer every few requests
            for path in BAD:
                got.append(status_of(ask(e, path)))
                got += [status_of(ask(e, b"/page")) for _ in range(2)]
        assert got == [502, 200, 200] * (3 * len(BAD))
        assert [line.split(": ", 1)[1] for line in origin_lines(e)] == ["up"]
        assert sum(r.startswith(b"GET /close ") for r in o.requests) == 3   # each bad request once
    finally:
        o.stop()


def test_a_bad_answer_is_that_requests_502_and_a_client_beside_gets_200s(edge):
    o = RecordingOrigin(by_path(BAD))
    try:
        e = edge([o.url])
        stop, beside = threading.Event(), []

        def normal_client():
            with httpx.Client(timeout=10) as c:
                while not stop.is_set() or len(beside) < 5:       # keep-alive, during and after
                    beside.append(c.get(f"{e.url}/page").status_code)
        t = threading.Thread(target=normal_client)
        t.start()
        try:
            bad = [status_of(ask(e, path)) for _ in range(4) for path in BAD]
        finally:
            stop.set()
            t.join(10)
        assert bad == [502] * (4 * len(BAD))
        assert set(beside) == {200}
    finally:
        o.stop()


def connecting(e) -> bool:
    """Is a connect to an origin pending in the edge (timestamp_start set, no TCP set-up yet)?"""
    try:
        handlers = list(e.master.addons.get("proxyserver").connections.values())
        return any(conn is not h.client and conn.timestamp_start and conn.timestamp_tcp_setup is None
                   for h in handlers for conn in list(h.transports))
    except RuntimeError:                # changed while the edge's thread was at it: look again
        return False


def test_clients_hanging_up_while_the_edge_connects_do_not_count(edge):
    listener, fillers = blackhole()
    port = listener.getsockname()[1]
    try:
        e = edge(f"pools:\n  p:\n    origins: [http://127.0.0.1:{port}]\n    connect_timeout: 30s\n")
        route = e.master.addons.get("route")
        for _ in range(5):                              # more than passive.failures (3)
            route.health[("127.0.0.1", port)].last_ok = time.monotonic()   # heard from: no probe first
            s = socket.create_connection((e.host, e.port))
            s.sendall(GET % b"/")
            until(lambda: connecting(e))
            s.close()                                   # the client gives up while the edge connects
            until(lambda: not connecting(e) and not route.in_flight[("127.0.0.1", port)])
        assert origin_lines(e)[0].endswith(": up")      # no failure counted
    finally:
        for s in [listener, *fillers]:
            s.close()


def h2_client(e, tls):
    context = tls.client_context()
    context.set_alpn_protocols(["h2"])
    sock = context.wrap_socket(socket.create_connection((e.host, e.port), timeout=10), server_hostname="localhost")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def request_headers(path: str):
    return [(":method", "GET"), (":path", path), (":scheme", "https"), (":authority", "shop.example")]


def test_http2_stream_resets_do_not_count(edge, tls):
    o = RecordingOrigin(by_path({b"/slow": None}))      # /slow: the origin never answers
    try:
        e = edge([o.url], cert=str(tls.pem))
        sock, conn = h2_client(e, tls)
        for i, stream in enumerate(range(1, 11, 2)):    # reset each stream while the origin works
            conn.send_headers(stream, request_headers("/slow"), end_stream=True)
            sock.sendall(conn.data_to_send())
            o.wait_for_requests(i + 1)
            conn.reset_stream(stream)
            sock.sendall(conn.data_to_send())
        for stream in range(11, 71, 2):                 # and a burst of HEADERS + RST_STREAM pairs
            conn.send_headers(stream, request_headers("/page"), end_stream=True)
            conn.reset_stream(stream)
        sock.sendall(conn.data_to_send())
        conn.send_headers(71, request_headers("/page"), end_stream=True)   # a normal request after
        sock.sendall(conn.data_to_send())
        answer = None
        while answer is None:
            for event in conn.receive_data(sock.recv(65536)):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == 71:
                    answer = dict(event.headers)[b":status"]
            sock.sendall(conn.data_to_send())
        sock.close()
        assert answer == b"200"
        assert origin_lines(e)[0].endswith(": up")
    finally:
        o.stop()


def test_http2_resets_while_the_edge_connects_do_not_count(edge, tls):
    listener, fillers = blackhole()
    port = listener.getsockname()[1]
    try:
        e = edge(f"pools:\n  p:\n    origins: [http://127.0.0.1:{port}]\n    connect_timeout: 30s\n",
                 cert=str(tls.pem))
        route = e.master.addons.get("route")
        for _ in range(4):
            route.health[("127.0.0.1", port)].last_ok = time.monotonic()   # heard from: no probe first
            sock, conn = h2_client(e, tls)
            conn.send_headers(1, request_headers("/"), end_stream=True)
            sock.sendall(conn.data_to_send())
            until(lambda: connecting(e))
            conn.reset_stream(1)                        # the client cancels, then hangs up
            sock.sendall(conn.data_to_send())
            sock.close()
            until(lambda: not connecting(e) and not route.in_flight[("127.0.0.1", port)])
        assert origin_lines(e)[0].endswith(": up")
    finally:
        for s in [listener, *fillers]:
            s.close()


def test_consecutive_failures_eject_and_failover_costs_no_request(origin, edge):
    broken = RecordingOrigin(lambda _: CLOSE)                   # accepts, then closes every request unanswered
    good = origin("good")
    try:
        e = edge(f"pools:\n  p:\n    origins: [{broken.url}, {good.url}]\n")
        with httpx.Client() as c:
            answers = [c.get(f"{e.url}/echo") for _ in range(12)]
        assert [(r.status_code, r.json()["origin"]) for r in answers] == [(200, "good")] * 12
        assert len(broken.requests) == 3                # passive.failures: then it is left alone
        assert re.search(r"ejected (9|10)s \(server closed connection\)", origin_lines(e)[0])
    finally:
        broken.stop()


def test_consecutive_connect_failures_eject_and_failover_costs_no_request(origin, edge):
    plain, good = origin("plain"), origin("good")      # TLS to a plain-HTTP port: every connect fails
    e = edge(f"pools:\n  p:\n    origins: [https://127.0.0.1:{plain.port}, {good.url}]\n")
    answers = [httpx.get(f"{e.url}/echo") for _ in range(12)]      # a new client connection each
    assert [(r.status_code, r.json()["origin"]) for r in answers] == [(200, "good")] * 12
    assert plain.connections == 2 * 3                   # three TCP probes passed, three handshakes failed
    assert re.search(r": ejected (9|10)s \(The remote server does not speak TLS\.\)$", origin_lines(e)[0])
    assert not plain.seen                               # no request ever reached it


def closing_on_bad(name_origins):
    return [RecordingOrigin(by_path({b"/bad": CLOSE})) for _ in range(name_origins)]


def test_panic_mode_every_origin_ejected_still_serves(edge):
    a, b = closing_on_bad(2)
    try:
        e = edge(f"pools:\n  p:\n    origins: [{a.url}, {b.url}]\n    passive: {{failures: 1, max_ejected: 100%}}\n",
                 access_log=None)
        assert status_of(ask(e, b"/bad")) == 502     # a, then b: both fail
        assert [line.split(": ", 1)[1].split(" ")[0] for line in origin_lines(e)] == ["ejected", "ejected"]
        assert status_of(ask(e, b"/page")) == 200    # not 503: panic mode
        assert sum(line.endswith(": up") for line in origin_lines(e)) == 1   # its answer lifted its ejection
    finally:
        a.stop()
        b.stop()


def test_max_ejected_keeps_half_of_a_pool_in_rotation(edge):
    four = closing_on_bad(4)
    try:
        origins = ", ".join(o.url for o in four)
        e = edge(f"pools:\n  p:\n    origins: [{origins}]\n    passive: {{failures: 1}}\n")
        for _ in range(4):
            assert status_of(ask(e, b"/bad")) == 502
        states = [line.split(": ", 1)[1] for line in origin_lines(e)]
        assert sum(s.startswith("ejected") for s in states) == 2            # max_ejected 50%
        assert status_of(ask(e, b"/page")) == 200
    finally:
        for o in four:
            o.stop()


def test_503_only_once_a_probe_shows_the_origin_unreachable(origin, edge):
    o = origin("lone")
    e = edge([o.url])
    assert status_of(ask(e, b"/")) == 200
    o.stop()                                            # the lone origin dies
    got = [status_of(ask(e, b"/")) for _ in range(3)]
    assert got == [502, 503, 503]                       # refused; then probed first: unreachable
    assert re.search(r"unreachable (9|10)s \(connect probe: ConnectionRefusedError\)", origin_lines(e)[0])


def test_read_timeout_answers_504_and_the_edge_serves_others(edge):
    o = RecordingOrigin(by_path({b"/stuck": None}))     # accepts /stuck and never answers
    try:
        e = edge(f"pools:\n  p:\n    origins: [{o.url}]\n    read_timeout: 1s\n")
        box = {}
        stuck = threading.Thread(target=lambda: box.update(r=ask(e, b"/stuck", timeout=20)))
        stuck.start()
        o.wait_for_requests(1)
        others = [status_of(ask(e, b"/page")) for _ in range(3)]   # meanwhile
        stuck.join(20)
        assert others == [200, 200, 200]
        answer = box["r"]
        assert status_of(answer) == 504 and b"request id: " in answer and str(o.port).encode() not in answer
        assert o.connections[0].closed.wait(5)          # the edge let go of the origin
        assert origin_lines(e)[0].endswith(": up")      # one slow URL is no outage
    finally:
        o.stop()


def test_read_timeout_on_a_stalled_body(edge):
    stall = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nCache-Control: no-store\r\n\r\nonly part"
    o = RecordingOrigin(stall)
    try:
        e = edge(f"pools:\n  p:\n    origins: [{o.url}]\n    read_timeout: 1s\n")
        answer = ask(e, b"/", timeout=20)
        assert status_of(answer) == 504 and b"only part" not in answer   # buffered: the client saw nothing yet
    finally:
        o.stop()


def test_read_timeout_mid_body_cuts_a_streamed_response(edge):
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nCache-Control: no-store\r\n\r\n"
    o = RecordingOrigin(head + b"x" * 5000)
    try:
        e = edge(f"pools:\n  p:\n    origins: [{o.url}]\n    read_timeout: 1s\n", settings=["stream_large_bodies=1k"])
        answer = exchange(e.host, e.port, GET % b"/", timeout=20)      # returns once the edge closes
        assert status_of(answer) == 200 and b"x" * 5000 in answer and len(answer) < 100000
    finally:
        o.stop()


def test_health_checks_survive_an_exception(origin, edge, monkeypatch):
    from addons.route.addon import Route
    original, calls = Route._check, []

    async def check_once_broken(self, o, check):
        calls.append(o.url)
        if len(calls) == 1:
            raise RuntimeError("a bug in one check")
        await original(self, o, check)
    monkeypatch.setattr(Route, "_check", check_once_broken)
    a, b = origin("a"), origin("b")
    e = edge(f"pools:\n  p:\n    origins: [{a.url}, {b.url}]\n"
             f"    health: {{path: /health, interval: 200ms, timeout: 200ms, rise: 1, fall: 1}}\n")
    a.stop()
    until(lambda: "down" in origin_lines(e)[0])    # the checks went on after the exception
    assert len(calls) > 2


def test_an_http2_client_reaches_a_lone_origin_again_once_it_is_back(origin, edge, tls):
    from edgecli.origins import OriginServer
    o = origin("lone")
    e = edge([o.url], cert=str(tls.pem))
    sock, conn = h2_client(e, tls)

    def get(stream: int) -> bytes:
        conn.send_headers(stream, request_headers("/echo"), end_stream=True)
        sock.sendall(conn.data_to_send())
        while True:
            for event in conn.receive_data(sock.recv(65536)):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                    return dict(event.headers)[b":status"]
            sock.sendall(conn.data_to_send())
    assert get(1) == b"200"
    o.stop()
    assert get(3) == b"502"                            # refused (the origin was heard from: no probe)
    back = OriginServer("lone", port=o.port).start()   # back before its next request, which probes it
    try:
        assert get(5) == b"200"                        # the same connection connects again
    finally:
        sock.close()
        back.stop()
