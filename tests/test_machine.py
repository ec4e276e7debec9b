"""Workers of one machine behave as one edge (addons/workers): two real `edge run` processes on
ports of their own with the env a supervisor gives its workers (EDGE_WORKER, EDGE_WORKERS,
EDGE_RUNTIME_DIR), a real origin and real clients; and the pure parts beneath, unit by unit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from addons.cache.disk import PurgeLog, SharedMemory, make_store
from addons.cache.store import Entry, Store
from addons.cache.policy import ResponseRules
from addons.config import CacheConfig
from addons.route.health import Health
from addons.shield.bots import Challenge
from addons.workers import checks, runtime, snapshots
from addons.workers.runtime import Runtime, RuntimeEnvError
from tests.conftest import free_port, until, wait_for_port

BIN = Path(sys.executable).parent
HOST = {"Host": "shop.example"}     # one public URL (one cache key), whichever worker's port the client reaches
CURL = {"User-Agent": "curl/8.5.0"}         # an `unknown` client: the bot challenge asks it for a cookie


class Worker:
    """`edge run -c FILE` as worker `index` of `count`, on a client port and an admin port of its own."""

    def __init__(self, tmp_path: Path, run_dir: Path, index: int, count: int, config_text: str) -> None:
        self.port, self.admin_port = free_port(), free_port()
        cfg = tmp_path / f"worker-{index}.yaml"
        cfg.write_text(config_text + f"listen: 127.0.0.1:{self.port}\nadmin: 127.0.0.1:{self.admin_port}\n")
        env = {**os.environ, "EDGE_WORKER": str(index), "EDGE_WORKERS": str(count), "EDGE_RUNTIME_DIR": str(run_dir)}
        self.proc = subprocess.Popen([BIN / "edge", "run", "-c", str(cfg), "--confdir", str(tmp_path / "conf")],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_port(self.port, self.proc)
        wait_for_port(self.admin_port, self.proc)
        self.url, self.admin = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.admin_port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self) -> dict:
        return httpx.get(f"{self.admin}/status").json()

    def metrics(self) -> str:
        return httpx.get(f"{self.admin}/metrics").text

    def kill(self) -> None:
        self.proc.kill()
        self.proc.communicate(timeout=15)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()


@pytest.fixture
def workers(tmp_path):
    """Factory: workers(config text, count=2) -> [Worker], sharing one runtime directory."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    started: list[Worker] = []

    def start(config_text: str, count: int = 2) -> list[Worker]:
        for index in range(count):
            started.append(Worker(tmp_path, run_dir, index, count, config_text))
        return started

    start.run_dir = run_dir
    yield start
    for w in started:
        w.stop()


def fetches(o, path: str) -> int:
    return sum(1 for s in o.seen if s.path == path)


def requests_total(metrics: str, name: str = "edge_requests_total") -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(name + "{"))


# -- purge and invalidation reach every worker ----------------------------------------------------------

@pytest.mark.parametrize("disk", [False, True], ids=["memory", "memory+disk"])
def test_a_purge_in_one_worker_is_gone_in_the_other(origin, workers, tmp_path, disk):
    o = origin("o")
    tier = f", disk: {{path: {tmp_path / 'cache'}, max_size: 4MB}}" if disk else ""
    a, b = workers(f"pools: {{p: {{origins: [{o.url}]}}}}\ncache: {{max_size: 1MB{tier}}}\n")
    for w in (a, b, a, b):
        assert httpx.get(f"{w.url}/cacheable", headers=HOST).status_code == 200
    assert fetches(o, "/cacheable") == (1 if disk else 2)          # the disk tier: a hit in one is a hit in all
    assert httpx.get(f"{b.url}/cacheable", headers=HOST).headers["cache-status"].startswith("edge; hit")
    assert httpx.request("PURGE", f"{a.url}/cacheable", headers=HOST).status_code == 200
    miss = httpx.get(f"{b.url}/cacheable", headers=HOST)            # B's memory dropped it before its lookup
    assert "fwd=uri-miss" in miss.headers["cache-status"]
    assert fetches(o, "/cacheable") == (2 if disk else 3)
    assert httpx.get(f"{b.url}/cacheable", headers=HOST).headers["cache-status"].startswith("edge; hit")
    assert httpx.get(f"{a.url}/cacheable", headers=HOST).status_code == 200
    assert fetches(o, "/cacheable") == (2 if disk else 4)
    assert (workers.run_dir / "purge.log").read_text() == "http://shop.example/cacheable\n"
    if disk:
        assert not (tmp_path / "cache" / "edge-purged.log").exists()      # one log, not two


