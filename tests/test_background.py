"""Background work survives: a failing access log (a full disk) is reported, throttled, and
never stops the slow-client sweeper or a hook; a damaged geo database is not loaded; the
Redis rate-limit fallback says when it starts and ends."""

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest

from addons import tasks
from addons.geo import locate
from addons.shield import limits
from addons.trace import Trace
from tests.geodb import build
from tests.rawnet import RecordingOrigin, exchange, status_of

GET = b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n"


def test_throttle_reports_the_first_then_once_a_period_with_the_count():
    t = tasks.Throttle(period=60)
    assert t.occurred(100.0) == 1                   # the first: at once
    assert [t.occurred(100.0 + i) for i in range(1, 5)] == [0, 0, 0, 0]
    assert t.occurred(161.0) == 5                   # a minute on: the four held back and this one
    assert t.occurred(162.0) == 0


def test_every_goes_on_after_a_failing_round(caplog):
    rounds = []

    async def main() -> None:
        done = asyncio.Event()

        def job() -> None:
            rounds.append(1)
            if len(rounds) <= 3:
                raise OSError(28, "No space left on device")
            if len(rounds) == 5:
                done.set()

        task = asyncio.create_task(tasks.every(0, job, "a test job"))
        await asyncio.wait_for(done.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert len(rounds) >= 5
    reports = [r for r in caplog.records if "a test job failed" in r.getMessage()]
    assert len(reports) == 1 and reports[0].exc_info          # three failures, one report (throttled)


def slowloris(host: str, port: int) -> socket.socket:
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(b"GET / HTTP/1.1\r\nHost: shop.example\r\nX-Slow: ")     # and never the rest
    return s


def closed_by_peer(s: socket.socket) -> bool:
    """Wait (up to the socket's timeout) for the peer to close."""
    try:
        return s.recv(65536) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_a_full_disk_keeps_slowloris_protection_and_the_edge_serving(edge, caplog):
    o = RecordingOrigin()
    e = edge(f"pools: {{p: {{origins: [{o.url}]}}}}\nshield: {{timeouts: {{request_headers: 1s}}}}\n",
             access_log="/dev/full")                         # every write fails: ENOSPC
    assert status_of(exchange(e.host, e.port, GET, until_close=False)) == 200
    for _ in range(2):              # the first close's log line fails inside the sweeper
        with slowloris(e.host, e.port) as s:
            assert closed_by_peer(s), "a slow client was not closed"
    assert status_of(exchange(e.host, e.port, GET, until_close=False)) == 200
    reports = [r for r in caplog.records if "access log failed" in r.getMessage()]
    assert len(reports) == 1 and "No space left on device" in reports[0].getMessage()   # 4 failures, 1 report
    assert e.master.addons.get("edge").shield.refused["connection: request headers timeout"] == 2


def damage(path: Path) -> bytes:
    """The file's search tree overwritten, its metadata intact: it opens, lookups fail."""
    data = bytearray(path.read_bytes())
    meta = data.rfind(b"\xab\xcd\xefMaxMind.com")
    data[:meta - 16] = b"\xff" * (meta - 16)
    return bytes(data)


def test_a_damaged_geo_database_is_refused_and_the_old_one_kept(tmp_path, monkeypatch, caplog):
    path = build(tmp_path / "geo.mmdb")
    bad = tmp_path / "bad.mmdb"
    bad.write_bytes(damage(path))
    with pytest.raises(locate.GeoDatabaseError, match="damaged"):
        locate.Locator(bad)
    monkeypatch.setattr(locate, "RELOAD_CHECK", 0.0)
    locator = locate.Locator(path)
    assert locator.locate("81.2.69.160").country == "GB"
    os.replace(bad, path)                   # as `edge geoip update` swaps a file in
    time.sleep(0.01)                        # a new mtime even on coarse clocks
    assert locator.locate("89.160.20.112").country == "SE"            # still the old database
    assert any("not reloaded" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)


def test_redis_fallback_is_logged_when_it_starts_and_ends(edge, redis_server, monkeypatch, caplog):
    monkeypatch.setattr(limits, "REDIS_BACKOFF", 0.2)
    o = RecordingOrigin()
    e = edge(f"pools: {{p: {{origins: [{o.url}]}}}}\n"
             f"shield: {{rate_limit: {{rate: 1000/s, burst: 1000, store: '{redis_server.url}'}}}}\n")
    assert status_of(exchange(e.host, e.port, GET, until_close=False)) == 200
    redis_server.stop()
    for _ in range(5):              # limited in-process meanwhile: served
        assert status_of(exchange(e.host, e.port, GET, until_close=False)) == 200
    started = [r.getMessage() for r in caplog.records if "limiting in this process" in r.getMessage()]
    assert len(started) == 1 and redis_server.url in started[0]
    redis_server.start()
    deadline = time.monotonic() + 15
    while not any("answers again" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "the end of the fallback was never logged"
        assert status_of(exchange(e.host, e.port, GET, until_close=False)) == 200
        time.sleep(0.05)
    assert len([r for r in caplog.records if "answers again" in r.getMessage()]) == 1


def test_redis_url_password_is_not_logged():
    assert limits.redacted("redis://:s3cret@127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert limits.redacted("redis://user:pw@[::1]:7000/2") == "redis://[::1]:7000/2"
    assert limits.redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


class FullDisk:
    """A file whose writes fail with ENOSPC until `room` is set."""

    def __init__(self) -> None:
        self.room, self.lines = False, []

    def write(self, line: str) -> None:
        if not self.room:
            raise OSError(28, "No space left on device")
        self.lines.append(line)


def test_access_log_reports_failures_throttled_and_the_recovery_with_the_count(caplog):
    t = Trace()
    t.out = disk = FullDisk()
    for i in range(5):
        t.write({"n": i})                   # never raises
    assert [r.getMessage() for r in caplog.records if "access log" in r.getMessage()] == [
        "edge: access log failed: [Errno 28] No space left on device; going on"]
    disk.room = True
    t.write({"n": 5})
    assert '"n":5' in disk.lines[0]
    assert any("work again; 5 lines lost" in r.getMessage() for r in caplog.records)
    disk.room = False
    t.write({"n": 6})                       # a new outage is reported at once, not held for a minute
    assert sum("access log failed" in r.getMessage() for r in caplog.records) == 2
