"""The parts of issue 13 together: the tiered cache sharding over the members a real
redis-server lists (no static peers), nodes on 127.0.0.1, 127.0.0.2 and 127.0.0.3 on one
port each, a node of two workers beside a single process (one member, not two; a purge on one
reaches both workers of the other). Every node is an `edge run` process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from addons.cluster.tier import Peer, owner
from tests.conftest import free_port
from tests.rawnet import RecordingOrigin
from tests.test_cluster import BIN, until
from tests.test_tiered import HOST, cacheable, paths_of


def accepting(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.2).close()
        return True
    except OSError:
        return False


class Node:
    """`edge run -c` of one node: client listener on host:port, admin on 127.0.0.1."""

    def __init__(self, tmp_path: Path, name: str, host: str, port: int, text: str, *args: str,
                 env: dict | None = None) -> None:
        self.name, self.host, self.port, self.admin = name, host, port, free_port()
        self.cfg = tmp_path / f"{name}.yaml"
        self.cfg.write_text(text + f"listen: {host}:{port}\nadmin: 127.0.0.1:{self.admin}\n")
        self.log = tmp_path / f"{name}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([BIN / "edge", "run", "-c", str(self.cfg), "--confdir", str(tmp_path / "conf"),
                                          *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **(env or {})})
        self.url = f"http://{host}:{port}"

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited: {self.log.read_text()}")
        return accepting(self.host, self.port) and accepting("127.0.0.1", self.admin)

    def status(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.admin}/status", timeout=5).json()

    def members(self) -> list[str]:
        return [m["name"] for m in self.status().get("cluster", {}).get("members", [])]

    def kill(self) -> None:
        """The whole node at once (its supervisor and workers: one process group)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(20)


def node_text(origin: RecordingOrigin, redis_url: str, name: str, extra: str = "") -> str:
    return (f"pools: {{main: {{origins: ['{origin.url}']}}}}\n{extra}"
            f"cluster:\n  node: {name}\n  redis: {redis_url}\n  ttl: 2s\n  tiered: true\n")


@pytest.fixture
def nodes(tmp_path):
    started: list[Node] = []

    def start(*args, **kw) -> Node:
        node = Node(tmp_path, *args, **kw)
        started.append(node)
        return node

    yield start
    for node in started:
        node.kill()


def all_see(nodes: list[Node], names: list[str], timeout: float = 30.0) -> None:
    until(lambda: all(n.ready() for n in nodes), timeout, "nodes listening")
    until(lambda: all(sorted(n.members()) == sorted(names) for n in nodes), timeout, f"every node lists {names}")


def ask(node: Node, paths: list[str]) -> None:
    with httpx.Client(base_url=node.url, headers={"Host": HOST}, timeout=20) as c:
        for path in paths:
            r = c.get(path)
            assert r.status_code == 200 and r.text == path, (node.name, path, r.status_code, r.text[:200])


def test_three_nodes_on_redis_membership_fetch_each_object_once_and_survive_a_dead_owner(nodes, redis_url):
    origin = RecordingOrigin(cacheable)
    port = free_port()          # one port on three loopback addresses: mitmproxy's loop guard must not bite
    a, b, c = (nodes(name, f"127.0.0.{i}", port, node_text(origin, redis_url, name))
               for i, name in enumerate("abc", 1))
    all_see([a, b, c], ["a", "b", "c"])
    paths = [f"/object/{i}" for i in range(20)]
    for node in (a, b, c):
        ask(node, paths)
    assert Counter(paths_of(origin)) == Counter({p: 1 for p in paths})
    assert b"edge-peer" not in origin.received.lower()
    ring = [Peer(n, "h", 1) for n in "abc"]
    assert {owner(f"http://{HOST}{p}", ring).name for p in paths} == {"a", "b", "c"}    # each node owned some

    a.kill()        # the node on 127.0.0.1: its keys fall back to the origin, then move
    before = len(origin.requests)
    late = [f"/late/{i}" for i in range(20)]
    ask(b, late)
    ask(c, late)        # b and c may still both fetch what a owned (a is down for each of them)
    owned_by_a = [p for p in late if owner(f"http://{HOST}{p}", ring).name == "a"]
    seen = Counter(paths_of(origin)[before:])
    assert owned_by_a and all(seen[p] == 1 for p in late if p not in owned_by_a)
    assert all(seen[p] in (1, 2) for p in owned_by_a)      # 2: each asked the dead a before its record expired
    until(lambda: b.members() == ["b", "c"] and c.members() == ["c", "b"], 10, "a's membership expired")
    before = len(origin.requests)
    moved = [f"/moved/{i}" for i in range(20)]
    ask(b, moved)
    ask(c, moved)
    assert Counter(paths_of(origin)[before:]) == Counter({p: 1 for p in moved})     # one ring of two on both
    origin.stop()


# -- a node of two workers beside a single process ----------------------------------------------------------

def worker(tmp_path: Path, run_dir: Path, index: int, text: str) -> Node:
    """Worker `index` of two of node x, as the supervisor starts it (its environment), on a port of
    its own so that the test reaches each one."""
    env = {"EDGE_WORKER": str(index), "EDGE_WORKERS": "2", "EDGE_RUNTIME_DIR": str(run_dir)}
    return Node(tmp_path, f"x{index}", "127.0.0.1", free_port(), text, env=env)


