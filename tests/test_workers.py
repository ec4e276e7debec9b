"""Workers on one machine: the supervisor's decisions (addons/workers/supervise.py) event by
event, and real `edge run --workers 2` processes sharing one port: both serve, a killed worker
comes back while the port keeps answering, a disk-cached object is a hit in the other worker, a
rolling reload loses no request, a bad config is refused by all, a stop lets a slow request
finish, a config the workers cannot start with stops the edge once, and workers do not outlive
their supervisor."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from addons.config import ConfigError, parse_config
from addons.lifecycle.rules import restart_needed
from addons.workers.supervise import (FIRST_DELAY, MAX_DELAY, START_ATTEMPTS, Finish, Say, Send, Start, Supervision,
                                      encode_report, next_delay, parse_report)
from edgecli.main import cli
from edgecli.origins import OriginServer, demo_pages
from tests.conftest import free_port
from tests.rawnet import RecordingOrigin
from tests.test_lifecycle import until

BIN = Path(sys.executable).parent
TOKEN = "workers-test-token-0123456789"


# -- the decisions ---------------------------------------------------------------------------------

def started(plan: Supervision, count: int, now: float = 0.0) -> None:
    """Every worker spawned (pid 100 + index) and ready."""
    assert plan.begin() == [Start(0)]
    plan.spawned(0, 100, now)
    assert plan.report(0, 100, "ready", "", now)[:count - 1] == [Start(i) for i in range(1, count)]
    for i in range(1, count):
        plan.spawned(i, 100 + i, now)
        actions = plan.report(i, 100 + i, "ready", "", now)
    assert plan.phase == "serving" and isinstance(actions[-1], Say) and "workers serving" in actions[-1].text


def test_the_back_off_doubles_to_its_ceiling_and_resets_after_a_steady_run():
    delays, delay = [], 0.0
    for _ in range(9):
        delay = next_delay(delay, lived=1.0)
        delays.append(delay)
    assert delays == [0.5, 1, 2, 4, 8, 16, MAX_DELAY, MAX_DELAY, MAX_DELAY]
    assert next_delay(MAX_DELAY, lived=61.0) == FIRST_DELAY


def test_worker_0_starts_alone_and_a_failed_first_start_stops_the_edge():
    plan = Supervision(3)
    assert plan.begin() == [Start(0)]
    plan.spawned(0, 100, 0.0)
    assert plan.exited(0, 2, 1.0) == [Finish(2)]          # its own error line said why: no restart
    plan = Supervision(2)
    plan.begin()
    plan.spawned(0, 100, 0.0)
    assert plan.report(0, 100, "ready", "", 0.5) == [Start(1)]
    plan.spawned(1, 101, 0.5)
    assert plan.exited(1, 1, 1.0) == [Send(0, signal.SIGTERM)]     # worker 0 drains, then the end
    assert plan.exited(0, 0, 1.2) == [Finish(1)]


def test_a_dead_worker_is_restarted_after_its_back_off_and_a_stale_report_is_ignored():
    plan = Supervision(2)
    started(plan, 2)
    actions = plan.exited(1, -9, 10.0)
    assert len(actions) == 1 and "killed by SIGKILL" in actions[0].text and "in 0.5s" in actions[0].text
    assert plan.next_timer() == 10.5 and plan.due(10.4) == [] and plan.due(10.5) == [Start(1)]
    plan.spawned(1, 201, 10.5)
    assert plan.report(1, 101, "ready", "", 10.6) == []       # the dead one's pid
    assert plan.report(1, 201, "ready", "", 10.6) == [Say("edge: worker 1 (pid 201) serving again")]
    assert "in 1s" in plan.exited(1, 3, 11.0)[0].text          # it lived 0.5 s: the delay doubles


def test_a_worker_that_keeps_failing_to_start_stops_the_edge():
    plan = Supervision(2)
    started(plan, 2)
    now, pid = 10.0, 300
    plan.exited(1, -9, now)
    for attempt in range(1, START_ATTEMPTS + 1):
        now = plan.next_timer()
        assert plan.due(now) == [Start(1)]
        plan.spawned(1, pid + attempt, now)
        actions = plan.exited(1, 2, now + 0.1)                  # before it was ready
        if attempt < START_ATTEMPTS:
            assert "restarting it in" in actions[0].text and all(not isinstance(a, Send) for a in actions)
    assert "could not start 5 times in a row" in actions[0].text and actions[1:] == [Send(0, signal.SIGTERM)]
    assert plan.exited(0, 0, now + 1) == [Finish(2)]


def test_a_rolling_reload_goes_one_worker_at_a_time_and_stops_at_a_refusal():
    plan = Supervision(3)
    started(plan, 3)
    assert plan.reload(20.0) == [Send(0, signal.SIGHUP)]
    assert plan.report(1, 101, "reload", "", 20.1) == []           # asked during the roll: once after it
    assert plan.report(0, 100, "reloaded", "pools changed", 20.2) == [Send(1, signal.SIGHUP)]
    assert plan.exited(2, -9, 20.3)[0].text.startswith("edge: worker 2")       # restarts: it reads the file
    done = plan.report(1, 101, "reloaded", "pools changed", 20.4)
    assert done[0] == Say("edge: rolling reload done (workers reloaded: 0, 1; not 2: not serving, read the file as "
                          "they start)") and done[1:] == [Send(0, signal.SIGHUP)]
    assert plan.report(0, 100, "refused", "edge.yaml:3: buffer_limit: at least 16KB", 20.5) == [
        Say("edge: rolling reload stopped: worker 0 refused the config (edge.yaml:3: buffer_limit: at least 16KB); "
            "workers 0, 1, 2 keep the running one")]
    assert plan.rolling is None and plan.report(1, 101, "reloaded", "", 20.6) == []     # not its turn


def test_a_roll_waits_for_a_silent_worker_only_so_long():
    plan = Supervision(2)
    started(plan, 2)
    assert plan.reload(0.0) == [Send(0, signal.SIGHUP)]
    assert plan.due(119.0) == []
    actions = plan.due(plan.next_timer())
    assert "did not report" in actions[0].text and actions[1] == Send(1, signal.SIGHUP)


def test_a_stop_drains_every_worker_and_a_second_one_kills_them():
    plan = Supervision(2)
    started(plan, 2)
    actions = plan.stop(signal.SIGTERM)
    assert actions[1:] == [Send(0, signal.SIGTERM), Send(1, signal.SIGTERM)]
    assert plan.exited(0, 0, 5.0) == [] and plan.due(100.0) == []      # no restart while stopping
    assert plan.reload(5.0) == [Say("edge: reload ignored: the edge is stopping")]
    assert plan.exited(1, 0, 6.0) == [Finish(0)]
    plan = Supervision(2)
    started(plan, 2)
    assert plan.forward(signal.SIGUSR1) == [Send(0, signal.SIGUSR1), Send(1, signal.SIGUSR1)]
    assert plan.report(1, 101, "reopen", "", 7.0) == [Send(0, signal.SIGUSR1), Send(1, signal.SIGUSR1)]
    plan.stop(signal.SIGINT)
    assert plan.stop(signal.SIGINT)[1:] == [Send(0, signal.SIGKILL), Send(1, signal.SIGKILL), Finish(130)]


def test_reports_are_single_lines_shorter_than_pipe_buf():
    line = encode_report(3, 4242, "refused", "edge.yaml:6: buffer_limit:\n  at least 16KB" + "x" * 10_000)
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and len(line) < select.PIPE_BUF
    index, pid, kind, text = parse_report(line)
    assert (index, pid, kind) == (3, 4242, "refused") and text.startswith("edge.yaml:6: buffer_limit: at least 16KB")
    assert parse_report(b"garbage") is None and parse_report(b"1 x ready") is None


def test_workers_need_a_port_of_their_own_and_no_console():
    base = ["run", "--origin", "http://127.0.0.1:1", "--workers", "2", "--confdir", "/nonexistent/conf"]
    for extra, said in ((["--listen", "127.0.0.1:0"], "workers share a port: listen on a port other than 0"),
                        (["--web"], "--web runs one process: not with workers")):
        r = CliRunner().invoke(cli, base + extra)
        assert r.exit_code == 1 and said in r.output
    r = CliRunner().invoke(cli, base + ["--workers", "0"])
    assert r.exit_code == 2 and "expected auto or a whole number" in r.output


def test_the_workers_key():
    base = "pools: {a: {origins: [http://127.0.0.1:1]}}\n"
    assert parse_config(base).workers == 1
    assert parse_config(base + "workers: auto\n").workers == (os.cpu_count() or 1)
    assert parse_config(base + "workers: 4\n").workers == 4
    for bad in ("0", "-1", "true", "many", "1000"):
        with pytest.raises(ConfigError, match=r"edge.yaml:2: workers: expected auto or a whole number"):
            parse_config(base + f"workers: {bad}\n", "edge.yaml")
    why = restart_needed(parse_config(base), parse_config(base + "workers: 2\n"))
    assert why == "workers: 1 -> 2: the number of workers changes only with a restart"


# -- real workers ------------------------------------------------------------------------------------

def alive(pid: int) -> bool:
    """Running (a zombie has closed its sockets: not alive)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Workers:
    """`edge run -c FILE --workers 2` as a process (the supervisor); what it and its workers print
    goes to a file; the access log says which worker answered each request."""

    def __init__(self, tmp_path: Path, text: str, ready: bool = True) -> None:
        self.port, self.admin = free_port(), free_port()
        self.config, self.access = tmp_path / "edge.yaml", tmp_path / "access.log"
        self.token = tmp_path / "admin.token"
        self.token.write_text(TOKEN + "\n")
        self.token.chmod(0o600)
        self.rewrite(text)
        self.output = tmp_path / "edge.out"
        with open(self.output, "w") as out:
            self.proc = subprocess.Popen([BIN / "edge", "run", "-c", str(self.config), "--workers", "2",
                                          "--confdir", str(tmp_path / "conf")], stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.url = f"http://127.0.0.1:{self.port}"
        if ready:
            until(lambda: "2 workers serving" in self.log() or self.proc.poll() is not None, timeout=60, what="workers up")
            assert self.proc.poll() is None, self.log()

    def rewrite(self, text: str) -> None:
        self.config.write_text(f"listen: 127.0.0.1:{self.port}\naccess_log: {self.access}\n"
                               f"admin: {{address: 127.0.0.1:{self.admin}, token_file: {self.token}}}\n" + text)

    def log(self) -> str:
        return self.output.read_text()

    def children(self) -> list[int]:
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            return []

    def answered(self, path: str) -> list[dict]:
        """The access log's lines for `path` (each names its worker)."""
        if not self.access.exists():
            return []
        lines = [json.loads(line) for line in self.access.read_text().splitlines()]
        return [line for line in lines if line["url"].endswith(path)]

    def get(self, path: str) -> tuple[httpx.Response, int]:
        """GET on a new connection; (the response, the worker that answered it)."""
        before = len(self.answered(path))
        r = httpx.get(self.url + path, timeout=10)
        lines = until(lambda: (lines := self.answered(path)) and len(lines) > before and lines,
                      what=f"{path} in the access log")
        return r, lines[-1]["worker"]

    def reload(self) -> subprocess.CompletedProcess:
        return subprocess.run([BIN / "edge", "reload", "--admin", f"http://127.0.0.1:{self.admin}",
                               "--token-file", str(self.token)], capture_output=True, text=True, timeout=30)

    def kill(self) -> None:
        pids = self.children()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def both_answer(w: Workers, tag: str, tries: int = 60) -> dict[int, httpx.Response]:
    """Requests on new connections until each worker answered one: {worker: its response}."""
    seen: dict[int, httpx.Response] = {}
    for i in range(tries):
        r, worker = w.get(f"/?{tag}-{i}")
        seen.setdefault(worker, r)
        if len(seen) == 2:
            return seen
    raise AssertionError(f"{tries} connections all went to worker {set(seen)}")


def pages() -> dict:
    return {**demo_pages(), "/": lambda req, o: (200, [("Cache-Control", "no-store")], f"hello from {o.name}\n".encode())}


def test_two_workers_share_the_port_share_the_disk_cache_and_a_killed_one_comes_back(tmp_path):
    o = OriginServer("a", pages=pages()).start()
    w = Workers(tmp_path, f"pools: {{main: {{origins: [{o.url}]}}}}\n"
                          f"cache: {{disk: {{path: {tmp_path / 'cache'}, max_size: 4MB}}}}\nreload: {{watch: true}}\n")
    try:
        assert sorted(both_answer(w, "spread")) == [0, 1]
        # an object stored by the worker that missed is a disk hit in the other one
        r, first = w.get("/cacheable?k=1")
        assert r.status_code == 200 and "stored" in r.headers["cache-status"]
        for _ in range(60):
            again, other = w.get("/cacheable?k=1")
            if other != first:
                break
        assert other != first and again.text == r.text == "cacheable page from a\n"
        assert again.headers["cache-status"].startswith("edge; hit")
        assert [s.path for s in o.seen].count("/cacheable?k=1") == 1
        # SIGKILL one worker: the other answers meanwhile, the supervisor starts it again
        victim, survivor = w.children()
        os.kill(victim, signal.SIGKILL)
        until(lambda: not alive(victim), what="the worker died")
        statuses, deadline = [], time.monotonic() + 60
        while "serving again" not in w.log():
            statuses.append(httpx.get(w.url + "/", timeout=10).status_code)
            assert time.monotonic() < deadline, "the worker was not restarted"
        assert set(statuses) == {200} and "killed by SIGKILL" in w.log()
        assert survivor in w.children() and victim not in w.children() and len(w.children()) == 2
        assert sorted(both_answer(w, "again")) == [0, 1]
        # the file watch (worker 0's) reloads the workers one at a time too
        w.rewrite(f"pools: {{main: {{origins: [{o.url}]}}}}\nreload: {{watch: true}}\nshutdown_timeout: 5s\n")
        until(lambda: "rolling reload done (workers reloaded: 0, 1)" in w.log(), what="the watch's roll")
        assert w.log().count("(SIGHUP): cache, shutdown_timeout changed") == 2
        w.proc.send_signal(signal.SIGINT)
        assert w.proc.wait(30) == 0
        assert "Traceback" not in w.log()
    finally:
        w.kill()
        o.stop()


def test_a_rolling_reload_loses_no_request_and_a_bad_config_is_refused_by_all(tmp_path):
    a, b = OriginServer("a", pages=pages()).start(), OriginServer("b", pages=pages()).start()
    w = Workers(tmp_path, f"pools: {{main: {{origins: [{a.url}]}}}}\n")
    stop, statuses = threading.Event(), []

    def client() -> None:
        with httpx.Client(timeout=10) as keep_alive:
            while not stop.is_set():
                statuses.append(httpx.get(w.url + "/?loop-new", timeout=10).status_code)     # new connections
                statuses.append(keep_alive.get(w.url + "/?loop-kept").status_code)
    loop = threading.Thread(target=client)
    try:
        assert {r.text for r in both_answer(w, "before").values()} == {"hello from a\n"}
        loop.start()
        w.rewrite(f"pools: {{main: {{origins: [{b.url}]}}}}\n")
        done = w.reload()
        assert done.returncode == 0 and "is valid (pools changed): rolling reload of 2 workers started" in done.stdout
        until(lambda: "rolling reload done (workers reloaded: 0, 1)" in w.log(), what="the roll")
        assert {r.text for r in both_answer(w, "after").values()} == {"hello from b\n"}
        # a bad file: `edge reload` answers its mistake, SIGHUP's roll stops at the first worker
        w.rewrite(f"pools: {{main: {{origins: [{a.url}]}}}}\nbuffer_limit: 1KB\n")
        done = w.reload()
        assert done.returncode == 2 and f"{w.config}:5: buffer_limit: at least 16KB" in done.stderr
        w.proc.send_signal(signal.SIGHUP)
        until(lambda: "rolling reload stopped: worker 0 refused the config" in w.log(), what="the refusal")
        assert {r.text for r in both_answer(w, "refused").values()} == {"hello from b\n"}
        stop.set()
        loop.join(30)
        assert len(statuses) > 10 and set(statuses) == {200}
        # the supervisor dies: its workers do not serve on without it
        workers = w.children()
        w.proc.kill()
        w.proc.wait()
        until(lambda: not any(alive(pid) for pid in workers), what="the workers exited")
        with pytest.raises(httpx.ConnectError):
            httpx.get(w.url + "/", timeout=5)
    finally:
        stop.set()
        w.kill()
        a.stop()
        b.stop()


def test_a_stop_lets_a_slow_request_finish_in_its_worker(tmp_path):
    release = threading.Event()
    o = RecordingOrigin(lambda req: (release.wait(20), b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")[1])
    w = Workers(tmp_path, f"pools: {{main: {{origins: [{o.url}]}}}}\n")
    box: dict = {}
    slow = threading.Thread(target=lambda: box.setdefault("r", httpx.get(w.url + "/slow", timeout=30)))
    try:
        workers = w.children()
        slow.start()
        until(lambda: o.requests, what="the slow request reached the origin")
        w.proc.send_signal(signal.SIGTERM)
        until(lambda: "stopping 2 workers" in w.log(), what="the stop")
        until(lambda: sum(not alive(pid) for pid in workers) == 1, what="the idle worker exited")
        assert slow.is_alive() and w.proc.poll() is None          # the other one drains
        release.set()
        slow.join(30)
        assert box["r"].status_code == 200 and box["r"].text == "slow"
        assert w.proc.wait(30) == 0 and not any(alive(pid) for pid in workers)
    finally:
        release.set()
        w.kill()
        o.stop()


def test_workers_that_cannot_start_stop_the_edge_with_one_error(tmp_path):
    bad = tmp_path / "bad.mmdb"
    bad.write_text("not a database")
    o = OriginServer("a").start()
    w = Workers(tmp_path, f"pools: {{main: {{origins: [{o.url}]}}}}\nrouting: {{geo: {{database: {bad}}}}}\n",
                ready=False)
    try:
        assert w.proc.wait(60) == 2
        errors = [line for line in w.log().splitlines() if "not a MaxMind DB file" in line]
        assert len(errors) == 1 and errors[0].startswith(f"edge: {w.config}: routing.geo.database:")
        assert "restarting" not in w.log() and "Traceback" not in w.log()
    finally:
        w.kill()
        o.stop()