def test_an_unsafe_request_in_one_worker_invalidates_the_others_memory(origin, workers):
    o = origin("o")
    a, b = workers(f"pools: {{p: {{origins: [{o.url}]}}}}\ncache: {{max_size: 1MB}}\n")
    host = HOST
    for w in (a, b):
        httpx.get(f"{w.url}/cacheable", headers=host)
        assert httpx.get(f"{w.url}/cacheable", headers=host).headers["cache-status"].startswith("edge; hit")
    assert httpx.post(f"{a.url}/cacheable", headers=host, content=b"x").status_code == 200
    before = fetches(o, "/cacheable")
    r = httpx.get(f"{b.url}/cacheable", headers=host)
    assert "fwd=uri-miss" in r.headers["cache-status"] and fetches(o, "/cacheable") == before + 1


# -- /metrics and /status of the whole machine ------------------------------------------------------------

def test_metrics_and_status_of_either_worker_sum_both(origin, workers):
    o = origin("o")
    a, b = workers(f"pools: {{p: {{origins: [{o.url}]}}}}\n")
    for _ in range(3):
        assert httpx.get(f"{a.url}/echo").status_code == 200
    for _ in range(5):
        assert httpx.get(f"{b.url}/echo").status_code == 200
    for w in (a, b):
        until(lambda: requests_total(w.metrics()) == 8, what=f"worker {w.pid} counting 3 + 5")
        page = w.metrics()
        assert requests_total(page, "edge_request_duration_seconds_count") == 8      # histograms summed too
        assert page.count("# TYPE edge_requests_total counter") == 1
        assert 'edge_origin_available{origin="%s",pool="p",worker="0"} 1.0' % o.url in page     # per worker
        status = until(lambda: (s := w.status()) and len(s["workers"]) == 2 and s, what="both workers listed")
        assert {x["pid"] for x in status["workers"]} == {a.pid, b.pid}
        assert [x["index"] for x in status["workers"]] == [0, 1]
        assert all(x["uptime"] >= 0 and x["in_flight"] == 0 and not x["stale"] for x in status["workers"])
    text = subprocess.run([BIN / "edge", "status", "--admin", a.admin], capture_output=True, text=True, timeout=30)
    assert text.returncode == 0 and f"worker 1 (pid {b.pid})" in text.stdout and f"worker 0 (pid {a.pid})" in text.stdout
    b.kill()                # a dead worker: listed no more, but its counts stay in the machine's counters
    status = until(lambda: (s := a.status()) and len(s["workers"]) == 1 and s, what="the dead worker dropped")
    assert status["workers"][0]["pid"] == a.pid
    assert requests_total(a.metrics()) == 8
    assert httpx.get(f"{a.url}/echo").status_code == 200
    assert requests_total(a.metrics()) == 9
    retired = json.loads((workers.run_dir / snapshots.RETIRED).read_text())
    assert len(retired["gone"]) == 1 and not (workers.run_dir / f"worker-{b.pid}.json").exists()


# -- active health checks once per machine ---------------------------------------------------------------

def health_pages(state: dict) -> dict:
    def health(req, o):
        state["probes"] += 1
        return state["status"], [("Content-Type", "text/plain")], b"health\n"
    return {"/health": health, "/": lambda req, o: (200, [("Content-Type", "text/plain")], b"home\n")}


def verdicts(run_dir: Path) -> dict | None:
    try:
        return checks.parse_verdicts((run_dir / checks.VERDICTS).read_bytes())
    except OSError:
        return None


