"""HTTP/2 abuse: the pure frame budgets and stream deadlines, then raw frames (the h2 library
over TLS with ALPN h2) against a real edge, with a normal client beside the attacker."""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import replace

import h2.config
import h2.connection
import h2.errors
import h2.events
import subprocess

import pytest
from hyperframe.frame import ContinuationFrame, HeadersFrame

from addons.config import ConfigError, FrameBudget, Http2Limits, Limits, Timeouts, config_from_origins, parse_config
from addons.shield.h2abuse import KINDS, FrameBudgets
from addons.shield.slow import Deadlines
from tests.rawnet import RecordingOrigin

CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM

# -- pure ------------------------------------------------------------------------------------------


def test_a_budget_allows_its_burst_then_its_rate_and_kinds_are_separate():
    budgets = FrameBudgets(Http2Limits(resets=FrameBudget(rate=10, burst=3)), now=0.0)
    assert [budgets.spend("resets", 0.0) for _ in range(3)] == [None, None, None]
    assert budgets.spend("pings", 0.0) is None                     # another kind, another bucket
    why = budgets.spend("resets", 0.0)
    assert why == "too many resets (4; allowed 3, then 10/s)"
    assert budgets.spend("resets", 0.1) is None                    # refilled at 10/s
    assert budgets.spend("resets", 0.1) is not None


def test_default_budgets_let_a_browser_cancel_two_full_pages():
    budgets = FrameBudgets(Http2Limits(), now=0.0)
    limits = Http2Limits()
    assert all(budgets.spend("resets", 0.0) is None for _ in range(2 * limits.max_concurrent_streams))
    assert set(KINDS) == {f for f in Http2Limits.__dataclass_fields__ if f != "max_concurrent_streams"}


def test_stream_deadlines_and_an_idle_http2_connection():
    d = Deadlines(request_headers=10, request_body=30, idle=60)
    d.connected("c", 0.0)
    d.stream_opened("c", "get", 1.0, body_expected=True)
    d.stream_body_received("c", "get")                             # a GET: its body ended with the head
    d.stream_opened("c", "upload", 2.0, body_expected=True)
    assert d.expired(31.9) == []                                   # no connection deadline while streams are open
    d.stream_closed("c", "get", 5.0)
    assert d.expired(32.0) == [("c", "request body timeout")]      # the upload's body missed its deadline
    assert d.streams == {} and d.due == {}
    d.connected("k", 0.0)
    d.stream_opened("k", "a", 1.0, body_expected=True)
    d.stream_body_received("k", "a")
    d.stream_closed("k", "a", 2.0)                                 # the last stream: idle from here
    assert d.expired(71.9) == [] and d.expired(72.0) == [("k", "idle timeout")]
    d.stream_closed("k", "a", 80.0)                                # twice, or unknown: nothing
    assert d.due == {}


def test_limits_exist_without_a_shield_section_and_its_keys_tune_them():
    plain = parse_config("pools: {a: {origins: [http://x]}}\n")
    assert plain.shield is None and plain.limits == Limits()
    assert (plain.limits.max_header_bytes, plain.limits.max_body) == (32 * 1024, 10 * 2**20)
    assert plain.limits.timeouts == Timeouts(10.0, 30.0, 60.0)
    tuned = parse_config("pools: {a: {origins: [http://x]}}\nshield:\n  max_body: 1KB\n"
                         "  http2: {max_concurrent_streams: 50, resets: {rate: 1/s, burst: 5}}\n")
    assert tuned.limits.max_body == 1024 and tuned.limits.http2.max_concurrent_streams == 50
    assert tuned.limits.http2.resets == FrameBudget(1.0, 5) and tuned.limits.http2.pings == Http2Limits().pings


@pytest.mark.parametrize("http2, key, problem", [
    ("{resets: {burst: 0}}", "shield.http2.resets.burst", "whole number"),
    ("{pings: {rate: often}}", "shield.http2.pings.rate", "expected a rate"),
    ("{max_concurrent_streams: 0}", "shield.http2.max_concurrent_streams", "whole number"),
    ("{goaways: {burst: 1}}", "shield.http2.goaways", "unknown key"),
])
def test_http2_limit_errors_name_the_line(http2, key, problem):
    with pytest.raises(ConfigError) as e:
        parse_config(f"pools: {{a: {{origins: [http://x]}}}}\nshield:\n  http2: {http2}\n", "s.yaml")
    assert e.value.line == 3 and e.value.key == key and problem in e.value.problem


