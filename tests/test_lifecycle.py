"""Reload (SIGHUP, `edge reload` through the admin endpoint's write side, the file watch),
graceful shutdown (SIGTERM/SIGINT) and log reopening (SIGUSR1): what an operator does to a
running edge, against real origins, a real master and real `edge run` processes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from click.testing import CliRunner

from addons.config import ConfigError, Listener, load_config, parse_config
from addons.lifecycle.rules import (Watch, authorized, changed_sections, forced_exit_code, generated_token,
                                    restart_needed)
from addons.shield.limits import MemoryStore
from edgecli.main import cli
from tests.conftest import free_port, until, wait_for_port
from tests.rawnet import RecordingOrigin

BIN = Path(sys.executable).parent
TOKEN = "s3cret-token-for-the-tests-0123456789"


def token_file(tmp_path: Path, token: str = TOKEN, mode: int = 0o600) -> Path:
    path = tmp_path / "admin.token"
    path.write_text(token + "\n")
    path.chmod(mode)
    return path


def config_text(pools: dict[str, list[str]], admin: int, token: Path, extra: str = "",
                default: str | None = None, listen: str = "127.0.0.1:0") -> str:
    lines = [f"listen: {listen}", f"admin: {{address: 127.0.0.1:{admin}, token_file: {token}}}", "pools:"]
    lines += [f"  {name}: {{origins: [{', '.join(urls)}]}}" for name, urls in pools.items()]
    if default:
        lines.append(f"routing: {{default_pool: {default}}}")
    return "\n".join(lines) + "\n" + extra


def who(url: str, path: str = "/", **kw) -> str:
    return httpx.get(url + path, **kw).text


def post(admin: tuple[str, int], path: str, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"http://{admin[0]}:{admin[1]}{path}", headers=headers)


def trickled_origin(release: threading.Event, big: int) -> RecordingOrigin:
    """Slow answers held until `release`; /big sends its head and 1 MB at once, the rest after."""
    def script(request: bytes):
        if request.startswith(b"GET /big"):
            def pieces():
                yield b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nCache-Control: no-store\r\n\r\n" % big + b"x" * 2**20
                release.wait(30)
                for _ in range((big - 2**20) // 2**20):
                    yield b"x" * 2**20
            return pieces()
        release.wait(30)
        return b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nCache-Control: no-store\r\n\r\nslow"
    return RecordingOrigin(script)


def download(url: str, box: dict, streaming: threading.Event) -> None:
    """GET `url` as a stream: box["big"] = (status, bytes received); `streaming` set at the first bytes."""
    got = 0
    with httpx.stream("GET", url, timeout=30) as answer:
        for chunk in answer.iter_bytes():
            got += len(chunk)
            streaming.set()
    box["big"] = (answer.status_code, got)


class Running:
    """An in-process edge started from a real config file (so that it can be read again)."""

    def __init__(self, edge, path: Path, **kw) -> None:
        self.path = path
        self.edge = edge(load_config(str(path)), **kw)
        self.chain = self.edge.master.addons.get("edge")
        self.admin = self.chain.admin.bound
        self.url = self.edge.url

    def rewrite(self, text: str) -> None:
        self.path.write_text(text)

    def reload(self, token: str | None = TOKEN) -> httpx.Response:
        return post(self.admin, "/reload", token)


# -- the pure parts ----------------------------------------------------------------------------------

def test_restart_is_needed_for_listeners_and_the_admin_address_only():
    old = parse_config("listen: 127.0.0.1:8080\nadmin: 127.0.0.1:9090\npools: {a: {origins: [http://127.0.0.1:1]}}\n")
    other_pool = parse_config("listen: 127.0.0.1:8080\nadmin: 127.0.0.1:9090\npools: {b: {origins: [http://127.0.0.1:2]}}\n")
    assert restart_needed(old, other_pool) is None
    assert changed_sections(old, other_pool) == ["pools", "default_pool"]
    moved = parse_config("listen: 127.0.0.1:8081\nadmin: 127.0.0.1:9090\npools: {a: {origins: [http://127.0.0.1:1]}}\n")
    assert restart_needed(old, moved) == "listen: 127.0.0.1:8080 -> 127.0.0.1:8081: listeners change only with a restart"
    tls = dataclasses.replace(old, listeners=(Listener(("127.0.0.1", 8080), tls=True),))
    assert restart_needed(old, tls) == \
        "listen: 127.0.0.1:8080 -> 127.0.0.1:8080 (tls): listeners change only with a restart"
    no_admin = parse_config("listen: 127.0.0.1:8080\npools: {a: {origins: [http://127.0.0.1:1]}}\n")
    assert restart_needed(old, no_admin).startswith("admin: 127.0.0.1:9090 -> off")


def test_the_watch_reads_a_changed_file_once_it_held_still():
    w = Watch((1, 1, 100, 10))
    assert not w.poll((1, 1, 100, 10))          # unchanged
    assert not w.poll((1, 1, 200, 12))          # changed: wait one poll (an editor may still write)
    assert not w.poll((1, 1, 300, 14))          # still changing
    assert w.poll((1, 1, 300, 14))              # settled: read it
    w.read((1, 1, 300, 14))
    assert not w.poll((1, 1, 300, 14))          # read: not again
    assert not w.poll(None) and not w.poll(None)        # missing (mid-rename): waited for, never read
    assert not w.poll((1, 2, 300, 14)) and w.poll((1, 2, 300, 14))    # a new inode (mv over it)
    w.read((1, 2, 300, 14))
    w.read((1, 2, 400, 14))                      # another trigger read a newer version meanwhile
    assert not w.poll((1, 2, 400, 14))


@pytest.mark.parametrize("head, ok", [
    (b"POST /reload HTTP/1.1\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n\r\n", True),
    (b"POST /reload HTTP/1.1\r\nauthorization: bearer " + TOKEN.encode() + b"\r\n\r\n", True),
    (b"POST /reload HTTP/1.1\r\n\r\n", False),
    (b"POST /reload HTTP/1.1\r\nAuthorization: Bearer wrong\r\n\r\n", False),
    (b"POST /reload HTTP/1.1\r\nAuthorization: Bearer " + TOKEN[:-1].encode() + b"\r\n\r\n", False),
    (b"POST /reload HTTP/1.1\r\nAuthorization: Bearer " + TOKEN.encode() + b"x\r\n\r\n", False),
    (b"POST /reload HTTP/1.1\r\nAuthorization: Basic " + TOKEN.encode() + b"\r\n\r\n", False),
    (b"POST /reload HTTP/1.1\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\nAuthorization: Bearer x\r\n\r\n", False),
    (b"POST /reload HTTP/1.1\r\nX-Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n", False),
])
def test_the_write_side_takes_exactly_one_bearer_token(head, ok):
    assert authorized(head, TOKEN) is ok
    assert not authorized(head, None) and not authorized(head, "")


def test_a_generated_token_is_private_and_kept(tmp_path):
    path, token = generated_token(str(tmp_path / "conf"))
    assert os.stat(path).st_mode & 0o777 == 0o600 and len(token) >= 32
    assert generated_token(str(tmp_path / "conf")) == (path, token)      # the next start keeps it
    os.chmod(path, 0o644)                                                 # loosened: not trusted, replaced
    again, fresh = generated_token(str(tmp_path / "conf"))
    assert again == path and fresh != token and os.stat(path).st_mode & 0o777 == 0o600


def test_config_admin_token_file_shutdown_timeout_and_watch(tmp_path):
    good = token_file(tmp_path)
    config = parse_config(f"admin: {{address: 127.0.0.1:9090, token_file: {good}}}\nshutdown_timeout: 5s\n"
                          f"reload: {{watch: true}}\npools: {{a: {{origins: [http://127.0.0.1:1]}}}}\n", "e.yaml")
    assert (config.admin, config.admin_token_file, config.shutdown_timeout, config.reload_watch) == \
        (("127.0.0.1", 9090), str(good), 5.0, True)
    defaults = parse_config("admin: 127.0.0.1:9090\npools: {a: {origins: [http://127.0.0.1:1]}}\n")
    assert (defaults.admin_token_file, defaults.shutdown_timeout, defaults.reload_watch) == (None, 30.0, False)
    loose = tmp_path / "loose.token"
    loose.write_text(TOKEN)
    loose.chmod(0o644)
    short = tmp_path / "short.token"
    short.write_text("abc")
    short.chmod(0o600)
    for admin, message in [(f"{{address: 127.0.0.1:9090, token_file: {loose}}}", "may be read by other users"),
                           (f"{{address: 127.0.0.1:9090, token_file: {short}}}", "at least 16 characters"),
                           (f"{{address: 127.0.0.1:9090, token_file: {tmp_path}/none}}", "cannot read"),
                           (f"{{token_file: {good}}}", "needs an address"),
                           ("{address: 127.0.0.1:9090, tokenfile: x}", "unknown key")]:
        with pytest.raises(ConfigError) as e:
            parse_config(f"pools: {{a: {{origins: [http://127.0.0.1:1]}}}}\nadmin: {admin}\n", "e.yaml")
        assert str(e.value).startswith("e.yaml:2: admin") and message in str(e.value)
    for text, key in [("shutdown_timeout: soon", "shutdown_timeout"), ("reload: {watch: yes please}", "reload.watch"),
                      ("reload: {poll: 1s}", "reload.poll")]:
        with pytest.raises(ConfigError, match=f"e.yaml:2: {key}"):
            parse_config(f"pools: {{a: {{origins: [http://127.0.0.1:1]}}}}\n{text}\n", "e.yaml")


def test_a_retuned_bucket_store_keeps_what_each_client_spent():
    store = MemoryStore(rate=1 / 60, burst=2)
    assert [store.take("a", 0.0).allowed for _ in range(2)] == [True, True]
    assert store.retuned(1 / 60, 2) is store
    wider = store.retuned(1 / 60, 5)
    assert not wider.take("a", 0.1).allowed          # spent before the reload: still spent
    assert [wider.take("b", 0.1).allowed for _ in range(5)] == [True] * 5     # a new client: the new burst


def test_second_signal_exit_status():
    assert forced_exit_code(signal.SIGTERM) == 143 and forced_exit_code(signal.SIGINT) == 130


# -- reload through the admin endpoint -------------------------------------------------------------------

def test_reload_applies_a_new_config_and_refuses_a_bad_one(edge, origin, tmp_path):
    a, b = origin("a"), origin("b")
    token, admin = token_file(tmp_path), free_port()
    (tmp_path / "edge.yaml").write_text(config_text({"main": [a.url]}, admin, token))
    r = Running(edge, tmp_path / "edge.yaml")
    assert who(r.url) == "hello from a\n"
    r.rewrite(config_text({"main": [b.url]}, admin, token))
    answer = r.reload()
    assert answer.status_code == 200 and answer.json()["changed"] == ["pools"]
    assert who(r.url) == "hello from b\n"
    # a file that does not validate: its FILE:LINE message, and the running config stays
    r.rewrite(config_text({"main": [b.url]}, admin, token) + "cache:\n  max_size: lots\n")
    answer = r.reload()
    assert answer.status_code == 409 and answer.json()["error"] == \
        f"{r.path}:6: cache.max_size: 'lots': expected a size like 512KB, 8MB or 1GB"
    assert who(r.url) == "hello from b\n"
    # listeners cannot move in place: refused whole, even with a pool change beside it
    r.rewrite(config_text({"main": [a.url]}, admin, token, listen=f"127.0.0.1:{free_port()}"))
    answer = r.reload()
    assert answer.status_code == 409 and "listeners change only with a restart" in answer.json()["error"]
    assert who(r.url) == "hello from b\n"
    # an addon that cannot take it (the disk cache's index is not a database): every addon goes back
    (tmp_path / "bad-cache").mkdir()
    (tmp_path / "bad-cache" / "cache.db").write_bytes(b"not a database " * 100)
    r.rewrite(config_text({"main": [a.url]}, admin, token,
                          extra=f"cache:\n  disk: {{path: {tmp_path / 'bad-cache'}, max_size: 8MB}}\n"))
    answer = r.reload()
    assert answer.status_code == 409 and "cannot open the disk cache" in answer.json()["error"]
    assert who(r.url) == "hello from b\n" and r.chain.config.pools["main"].origins[0].url == b.url


def test_the_write_side_refuses_without_the_token_and_changes_nothing(edge, origin, tmp_path):
    a, b = origin("a"), origin("b")
    token, admin = token_file(tmp_path), free_port()
    (tmp_path / "edge.yaml").write_text(config_text({"main": [a.url]}, admin, token))
    r = Running(edge, tmp_path / "edge.yaml")
    r.rewrite(config_text({"main": [b.url]}, admin, token))
    for attempt in (None, "wrong-token-wrong-token", TOKEN + "x"):
        answer = r.reload(attempt)
        assert answer.status_code == 401 and answer.headers["www-authenticate"].startswith("Bearer")
    assert post(r.admin, "/reopen", None).status_code == 401
    with socket.create_connection(r.admin) as s:           # two Authorization fields: which one counts?
        s.sendall(f"POST /reload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                  f"Authorization: Bearer {TOKEN}\r\nContent-Length: 0\r\n\r\n".encode())
        assert s.recv(100).startswith(b"HTTP/1.1 401 ")
    # the public listener has no write side: the request is the origin's like any other
    assert httpx.post(f"{r.url}/reload", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404
    assert [s.path for s in a.seen] == ["/reload"]
    assert who(r.url) == "hello from a\n"                   # nothing was reloaded
    assert httpx.get(f"http://{r.admin[0]}:{r.admin[1]}/reload").status_code == 404    # GET is the read side
    assert r.reload().status_code == 200 and who(r.url) == "hello from b\n"
    token_file(tmp_path, "a-rotated-token-0123456789")      # a reload reads the token file again
    assert r.reload().status_code == 200
    assert r.reload().status_code == 401 and r.reload("a-rotated-token-0123456789").status_code == 200


def test_state_survives_a_reload(edge, origin, tmp_path):
    """Cached objects, rate-limit buckets and the health of an origin that stays outlive a
    reload that changes pools, cache and shield settings."""
    a, b = origin("a"), origin("b")
    token, admin = token_file(tmp_path), free_port()
    shield = "shield:\n  rate_limit: {rate: 1/m, burst: 2, key: 'header:X-Key'}\n"
    (tmp_path / "edge.yaml").write_text(config_text({"main": [a.url]}, admin, token, extra=shield))
    r = Running(edge, tmp_path / "edge.yaml")
    with httpx.Client(base_url=r.url) as c:
        assert "fwd=uri-miss" in c.get("/cacheable", headers={"X-Key": "1"}).headers["cache-status"]
        assert [c.get("/", headers={"X-Key": "spent"}).status_code for _ in range(2)] == [200, 200]
        route = r.chain.route
        health = route.health[("127.0.0.1", a.port)]
        r.rewrite(config_text({"main": [a.url], "more": [b.url]}, admin, token, default="main",
                              extra=shield.replace("burst: 2", "burst: 3") + "cache: {default_ttl: 10s}\n"))
        answer = r.reload()
        assert answer.status_code == 200 and set(answer.json()["changed"]) >= {"pools", "shield", "cache"}
        hit = c.get("/cacheable", headers={"X-Key": "2"})
        assert hit.headers["cache-status"].startswith("edge; hit") and hit.text == "cacheable page from a\n"
        assert [s.path for s in a.seen].count("/cacheable") == 1
        # the spent bucket is still empty (refilled at 1 a minute); a new client has the new burst
        assert c.get("/", headers={"X-Key": "spent"}).status_code == 429
        assert [c.get("/", headers={"X-Key": "new"}).status_code for _ in range(4)] == [200, 200, 200, 429]
    assert route.health[("127.0.0.1", a.port)] is health


def test_in_flight_requests_finish_on_their_origin_after_its_pool_is_removed(edge, origin, tmp_path):
    """A slow answer and a download already streaming, both from a pool that a reload
    removes: they complete from that origin; new requests get the new config."""
    release, big = threading.Event(), 4 * 2**20
    slow = trickled_origin(release, big)
    b = origin("b")
    token, admin, log = token_file(tmp_path), free_port(), tmp_path / "access.log"
    (tmp_path / "edge.yaml").write_text(config_text({"slow": [slow.url], "b": [b.url]}, admin, token,
                                                    default="slow", extra=f"access_log: {log}\n"))
    r = Running(edge, tmp_path / "edge.yaml")
    box: dict = {}
    streaming = threading.Event()
    clients = [threading.Thread(target=lambda: box.setdefault("slow", httpx.get(f"{r.url}/slow", timeout=30))),
               threading.Thread(target=download, args=(f"{r.url}/big", box, streaming))]
    try:
        for c in clients:
            c.start()
        slow.wait_for_requests(2)
        assert streaming.wait(10)
        r.rewrite(config_text({"b": [b.url]}, admin, token, extra=f"access_log: {log}\n"))
        assert r.reload().status_code == 200
        assert who(r.url) == "hello from b\n"                  # new requests: the new config
        release.set()
        for c in clients:
            c.join(30)
        assert box["slow"].status_code == 200 and box["slow"].text == "slow" and box["big"] == (200, big)
        until(lambda: "/big" in log.read_text(), what="the download's line (written once its last byte left)")
        lines = {json.loads(line)["url"].rsplit("/", 1)[1]: json.loads(line) for line in log.read_text().splitlines()}
        assert lines["slow"]["edge"]["pool"] == lines["big"]["edge"]["pool"] == "slow"
        assert lines["big"]["edge"]["origin"] == slow.url and lines["big"]["bytes"] == big
        assert r.chain.route.in_flight[("127.0.0.1", slow.port)] == 0
    finally:
        release.set()
        slow.stop()


def test_the_file_watch_reloads_and_keeps_the_running_config_on_a_bad_edit(edge, origin, tmp_path, caplog):
    a, b = origin("a"), origin("b")
    token, admin = token_file(tmp_path), free_port()
    watch = "reload: {watch: true}\n"
    (tmp_path / "edge.yaml").write_text(config_text({"main": [a.url]}, admin, token, extra=watch))
    r = Running(edge, tmp_path / "edge.yaml")
    assert who(r.url) == "hello from a\n"
    r.rewrite(config_text({"main": [b.url]}, admin, token, extra=watch))
    until(lambda: who(r.url) == "hello from b\n", what="the watch reloaded")
    r.rewrite(config_text({"main": [a.url]}, admin, token, extra=watch + "pools: {}\n"))
    until(lambda: any("reload (file watch) refused" in m for m in caplog.messages), what="the bad edit was seen")
    refused = next(m for m in caplog.messages if "reload (file watch) refused" in m)
    assert f"{r.path}:6: pools: duplicate key" in refused
    assert who(r.url) == "hello from b\n"


def test_an_edge_without_a_config_file_has_nothing_to_reload(edge, origin):
    e = edge([origin("a").url])
    lifecycle = e.master.addons.get("edge").lifecycle

    async def sighup():
        return lifecycle.reload("SIGHUP")
    applied, why, _ = asyncio.run_coroutine_threadsafe(sighup(), e.master.event_loop).result(10)
    assert not applied and why == "nothing to reload: the config came from --origin, not a file"
    assert who(e.url) == "hello from a\n"


def test_edge_reload_says_what_is_missing(tmp_path):
    r = CliRunner().invoke(cli, ["reload", "--token-file", str(tmp_path / "none")])
    assert r.exit_code == 1 and "cannot read the admin token" in r.output and "SIGHUP" in r.output
    r = CliRunner().invoke(cli, ["reload", "--admin", f"http://127.0.0.1:{free_port()}", "--token-file",
                                 str(token_file(tmp_path))])
    assert r.exit_code == 1 and "cannot reach the edge's admin endpoint" in r.output and "Traceback" not in r.output


def test_reopen_through_the_admin_endpoint(edge, origin, tmp_path):
    a = origin("a")
    token, admin, log = token_file(tmp_path), free_port(), tmp_path / "access.log"
    (tmp_path / "edge.yaml").write_text(config_text({"main": [a.url]}, admin, token, extra=f"access_log: {log}\n"))
    r = Running(edge, tmp_path / "edge.yaml")
    who(r.url, "/before")
    log.rename(tmp_path / "access.log.1")
    assert post(r.admin, "/reopen").json() == {"reopened": True}
    who(r.url, "/after")
    assert "/before" in (tmp_path / "access.log.1").read_text() and "/after" not in (tmp_path / "access.log.1").read_text()
    assert "/after" in log.read_text() and "/before" not in log.read_text()


# -- graceful shutdown, in process ------------------------------------------------------------------------

def h2_connect(host: str, port: int, context: ssl.SSLContext):
    context.set_alpn_protocols(["h2"])
    sock = context.wrap_socket(socket.create_connection((host, port), timeout=10), server_hostname="localhost")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def h2_events_until(sock, conn, done) -> list:
    """HTTP/2 events as they come, until `done(events)` or the edge closes the connection."""
    seen: list = []
    while not done(seen):
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            break
        if not data:
            break
        seen += conn.receive_data(data)
        if out := conn.data_to_send():
            sock.sendall(out)
    return seen


def refuses(host: str, port: int) -> bool:
    """Nothing listens there any more (a reset: the connect was caught in the backlog as it closed)."""
    try:
        socket.create_connection((host, port), timeout=1).close()
        return False
    except (ConnectionRefusedError, ConnectionResetError):
        return True


def test_stopping_closes_idle_connections_and_lets_requests_finish(edge, tls, tmp_path):
    """The drain SIGTERM starts: listeners shut, an idle HTTP/1 keep-alive connection closed,
    an idle HTTP/2 one sent GOAWAY(NO_ERROR) then closed, and a slow request completed, with
    `Connection: close`, and logged before the master stops."""
    release = threading.Event()
    o = RecordingOrigin(lambda req: (release.wait(20), b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")[1]
                        if req.startswith(b"GET /slow") else b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    log = tmp_path / "access.log"
    e = edge([o.url], cert=str(tls.pem), access_log=str(log))
    context = tls.client_context()
    idle1 = context.wrap_socket(socket.create_connection((e.host, e.port), timeout=10), server_hostname="localhost")
    idle1.sendall(b"GET /first HTTP/1.1\r\nHost: localhost\r\n\r\n")
    first = b""
    while not first.endswith(b"\r\n\r\nok"):
        first += idle1.recv(1000)
    sock, conn = h2_connect(e.host, e.port, tls.client_context())
    conn.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":authority", "localhost"), (":path", "/h2")],
                      end_stream=True)
    sock.sendall(conn.data_to_send())
    h2_events_until(sock, conn, lambda seen: any(isinstance(x, h2.events.StreamEnded) for x in seen))
    box: dict = {}
    slow = threading.Thread(target=lambda: box.setdefault("r", httpx.get(
        f"https://{e.host}:{e.port}/slow", verify=context, timeout=30)))
    slow.start()
    until(lambda: any(r.startswith(b"GET /slow") for r in o.requests), what="the slow request reached the origin")
    chain = e.master.addons.get("edge")
    asyncio.run_coroutine_threadsafe(chain.lifecycle.drain(), e.master.event_loop)

    until(lambda: refuses(e.host, e.port), what="the listener closed")
    assert idle1.recv(1000) == b""                                    # idle HTTP/1: closed at once
    events = h2_events_until(sock, conn, lambda seen: False)          # until the edge closed it
    goaway = [x for x in events if isinstance(x, h2.events.ConnectionTerminated)]
    assert len(goaway) == 1 and goaway[0].error_code == 0 and goaway[0].last_stream_id == 1
    assert slow.is_alive()                                            # the slow one is waited for
    release.set()
    slow.join(30)
    assert box["r"].status_code == 200 and box["r"].text == "slow" and box["r"].headers["connection"] == "close"
    until(lambda: not e.master.event_loop.is_running(), what="the master stopped")
    paths = [json.loads(line)["url"].rsplit("/", 1)[1] for line in log.read_text().splitlines()]
    assert sorted(paths) == ["first", "h2", "slow"]


def test_what_outlasts_shutdown_timeout_is_cut_and_logged(edge, tmp_path):
    hold = threading.Event()
    o = RecordingOrigin(lambda req: (hold.wait(30), b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")[1])
    token, admin, log = token_file(tmp_path), free_port(), tmp_path / "access.log"
    (tmp_path / "edge.yaml").write_text(config_text({"main": [o.url]}, admin, token,
                                                    extra=f"access_log: {log}\nshutdown_timeout: 1s\n"))
    r = Running(edge, tmp_path / "edge.yaml")
    box: dict = {}

    def stuck() -> None:
        try:
            box["r"] = httpx.get(f"{r.url}/stuck", timeout=30)
        except httpx.HTTPError as e:
            box["r"] = e
    client = threading.Thread(target=stuck)
    try:
        client.start()
        o.wait_for_requests(1)
        asyncio.run_coroutine_threadsafe(r.chain.lifecycle.drain(), r.edge.master.event_loop)
        until(lambda: r.chain.lifecycle.draining, what="the drain started")
        refused = r.reload()
        assert refused.status_code == 409 and refused.json()["error"] == "the edge is shutting down"
        client.join(20)
        assert isinstance(box["r"], httpx.RemoteProtocolError)         # cut: no answer, not a hang
        until(lambda: not r.edge.master.event_loop.is_running(), what="the master stopped")
        line = json.loads(log.read_text().splitlines()[-1])
        assert line["url"].endswith("/stuck") and line["status"] is None and "error" in line
    finally:
        hold.set()
        o.stop()


# -- real `edge run` processes and signals ----------------------------------------------------------------

class EdgeRun:
    """`edge run -c FILE` as its own process; what it prints (its log is on stdout) in a file."""

    def __init__(self, tmp_path: Path, text: str) -> None:
        self.port = free_port()
        self.config = tmp_path / "edge.yaml"
        self.config.write_text(text.replace("listen: 127.0.0.1:0", f"listen: 127.0.0.1:{self.port}"))
        self.output = tmp_path / "edge.out"
        with open(self.output, "w") as out:
            self.proc = subprocess.Popen([BIN / "edge", "run", "-c", str(self.config), "--confdir", str(tmp_path / "conf")],
                                         stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})     # read as it grows
        wait_for_port(self.port, self.proc)
        self.url = f"http://127.0.0.1:{self.port}"

    def rewrite(self, text: str) -> None:
        self.config.write_text(text.replace("listen: 127.0.0.1:0", f"listen: 127.0.0.1:{self.port}"))

    def log(self) -> str:
        return self.output.read_text()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def refusing(self) -> bool:
        return refuses("127.0.0.1", self.port)

    def wait(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_sighup_edge_reload_and_sigusr1(origin, tmp_path):
    a, b = origin("a"), origin("b")
    token, admin, log = token_file(tmp_path), free_port(), tmp_path / "access.log"
    extra = f"access_log: {log}\n"
    e = EdgeRun(tmp_path, config_text({"main": [a.url]}, admin, token, extra=extra))
    try:
        assert who(e.url) == "hello from a\n"
        e.rewrite(config_text({"main": [b.url]}, admin, token, extra=extra))
        e.signal(signal.SIGHUP)
        until(lambda: who(e.url) == "hello from b\n", what="SIGHUP reloaded")
        assert "reloaded" in e.log() and "(SIGHUP): pools changed" in e.log()
        e.rewrite(config_text({"main": [a.url]}, admin, token, extra=extra + "buffer_limit: 1KB\n"))
        e.signal(signal.SIGHUP)
        until(lambda: "reload (SIGHUP) refused" in e.log(), what="the bad file was refused")
        assert f"{e.config}:6: buffer_limit: at least 16KB" in e.log() and who(e.url) == "hello from b\n"
        reload = [BIN / "edge", "reload", "--admin", f"http://127.0.0.1:{admin}", "--token-file", str(token)]
        done = subprocess.run(reload, capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and f"{e.config}:6: buffer_limit: at least 16KB" in done.stderr
        (tmp_path / "other").mkdir()
        wrong = token_file(tmp_path / "other", "another-token-another-token")
        done = subprocess.run(reload[:-1] + [str(wrong)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 1 and "refused the token" in done.stderr
        assert who(e.url) == "hello from b\n"
        e.rewrite(config_text({"main": [a.url]}, admin, token, extra=extra))
        done = subprocess.run(reload, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and "(edge reload): pools changed" in done.stdout
        assert who(e.url) == "hello from a\n"
        # logrotate without copytruncate: mv, SIGUSR1, and the next lines go to a new file
        log.rename(tmp_path / "access.log.1")
        who(e.url, "/after-mv")                                 # still written to the renamed file
        e.signal(signal.SIGUSR1)
        until(log.exists, what="the log was reopened")
        who(e.url, "/reopened")
        until(lambda: "/reopened" in log.read_text(), what="a line in the new file")
        old = (tmp_path / "access.log.1").read_text()
        assert "/after-mv" in old and "/reopened" not in old and "/after-mv" not in log.read_text()
        e.signal(signal.SIGINT)
        assert e.wait() == 0
        assert "Traceback" not in e.log()
    finally:
        e.kill()


def test_sigterm_lets_requests_and_a_download_finish(tmp_path):
    release, big = threading.Event(), 8 * 2**20
    o = trickled_origin(release, big)
    log = tmp_path / "access.log"
    e = EdgeRun(tmp_path, f"listen: 127.0.0.1:0\npools: {{main: {{origins: [{o.url}]}}}}\naccess_log: {log}\n")
    results: dict = {}
    streaming = threading.Event()
    threads = [threading.Thread(target=lambda i=i: results.setdefault(i, httpx.get(f"{e.url}/slow{i}", timeout=30)))
               for i in range(3)] + [threading.Thread(target=download, args=(f"{e.url}/big", results, streaming))]
    try:
        for t in threads:
            t.start()
        o.wait_for_requests(4)
        assert streaming.wait(10)
        e.signal(signal.SIGTERM)
        until(e.refusing, what="the listener closed")
        assert all(t.is_alive() for t in threads)
        release.set()
        for t in threads:
            t.join(30)
        assert [results[i].status_code for i in range(3)] == [200] * 3 and results["big"] == (200, big)
        assert e.wait() == 0
        lines = [json.loads(line) for line in log.read_text().splitlines()]
        assert sorted(line["url"].rsplit("/", 1)[1] for line in lines) == ["big", "slow0", "slow1", "slow2"]
        assert all(line["status"] == 200 for line in lines)
        assert "Traceback" not in e.log() and "CancelledError" not in e.log()
    finally:
        release.set()
        e.kill()
        o.stop()


def test_a_second_signal_exits_at_once(tmp_path):
    release = threading.Event()
    o = trickled_origin(release, 2**20)
    e = EdgeRun(tmp_path, f"listen: 127.0.0.1:0\npools: {{main: {{origins: [{o.url}]}}}}\n")
    def cut_short() -> None:
        with pytest.raises(httpx.HTTPError):        # the edge exits under it
            httpx.get(f"{e.url}/slow", timeout=30)

    client = threading.Thread(target=cut_short, daemon=True)
    try:
        client.start()
        o.wait_for_requests(1)
        e.signal(signal.SIGTERM)
        until(e.refusing, what="the listener closed")
        assert e.proc.poll() is None                   # draining: the slow request is waited for
        e.signal(signal.SIGTERM)
        assert e.wait(10) == 143
        assert "SIGTERM again: exiting now" in e.log()
    finally:
        release.set()
        e.kill()
        o.stop()


def test_edge_run_without_a_token_file_writes_one_for_edge_reload(origin, tmp_path):
    a = origin("a")
    admin = free_port()
    e = EdgeRun(tmp_path, f"listen: 127.0.0.1:0\nadmin: 127.0.0.1:{admin}\npools: {{main: {{origins: [{a.url}]}}}}\n")
    try:
        path = tmp_path / "conf" / "admin-token"
        until(lambda: f"the token is in {path}" in e.log(), what="the token's path printed")
        assert path.stat().st_mode & 0o777 == 0o600
        done = subprocess.run([BIN / "edge", "reload", "--admin", f"http://127.0.0.1:{admin}", "--token-file",
                               str(path)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and "nothing changed" in done.stdout
        e.signal(signal.SIGTERM)
        assert e.wait() == 0
    finally:
        e.kill()