def test_one_worker_checks_for_the_machine_and_another_takes_over(origin, workers):
    state = {"probes": 0, "status": 200}
    o = origin("o", pages=health_pages(state))
    pair = workers(f"pools: {{p: {{origins: [{o.url}], health: {{path: /health, interval: 300ms, timeout: 300ms, "
                   f"rise: 1, fall: 2}}}}}}\n")
    run_dir = workers.run_dir
    first = until(lambda: (v := verdicts(run_dir)) and v["round"] >= 2 and v, what="a first verdict")
    leader = next(w for w in pair if w.pid == first["pid"])
    follower = next(w for w in pair if w is not leader)
    probes, rounds = state["probes"], first["round"]
    later = until(lambda: (v := verdicts(run_dir)) and v["round"] >= rounds + 10 and v, what="ten more rounds")
    assert later["pid"] == leader.pid
    assert later["round"] - rounds - 1 <= state["probes"] - probes <= later["round"] - rounds + 2     # one probe a round
    assert [w["health_checks"] for w in sorted(follower.status()["workers"], key=lambda w: w["pid"] != leader.pid)] \
        == [True, False]

    state["status"] = 503                           # the leader's verdict takes the origin out of the follower too
    until(lambda: follower.status()["pools"]["p"]["origins"][0]["state"].startswith("down"),
               what="the follower marking the origin down")
    seen = len(o.seen)
    r = httpx.get(f"{follower.url}/")
    assert r.status_code == 503 and "no origin" in r.text
    assert all(s.path == "/health" for s in o.seen[seen:])            # nothing but probes reached the origin

    leader.kill()                                   # the kernel frees the lock: the follower leads
    taken = until(lambda: (v := verdicts(run_dir)) and v["pid"] == follower.pid and v, what="the take-over")
    state["status"] = 200
    until(lambda: httpx.get(f"{follower.url}/").status_code == 200, what="the origin back after its check")
    assert verdicts(run_dir)["round"] > taken["round"]


def test_a_stuck_leader_leaves_the_checks_to_the_others(origin, workers):
    state = {"probes": 0, "status": 200}
    o = origin("o", pages=health_pages(state))
    pair = workers(f"pools: {{p: {{origins: [{o.url}], health: {{path: /health, interval: 300ms, timeout: 300ms, "
                   f"rise: 1, fall: 2}}}}}}\n")
    first = until(lambda: (v := verdicts(workers.run_dir)) and v["round"] >= 2 and v, what="a first verdict")
    leader = next(w for w in pair if w.pid == first["pid"])
    follower = next(w for w in pair if w is not leader)
    os.kill(leader.pid, signal.SIGSTOP)             # alive, holding the lock, silent
    try:
        stopped = until(lambda: (v := verdicts(workers.run_dir)) and v, what="the last verdict")
        state["status"] = 503
        until(lambda: follower.status()["pools"]["p"]["origins"][0]["state"].startswith("down"),
                   what="the follower's own checks once the verdicts are stale")
        assert verdicts(workers.run_dir)["round"] <= stopped["round"] + 1     # nobody else wrote them
        assert httpx.get(f"{follower.url}/").status_code == 503
    finally:
        os.kill(leader.pid, signal.SIGCONT)
    resumed = until(lambda: (v := verdicts(workers.run_dir)) and v["round"] > stopped["round"] + 1 and v,
                         what="the leader writing again")
    assert resumed["pid"] == leader.pid
    state["status"] = 200
    until(lambda: httpx.get(f"{follower.url}/").status_code == 200, what="the origin back")


# -- the challenge key --------------------------------------------------------------------------------------

def test_a_challenge_cookie_from_one_worker_is_accepted_by_the_other(origin, workers):
    o = origin("o")
    a, b = workers(f"pools: {{p: {{origins: [{o.url}]}}}}\nshield:\n  bots: {{challenge: true}}\n")
    first = httpx.get(f"{a.url}/echo", headers=CURL)
    assert first.status_code == 403 and Challenge.COOKIE in first.cookies
    cookie = {"Cookie": f"{Challenge.COOKIE}={first.cookies[Challenge.COOKIE]}"}
    assert httpx.get(f"{b.url}/echo", headers=CURL).status_code == 403      # without it: challenged there too
    passed = httpx.get(f"{b.url}/echo", headers={**CURL, **cookie})
    assert passed.status_code == 200 and Challenge.COOKIE not in passed.json()["headers"].get("cookie", "")
    real = first.cookies[Challenge.COOKIE]
    forged = {"Cookie": f"{Challenge.COOKIE}={real[:-1]}{'1' if real[-1] == '0' else '0'}"}   # one digit changed
    assert httpx.get(f"{b.url}/echo", headers={**CURL, **forged}).status_code == 403
    key = workers.run_dir / "bots.secret"
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == runtime.SECRET_BYTES