# -- through the proxy: raw HTTP/2 frames over TLS ----------------------------------------------------

GET = [(":method", "GET"), (":scheme", "https"), (":authority", "localhost"), (":path", "/health")]
POST = [(":method", "POST"), (":scheme", "https"), (":authority", "localhost"), (":path", "/upload")]


class RawH2:
    """An HTTP/2 client connection whose frames the test chooses."""

    def __init__(self, e, tls) -> None:
        ctx = tls.client_context()
        ctx.set_alpn_protocols(["h2"])
        self.sock = ctx.wrap_socket(socket.create_connection((e.host, e.port), timeout=10), server_hostname="localhost")
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.events: list = []
        self.flush()

    def flush(self) -> bool:
        """Send what the h2 state has queued; False once the edge has closed the connection."""
        try:
            self.sock.sendall(self.conn.data_to_send())
            return True
        except OSError:
            return False

    def read_until(self, done, timeout: float = 10.0) -> list:
        """Read events until done(events) is true, the edge closes, or the deadline passes."""
        deadline = time.monotonic() + timeout
        while not done(self.events) and time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError, TimeoutError):
                break
            if not data:
                break
            self.events += self.conn.receive_data(data)
            self.flush()
        return self.events

    def goaway(self, timeout: float = 10.0) -> int | None:
        events = self.read_until(lambda ev: any(isinstance(x, h2.events.ConnectionTerminated) for x in ev), timeout)
        return next((x.error_code for x in events if isinstance(x, h2.events.ConnectionTerminated)), None)

    def statuses(self) -> dict[int, bytes]:
        return {x.stream_id: dict(x.headers)[b":status"] for x in self.events if isinstance(x, h2.events.ResponseReceived)}

    def close(self) -> None:
        self.sock.close()


def wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def curl_h2(e, tls, *paths: str, upload: int = 0) -> list[str]:
    """A normal HTTP/2 client (curl, ALPN h2 first as browsers): "STATUS VERSION" per path, all
    on one connection (curl reuses it)."""
    args = ["curl", "-s", "--http2", "--cacert", str(tls.ca), "--max-time", "20",
            "-w", "%{http_code} %{http_version}\\n"]
    if upload:
        args += ["--data-binary", "@-"]
    for path in paths:
        args += ["-o", "/dev/null", f"https://127.0.0.1:{e.port}{path}"]
    out = subprocess.run(args, input=b"x" * upload, capture_output=True, check=False, timeout=60).stdout
    return out.decode().splitlines()


def test_rapid_reset_costs_the_origin_nothing_and_ends_the_connection(edge, tls):
    o = RecordingOrigin()
    e = edge([o.url], cert=str(tls.pem))
    attacker = RawH2(e, tls)
    kept = set()
    for i in range(500):
        stream = 1 + 2 * i
        attacker.conn.send_headers(stream, GET, end_stream=True)
        if i % 50 == 0:
            kept.add(stream)                                       # one stream in 50 is a real request
        else:
            attacker.conn.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
        if i % 25 == 24 and not attacker.flush():
            break
    attacker.flush()
    assert attacker.goaway() == CALM
    assert curl_h2(e, tls, "/after") == ["200 2"]                 # a normal client beside it is served
    # The origin saw at most the streams that were not reset (those before the GOAWAY), and the
    # normal client's request: no reset stream became an origin request.
    paths = [r.split(b" ")[1] for r in o.requests]
    assert paths.count(b"/after") == 1 and paths.count(b"/health") <= len(kept)
    snapshot = e.master.addons.get("edge").snapshot
    assert snapshot()["shield"] == {"connection: http2 flood": 1}
    # nothing counted against the origin, and every cancelled flow let go of it
    assert wait_for(lambda: snapshot()["pools"]["default"]["origins"][0]["in_flight"] == 0)
    assert snapshot()["pools"]["default"]["origins"][0]["state"] == "up"
    attacker.close()
    o.stop()