def test_a_node_of_two_workers_is_one_member_and_a_purge_reaches_both_workers(tmp_path, redis_url, origin):
    o = origin("o", pages={"/page": lambda req, o: (200, [("Cache-Control", "max-age=600")], b"page")})
    text = lambda name: (f"pools: {{main: {{origins: [{o.url}]}}}}\ncache: {{default_ttl: 60s}}\n"
                         f"cluster:\n  node: {name}\n  redis: {redis_url}\n  ttl: 2s\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    started = []
    try:
        started += [worker(tmp_path, run_dir, 0, text("x")), worker(tmp_path, run_dir, 1, text("x")),
                    Node(tmp_path, "y", "127.0.0.1", free_port(), text("y"))]
        x0, x1, y = started
        all_see(started, ["x", "y"])        # two names, not three: the workers of x are one member
        listed = {m["name"]: m for m in y.status()["cluster"]["members"]}
        assert listed["x"]["processes"] == 2 and listed["y"]["processes"] == 1
        assert all(not n.status()["cluster"]["collisions"] for n in started)     # one runtime dir: one identity
        printed = subprocess.run([BIN / "edge", "status", "--cluster", "--admin", f"http://127.0.0.1:{y.admin}"],
                                 capture_output=True, text=True, timeout=30).stdout
        assert "  x 127.0.0.1:" in printed and "(2 processes): last beat" in printed, printed
        assert "  y 127.0.0.1:" in printed and printed.count("\n  ") == 2, printed

        for node in (x0, x1, y):
            assert httpx.get(node.url + "/page", headers={"Host": HOST}).status_code == 200
        assert sum(1 for s in o.seen if s.path == "/page") == 3       # a memory tier each
        hit = lambda node: httpx.get(node.url + "/page", headers={"Host": HOST}).headers["cache-status"]
        assert all(hit(n).startswith("edge; hit") for n in (x0, x1, y))

        assert httpx.request("PURGE", y.url + "/page", headers={"Host": HOST}).status_code == 200
        key = f"http://{HOST}/page"
        until(lambda: (run_dir / "purge.log").read_text().count(key + "\n") == 2, 10,
              "both workers of x applied y's purge")        # each forgets it, disk included: one line each
        for node in (x0, x1):
            assert "fwd=uri-miss" in hit(node)              # gone from both workers' memory
        assert sum(1 for s in o.seen if s.path == "/page") == 5
        # either worker of x answers for the machine: both applied it (summed once their snapshots are out)
        parts = until(lambda: (p := [n.status()["cluster"]["purges"] for n in started])
                      and [q["applied"] for q in p] == [2, 2, 0] and p, 10, "the machine's purge counts")
        assert [p["sent"] for p in parts] == [0, 0, 1]
        import redis
        stream = redis.Redis.from_url(redis_url).xrange("edge:{edge}:purges")
        assert [e[1][b"key"].decode() for e in stream if e[1][b"key"]] == [key]    # announced once, by y only
    finally:
        for node in started:
            node.kill()


def test_the_supervisors_pipe_is_read_with_the_rest_of_the_worker_environment(tmp_path):
    from addons.workers import runtime
    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    env = {"EDGE_WORKER": "0", "EDGE_WORKERS": "2", "EDGE_RUNTIME_DIR": str(folder)}
    assert runtime.current(env).supervisor_fd is None                  # a worker started by hand
    assert runtime.current({**env, "EDGE_SUPERVISOR_FD": "7"}) == runtime.Runtime(0, 2, str(folder), 7)
    with pytest.raises(runtime.RuntimeEnvError, match="EDGE_SUPERVISOR_FD=x: expected a whole number"):
        runtime.current({**env, "EDGE_SUPERVISOR_FD": "x"})
    assert runtime.current() is None and not runtime.shares_listeners()     # this test process: no worker


# -- rate limits under workers -------------------------------------------------------------------------------

def test_how_a_memory_rate_limit_holds_under_workers():
    from addons.shield.limits import worker_limits
    assert worker_limits("memory", 1, "a", "redis://r:6379/0") is None              # one process: as always
    assert worker_limits("redis://s:6379/0", 4, "a", None) is None                  # already shared
    shared = worker_limits("memory", 4, "a", "redis://:pw@r:6379/0")
    assert shared.store == "redis://:pw@r:6379/0" and shared.prefix == "edge:rl:node:a:"
    assert "one limit for the 4 workers" in shared.note and "pw" not in shared.note
    alone = worker_limits("memory", 4, "a", "redis+sentinel://s:26379/m")          # its client takes no sentinel
    assert alone.store == "memory" and "counted in each of the 4 workers" in alone.note
    assert worker_limits("memory", 2, None, None).note == alone.note.replace("4", "2")


@pytest.mark.parametrize("shared", [True, False], ids=["cluster-redis", "no-redis"])
def test_a_client_spreading_over_two_workers_gets_the_nodes_limit_once_with_redis(tmp_path, redis_url, origin,
                                                                                  shared):
    o = origin("o")
    text = (f"pools: {{main: {{origins: [{o.url}]}}}}\nshield: {{rate_limit: {{rate: 1/m, burst: 3}}}}\n"
            + (f"cluster: {{node: x, redis: '{redis_url}'}}\n" if shared else ""))
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    started = []
    try:
        started += [worker(tmp_path, run_dir, 0, text), worker(tmp_path, run_dir, 1, text)]
        until(lambda: all(n.ready() for n in started), 30, "workers listening")
        codes = [httpx.get(started[i % 2].url + "/", headers={"Host": HOST}).status_code for i in range(8)]
        assert sorted(codes) == ([200] * 3 + [429] * 5 if shared else [200] * 6 + [429] * 2), codes
        said = started[0].log.read_text()
        assert ("one limit for the 2 workers" if shared else "counted in each of the 2 workers") in said, said
        assert "shield.rate_limit" not in started[1].log.read_text()     # worker 0 says it, not every worker
        import redis
        keys = redis.Redis.from_url(redis_url).keys("edge:rl:*")
        assert keys == ([b"edge:rl:node:x:127.0.0.1"] if shared else []), keys   # this node's own keys
    finally:
        for node in started:
            node.kill()