def test_a_bad_worker_environment_is_a_clear_error_at_start(tmp_path):
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"pools: {{p: {{origins: [http://127.0.0.1:1]}}}}\nlisten: 127.0.0.1:{free_port()}\n")
    env = {**os.environ, "EDGE_WORKER": "2", "EDGE_WORKERS": "2", "EDGE_RUNTIME_DIR": str(tmp_path)}
    r = subprocess.run([BIN / "edge", "run", "-c", str(cfg), "--confdir", str(tmp_path / "conf")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "EDGE_WORKER=2 EDGE_WORKERS=2" in r.stderr and "Traceback" not in r.stderr


# -- the pure parts -----------------------------------------------------------------------------------------

def test_the_runtime_from_the_environment(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    env = {"EDGE_WORKER": "1", "EDGE_WORKERS": "3", "EDGE_RUNTIME_DIR": str(folder)}
    assert runtime.current({}) is None
    assert runtime.current(env) == Runtime(1, 3, str(folder))
    for bad, words in ((dict(env, EDGE_WORKER="3"), "expected 0 <= EDGE_WORKER < EDGE_WORKERS"),
                       (dict(env, EDGE_WORKER="-1"), "EDGE_WORKER=-1: expected a whole number"),
                       (dict(env, EDGE_WORKERS="٣"), "expected a whole number"),
                       (dict(env, EDGE_WORKERS="0", EDGE_WORKER="0"), "expected 0 <= EDGE_WORKER"),
                       ({"EDGE_WORKER": "0"}, "EDGE_WORKERS, EDGE_RUNTIME_DIR not set"),
                       (dict(env, EDGE_RUNTIME_DIR=str(folder / "none")), "No such file"),
                       (dict(env, EDGE_RUNTIME_DIR=str(tmp_path / "f")), "Not a directory")):
        (tmp_path / "f").write_text("")
        with pytest.raises(RuntimeEnvError, match=words):
            runtime.current(bad)
    folder.chmod(0o770)
    with pytest.raises(RuntimeEnvError, match="chmod 700"):
        runtime.current(env)


def test_the_shared_key_is_made_once(tmp_path):
    one, two = Runtime(0, 2, str(tmp_path)), Runtime(1, 2, str(tmp_path))
    key = one.secret()
    assert two.secret() == key == one.secret() and len(key) == 32
    assert (tmp_path / "bots.secret").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["bots.secret"]        # no temporary file left
    (tmp_path / "bots.secret").write_bytes(b"short")
    with pytest.raises(RuntimeEnvError, match="delete it"):
        two.secret()


def entry(body: bytes = b"x") -> Entry:
    now = time.time()
    return Entry(200, b"OK", ((b"Cache-Control", b"max-age=60"),), {"cache-control": "max-age=60"}, body, now, now,
                 ResponseRules({"max-age": "60"}, False), 60.0, ())


def test_memory_tiers_sharing_a_purge_log(tmp_path):
    path = str(tmp_path / "purge.log")
    here, there = (SharedMemory(Store(2**20), PurgeLog(path)) for _ in range(2))
    for store in (here, there):
        store.put("k1", entry())
        store.put("k2", entry())
    assert here.remove("k1")
    assert there.lookup("k1", {}) == (None, False) and there.lookup("k2", {})[0] is not None
    there.clear()
    assert here.lookup("k2", {}) == (None, False)
    assert isinstance(make_store(CacheConfig(), path), SharedMemory) and isinstance(make_store(CacheConfig()), Store)
    assert type(make_store(CacheConfig(enabled=False), path)) is Store


def test_the_cache_tells_its_listeners_and_forgets_quietly(origin, edge):
    o = origin("o")
    e = edge([o.url])
    cache = e.master.addons.get("edge").cache
    heard: list[str] = []
    cache.removal_listeners.append(heard.append)
    cache.removal_listeners.append(lambda key: 1 / 0)       # a failing listener fails nobody's purge
    httpx.get(f"{e.url}/cacheable")
    key = f"{e.url}/cacheable"
    assert httpx.request("PURGE", key).status_code == 200 and heard == [key]
    httpx.get(f"{e.url}/cacheable")
    cache.forget(key)
    assert heard == [key] and cache.store.lookup(key, {}) == (None, False)
    assert httpx.post(f"{e.url}/cacheable", content=b"x").status_code == 200 and heard == [key, key]
    assert e.master.commands.call("edge.purge", "*") == "purged 0 URLs" and heard[-1] == "*"
    httpx.get(f"{e.url}/cacheable")
    assert cache.store.bytes > 0 and fetches(o, "/cacheable") == 4       # GET, GET, POST, GET
    cache.forget("*")
    assert cache.store.bytes == 0 and heard[-1] == "*" and len(heard) == 3


def family(name: str, kind: str, *samples) -> dict:
    return {"name": name, "type": kind, "help": name, "samples": [list(s) for s in samples]}


def record(pid: int, index: int, at: float, requests: float, available: float = 1.0, memory: float = 10.0,
           run: int = 1, started: float = 0.0) -> dict:
    return {"pid": pid, "index": index, "run": run, "started": started, "at": at, "in_flight": 1, "connections": 2,
            "health_checks": index == 0,
            "status": {"pools": {"p": {"origins": [{"url": "http://o", "in_flight": 1}]}}, "shield": {"bots": 1},
                       "sites": {"s": {"requests": 2}}, "misdirected": 1, "route_rate_refusals": 0},
            "metrics": [family("edge_requests", "counter", ("edge_requests_total", {"status": "2xx"}, requests)),
                        family("edge_d", "histogram", ("edge_d_bucket", {"le": "+Inf"}, requests),
                               ("edge_d_count", {}, requests)),
                        family("edge_origin_available", "gauge", ("edge_origin_available", {"origin": "o"}, available)),
                        family("edge_cache_tier_bytes", "gauge", ("edge_cache_tier_bytes", {"tier": "memory"}, memory),
                               ("edge_cache_tier_bytes", {"tier": "disk"}, 100.0)),
                        family("edge_cache_bytes", "gauge", ("edge_cache_bytes", {}, memory + 100.0))]}


def samples(families: list[dict]) -> dict:
    return {(s[0], tuple(sorted(s[1].items()))): s[2] for f in families for s in f["samples"]}


def test_the_machine_sums_counters_and_gauges_by_their_meaning():
    now = 1000.0
    merged = samples(snapshots.merge_metrics([record(1, 0, now, 3), record(2, 1, now - 1, 5, available=0, memory=20)],
                                             [family("edge_requests", "counter",
                                                     ("edge_requests_total", {"status": "2xx"}, 7))], now))
    assert merged[("edge_requests_total", (("status", "2xx"),))] == 15               # 3 + 5 + 7 retired
    assert merged[("edge_d_bucket", (("le", "+Inf"),))] == 8 and merged[("edge_d_count", ())] == 8
    assert merged[("edge_origin_available", (("origin", "o"), ("worker", "0")))] == 1
    assert merged[("edge_origin_available", (("origin", "o"), ("worker", "1")))] == 0
    assert merged[("edge_cache_tier_bytes", (("tier", "memory"),))] == 30             # each worker's memory
    assert merged[("edge_cache_tier_bytes", (("tier", "disk"),))] == 100              # one shared directory
    assert merged[("edge_cache_bytes", ())] == 130
    stuck = samples(snapshots.merge_metrics([record(1, 0, now, 3), record(2, 1, now - 60, 5)], [], now))
    assert stuck[("edge_requests_total", (("status", "2xx"),))] == 8                  # its counts are real
    assert ("edge_origin_available", (("origin", "o"), ("worker", "1"))) not in stuck      # its gauges are not
    status = snapshots.merge_status(record(1, 0, now, 3), [record(2, 1, now - 60, 5)],
                                    {"shield": {"bots": 4}, "sites": {"s": 1}, "misdirected": 0,
                                     "route_rate_refusals": 0}, now)
    assert status["shield"] == {"bots": 6} and status["sites"]["s"]["requests"] == 5 and status["misdirected"] == 2
    assert status["pools"]["p"]["origins"][0]["in_flight"] == 1                       # the stuck one's not counted
    assert [(w["pid"], w["stale"]) for w in status["workers"]] == [(1, False), (2, True)]
    clustered = [record(1, 0, now, 3), record(2, 1, now - 60, 5)]       # each worker has its own Redis link
    for r, (sent, pending) in zip(clustered, ((2, 1), (3, 4))):
        r["status"]["cluster"] = {"node": "x", "purges": {"sent": sent, "applied": 10, "pending": pending,
                                                           "resyncs": 0, "emptied": 1}}
    status = snapshots.merge_status(clustered[0], clustered[1:], {"purges": {"sent": 7, "applied": 1}}, now)
    assert status["cluster"]["purges"] == {"sent": 12, "applied": 21, "resyncs": 0, "emptied": 2, "pending": 1}


def test_a_dead_worker_is_retired_once_and_another_runs_is_dropped(tmp_path):
    folder, now = str(tmp_path), 1000.0
    own = record(1, 0, now, 3)
    for r in (record(2, 1, now, 5), record(3, 1, now, 11), record(4, 1, now, 100, run=2)):
        snapshots.write_snapshot(folder, r)
    alive = {1, 2}.__contains__
    others, retired = snapshots.gather(folder, own, now, alive)
    assert [r["pid"] for r in others] == [2]
    assert samples(retired["metrics"])[("edge_requests_total", (("status", "2xx"),))] == 11    # pid 3's, once
    assert retired["status"]["shield"] == {"bots": 1} and retired["gone"] == ["3@0.0"]
    assert sorted(os.listdir(folder)) == sorted(["worker-2.json", "retired.json", snapshots.LOCK])
    snapshots.write_snapshot(folder, record(3, 1, now, 12))        # a late snapshot of the retired worker
    others, again = snapshots.gather(folder, own, now, alive)
    assert again["metrics"] == retired["metrics"] and not os.path.exists(snapshots.snapshot_path(folder, 3))
    snapshots.write_snapshot(folder, record(1, 0, now, 50, started=-5.0))    # its pid's previous process
    _, third = snapshots.gather(folder, own, now, alive)
    assert samples(third["metrics"])[("edge_requests_total", (("status", "2xx"),))] == 61
    _, other_run = snapshots.gather(folder, record(1, 0, now, 3, run=9), now, alive)
    assert other_run["metrics"] == [] and other_run["run"] == 9


def test_a_reader_does_not_wait_for_a_stuck_lock_holder(tmp_path):
    import fcntl
    folder, now = str(tmp_path), 1000.0
    snapshots.write_snapshot(folder, record(3, 1, now, 11))
    holder = os.open(os.path.join(folder, snapshots.LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        others, retired = snapshots.gather(folder, record(1, 0, now, 3), now, {1}.__contains__)
    finally:
        os.close(holder)
    assert [r["pid"] for r in others] == [3] and retired["gone"] == []       # counted, retired later
    assert os.path.exists(snapshots.snapshot_path(folder, 3))
    others, retired = snapshots.gather(folder, record(1, 0, now, 3), now, {1}.__contains__)
    assert others == [] and retired["gone"] == ["3@0.0"]


def test_who_checks_and_what_a_follower_adopts(tmp_path):
    now = 100.0
    assert checks.checks_here(True, {"at": 0.0}, now, 5.0)
    assert checks.checks_here(False, None, now, 5.0)
    assert not checks.checks_here(False, {"at": 96.0}, now, 5.0)
    assert checks.checks_here(False, {"at": 94.0}, now, 5.0)              # the leader is stuck
    assert checks.stale_after(0.3, 0.3) == 5.0 and checks.stale_after(10, 2) == 36
    assert checks.to_adopt({"pid": 1, "round": 2}, (1, 1)) and not checks.to_adopt({"pid": 1, "round": 2}, (1, 2))
    assert checks.parse_verdicts(b'{"pid": 1, "round": 1, "at": 2, "origins": {"h:1": {"up": true}}}') is None
    assert checks.parse_verdicts(b'{"pid": 1, "round"') is None
    rt = Runtime(0, 2, str(tmp_path))
    one, two = checks.SharedChecks(rt), checks.SharedChecks(rt)
    assert one.lead() and not two.lead() and one.lead()
    one.publish({"h:1": {"up": False, "passed": False, "why": "health check answered 503"}}, now)
    assert two.read() == {"pid": os.getpid(), "round": 1, "at": now,
                          "origins": {"h:1": {"up": False, "passed": False, "why": "health check answered 503"}}}
    one.close()
    assert two.lead()
    two.close()


def test_a_follower_adopts_the_leaders_verdict():
    h = Health(rise=2, fall=2)
    h.ejected_until, h.unreachable_until = 50.0, 50.0
    assert not h.adopt(True, True, "health check answered 200", 10.0)
    assert h.available(10.0) and h.last_ok == 10.0          # a passing check lifts this worker's marks
    assert h.adopt(False, False, "health check answered 503", 11.0)
    assert not h.available(11.0) and h.describe(11.0) == "down (health check answered 503)"
    assert not h.adopt(False, True, "health check answered 200", 12.0)     # the leader's rise count decides
    assert not h.up and h.successes == 0
    assert h.adopt(True, True, "health check answered 200", 13.0) and h.up and h.back_at == 13.0