def test_streams_reset_within_the_budget_never_reach_the_origin(edge, tls):
    """HEADERS(END_STREAM)+RST_STREAM read at once: mitmproxy used to forget the reset and send
    the request on (1,000 pairs made 1,000 origin requests)."""
    o = RecordingOrigin()
    e = edge([o.url], cert=str(tls.pem))
    client = RawH2(e, tls)
    for i in range(150):
        client.conn.send_headers(1 + 2 * i, GET, end_stream=True)
        client.conn.reset_stream(1 + 2 * i, h2.errors.ErrorCodes.CANCEL)
        if i % 10 == 9:
            client.flush()
    last = 1 + 2 * 150
    client.conn.send_headers(last, GET[:3] + [(":path", "/last")], end_stream=True)
    client.flush()
    client.read_until(lambda ev: last in client.statuses())
    assert client.statuses() == {last: b"200"}
    assert [r.split(b" ")[1] for r in o.requests] == [b"/last"]
    client.close()
    o.stop()


def test_a_reset_drops_the_exchange_already_with_the_origin(edge, tls):
    o = RecordingOrigin(lambda request: None)                       # takes the request, never answers
    e = edge([o.url], cert=str(tls.pem))
    client = RawH2(e, tls)
    client.conn.send_headers(1, GET, end_stream=True)
    client.flush()
    assert len(o.wait_for_requests(1)) == 1
    client.conn.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
    client.flush()
    assert o.connections[0].closed.wait(5)                           # the edge let go of the origin
    origin = e.master.addons.get("edge").snapshot()["pools"]["default"]["origins"][0]
    assert origin["state"] == "up" and wait_for(
        lambda: e.master.addons.get("edge").snapshot()["pools"]["default"]["origins"][0]["in_flight"] == 0)
    client.close()
    o.stop()


def test_a_browser_cancelling_two_pages_is_not_cut(edge, tls):
    """Navigating away cancels every open stream: twice the concurrency limit is within the budget."""
    o = RecordingOrigin()
    e = edge([o.url], cert=str(tls.pem))
    client = RawH2(e, tls)
    client.read_until(lambda ev: any(isinstance(x, h2.events.RemoteSettingsChanged) for x in ev))
    stream = 1
    for _ in range(2):
        opened = []
        for _ in range(100):
            client.conn.send_headers(stream, POST)                 # uploads in flight, bodies pending
            opened.append(stream)
            stream += 2
        client.flush()
        for s in opened:
            client.conn.reset_stream(s, h2.errors.ErrorCodes.CANCEL)
        client.flush()
    client.conn.send_headers(stream, GET, end_stream=True)
    client.flush()
    client.read_until(lambda ev: stream in client.statuses())
    assert client.statuses() == {stream: b"200"}
    assert not any(isinstance(x, h2.events.ConnectionTerminated) for x in client.events)
    assert [r.split(b" ")[1] for r in o.requests] == [b"/health"]   # none of the cancelled uploads
    client.close()
    o.stop()


def flood(client: RawH2, kind: str, n: int = 2000) -> None:
    c = client.conn
    if kind == "empty_frames":
        c.send_headers(1, POST)
    for i in range(n):
        if kind == "settings":
            c.update_settings({h2.settings.SettingCodes.ENABLE_PUSH: 0})
        elif kind == "pings":
            c.ping(i.to_bytes(8, "big"))
        elif kind == "priorities":
            c.prioritize(1 + 2 * (i % 50), weight=16)
        elif kind == "empty_frames":
            c.send_data(1, b"")
        elif kind == "window_updates":
            c.increment_flow_control_window(1)
        if i % 100 == 99 and not client.flush():
            return
    client.flush()


@pytest.mark.parametrize("kind", ["settings", "pings", "priorities", "empty_frames", "window_updates"])
def test_control_frame_floods_get_goaway_enhance_your_calm(edge, origin, tls, kind):
    o = origin("o")
    e = edge([o.url], cert=str(tls.pem))
    attacker = RawH2(e, tls)
    flood(attacker, kind, n=1000 if kind != "window_updates" else 4000)   # all past their burst
    assert attacker.goaway() == CALM
    assert curl_h2(e, tls, "/health") == ["200 2"]
    attacker.close()


def test_a_normal_http2_client_doing_many_requests_is_never_cut(edge, origin, tls):
    big = (200, [("Content-Type", "application/octet-stream"), ("Cache-Control", "no-store")], b"x" * 20_000_000)
    o = origin("o", pages={"/echo": lambda req, o: (200, [], b"ok"), "/big": lambda req, o: big})
    e = edge([o.url], cert=str(tls.pem))
    assert curl_h2(e, tls, *(f"/echo?{i}" for i in range(300))) == ["200 2"] * 300
    assert curl_h2(e, tls, "/echo", upload=2_000_000) == ["200 2"]
    assert curl_h2(e, tls, "/big", "/big") == ["200 2"] * 2      # its WINDOW_UPDATEs are within budget
    assert len(o.seen) == 303
    assert e.master.addons.get("edge").snapshot()["shield"] == {}


def test_settings_advertise_the_stream_and_header_limits_and_a_client_past_them_is_closed(edge, origin, tls):
    o = origin("o")
    e = edge([o.url], cert=str(tls.pem))
    client = RawH2(e, tls)
    for i in range(101):                                           # before reading the edge's SETTINGS
        client.conn.send_headers(1 + 2 * i, POST)
    client.flush()
    code = client.goaway()
    changed = next(x for x in client.events if isinstance(x, h2.events.RemoteSettingsChanged)).changed_settings
    assert changed[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS].new_value == 100
    assert changed[h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE].new_value == 32 * 1024
    assert code == h2.errors.ErrorCodes.PROTOCOL_ERROR              # the 101st stream
    assert curl_h2(e, tls, "/health") == ["200 2"]
    assert not [s for s in o.seen if s.method == "POST"]
    client.close()


def test_http2_heads_are_capped_431_or_goaway_never_buffered(edge, origin, tls):
    o = origin("o")
    e = edge([o.url], cert=str(tls.pem))
    client = RawH2(e, tls)
    client.conn.send_headers(1, GET + [("x-big", "a" * 40_000)], end_stream=True)   # over 32 KB: 431
    client.conn.send_headers(3, GET, end_stream=True)
    client.flush()
    client.read_until(lambda ev: len(client.statuses()) == 2)
    assert client.statuses() == {1: b"431", 3: b"200"}             # the connection goes on
    # A header block that does not end (CONTINUATION frames without END_HEADERS): h2 alone
    # buffers up to 64 frames of 128 KiB (8 MiB a connection); the edge ends it past twice the
    # cap. 1 MiB in 100 KB frames is far past the cap and within h2's frame count.
    client.sock.sendall(HeadersFrame(5, data=b"\x82\x87\x84").serialize())    # :method GET, :scheme https, :path /
    try:
        for _ in range(10):
            client.sock.sendall(ContinuationFrame(5, data=b"a" * 100_000).serialize())
    except OSError:
        pass
    assert client.goaway() == CALM
    assert [s.path for s in o.seen] == ["/health"]
    client.close()


def test_http2_stream_bodies_have_a_deadline_and_idle_connections_are_closed(edge, origin, tls):
    o = origin("o")
    config = replace(config_from_origins([o.url]), limits=Limits(timeouts=Timeouts(0.5, 0.5, 0.5)))
    e = edge(config, cert=str(tls.pem))                            # no shield section
    slow = RawH2(e, tls)
    slow.conn.send_headers(1, POST)
    slow.conn.send_data(1, b"abc")                                 # and then nothing more
    slow.flush()
    idle = RawH2(e, tls)
    idle.conn.send_headers(1, GET, end_stream=True)
    idle.flush()
    started = time.monotonic()
    while time.monotonic() - started < 1.0:                        # a normal client meanwhile
        assert curl_h2(e, tls, "/health") == ["200 2"]
    for client in (slow, idle):
        client.read_until(lambda ev: False, timeout=10)            # until the edge closes it
        assert time.monotonic() - started < 9
    assert idle.statuses() == {1: b"200"}                          # served, then closed when idle
    assert not [s for s in o.seen if s.method == "POST"]
    slow.close()
    idle.close()
