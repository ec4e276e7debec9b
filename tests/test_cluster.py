"""Many machines as one edge (addons/cluster): the `cluster:` section, the pure parts
(membership, the purge outbox, the resync plan, Redis URLs), and real nodes on a real
redis-server: node A is an edge in this process, node B (and C) `edge run -c` processes, each
with its own origin, so that what each node fetched again is counted where it happened."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from addons.cluster import fanout
from addons.cluster.fanout import Link, Outbox, resync_plan, stream_id
from addons.cluster.members import Member, View, collisions, expiry, format_cluster, live
from addons.cluster.urls import parse_redis_url, redacted
from addons.config import ConfigError, parse_config
from addons.shield.bots import Challenge
from tests.conftest import free_port, until, wait_for_port

BIN = Path(__file__).resolve().parent.parent / ".venv" / "bin"
HOST = {"Host": "shop.example"}
BASE = "pools: {main: {origins: [http://127.0.0.1:9]}}\n"


def cluster_config(text: str) -> object:
    return parse_config(BASE + text, "edge.yaml")


# -- the config section -----------------------------------------------------------------------------

def test_the_cluster_section_and_its_defaults(tmp_path):
    c = cluster_config("cluster:\n  redis: redis://127.0.0.1:6379/0\n").cluster
    assert c.node and c.redis == "redis://127.0.0.1:6379/0" and c.advertise is None
    assert c.ttl == 10.0 and c.secret_file is None and c.tiered is False
    key = tmp_path / "peer.key"
    key.write_bytes(b"0123456789abcdef0123\n")
    c = cluster_config(f"cluster:\n  node: edge-a\n  redis: redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/main\n"
                       f"  advertise: 127.0.0.2:8080\n  ttl: 3s\n  secret_file: {key}\n  tiered: true\n").cluster
    assert (c.node, c.advertise, c.ttl, c.secret_file, c.tiered) == ("edge-a", ("127.0.0.2", 8080), 3.0, str(key), True)
    assert parse_config(BASE).cluster is None


@pytest.mark.parametrize("body, where, problem", [
    ("  node: edge-a\n", "edge.yaml:2: cluster", "needs redis"),
    ("  redis: http://127.0.0.1:6379\n", "edge.yaml:3: cluster.redis", "unknown scheme"),
    ("  redis: redis://127.0.0.1:6379/x\n", "edge.yaml:3: cluster.redis", "database must be a number"),
    ("  redis: redis+sentinel://127.0.0.1:26379\n", "edge.yaml:3: cluster.redis", "MASTER"),
    ("  redis: redis://r\n  node: 'a b'\n", "edge.yaml:4: cluster.node", "letters, digits"),
    ("  redis: redis://r\n  ttl: 500ms\n", "edge.yaml:4: cluster.ttl", "at least 1s"),
    ("  redis: redis://r\n  ttl: soon\n", "edge.yaml:4: cluster.ttl", "duration"),
    ("  redis: redis://r\n  advertise: 0.0.0.0:8080\n", "edge.yaml:4: cluster.advertise", "wildcard"),
    ("  redis: redis://r\n  advertise: nowhere\n", "edge.yaml:4: cluster.advertise", "HOST:PORT"),
    ("  redis: redis://r\n  tiered: yes please\n", "edge.yaml:4: cluster.tiered", "true or false"),
    ("  redis: redis://r\n  secret_file: /nonexistent/key\n", "edge.yaml:4: cluster.secret_file", "cannot read"),
    ("  redis: redis://r\n  shards: 3\n", "edge.yaml:4: cluster.shards", "unknown key"),
])
def test_cluster_config_errors_name_file_line_and_key(body, where, problem):
    with pytest.raises(ConfigError) as e:
        cluster_config("cluster:\n" + body)
    assert str(e.value).startswith(where) and problem in str(e.value)


def test_redis_url_forms():
    assert parse_redis_url("redis://127.0.0.1:6379/2").db == 2
    assert parse_redis_url("rediss://u:p@redis.example:6380/0").tls
    assert parse_redis_url("unix:///run/redis.sock").kind == "server"
    s = parse_redis_url("redis+sentinel://:secret@10.0.0.1:26379,[::1]:26380/mymaster/3")
    assert (s.kind, s.hosts, s.master, s.db, s.password) == ("sentinel", (("10.0.0.1", 26379), ("::1", 26380)),
                                                              "mymaster", 3, "secret")
    c = parse_redis_url("redis+cluster://10.0.0.1:7000,10.0.0.2:7000")
    assert c.kind == "cluster" and c.hosts == (("10.0.0.1", 7000), ("10.0.0.2", 7000))
    for bad in ("", "127.0.0.1:6379", "memcached://x:1", "redis+sentinel://h:0/m", "redis+cluster://h:1/0"):
        with pytest.raises(ValueError):
            parse_redis_url(bad)
    assert redacted("redis://user:hunter2@h:1/0") == "redis://user:***@h:1/0"
    assert "hunter2" not in redacted("redis+sentinel://:hunter2@h:1/m")


# -- pure parts ---------------------------------------------------------------------------------------

def test_live_members_age_out_and_this_node_is_always_there():
    me = Member("a", "127.0.0.2", 8080, identity="ha")
    b, c = Member("b", "127.0.0.3", 8080, beat=100.0, identity="hb"), Member("c", "h", 1, beat=95.0, identity="hc")
    older_b = Member("b", "10.9.9.9", 1, beat=90.0, identity="hb-old")
    view = View((me, b, c, older_b), redis_time=101.0, read_at=50.0)
    assert [m.name for m in live(me, view, 10.0, 50.0)] == ["a", "b", "c"]
    assert live(me, view, 10.0, 50.0)[1].host == "127.0.0.3"             # the freshest record of a name
    assert [m.name for m in live(me, view, 10.0, 55.0)] == ["a", "b"]      # c's beat is 11 s old now
    assert expiry(me, view, 10.0) == 50.0 + 10.0 - 6.0                     # c expires first
    assert live(me, view, 10.0, 70.0) == [me]                              # Redis unreachable: only self
    assert live(me, View(), 10.0, 0.0) == [me]


def test_a_name_collision_is_another_identity_alive_since_this_node_started():
    me = Member("a", "h", 1, identity="host1:100")
    twin = Member("a", "h2", 1, beat=20.0, identity="host2:7")
    predecessor = Member("a", "h", 1, beat=5.0, identity="host1:99")      # killed, then this one started
    other_worker = Member("a", "h", 1, beat=20.0, identity="host1:100", worker=1)
    assert collisions(me, [twin, predecessor, other_worker, Member("b", "h", 1, beat=30.0)], since=10.0) == [twin]
    assert Member.from_record(twin.record()) == Member("a", "h2", 1, identity="host2:7")
    assert Member.from_record("{not json") is None and Member.from_record('{"name": "x"}') is None


def test_the_outbox_keeps_order_and_collapses_when_full():
    box = Outbox(limit=3)
    for key in ("k1", "k2", "k2", "k3"):
        box.add(key)
    assert [k for _, k in box.items] == ["k1", "k2", "k3"]
    number, key = box.first()
    box.add("k4")                                  # full: one `*` stands for them all
    assert [k for _, k in box.items] == ["*"]
    box.sent(number)                               # k1 was sent meanwhile: the `*` stays
    assert len(box) == 1
    box.sent(box.first()[0])
    assert len(box) == 0


def test_resync_plan_and_stream_ids():
    assert resync_plan("5-1", still_there=True, missed_since_start=False) == "read"
    assert resync_plan("5-1", still_there=False, missed_since_start=False) == "empty"
    assert resync_plan(None, still_there=False, missed_since_start=False) == "start"
    assert resync_plan(None, still_there=False, missed_since_start=True) == "empty"
    assert stream_id("1700000000000-2") > stream_id(b"1700000000000-1") > stream_id("999-9")


def test_one_log_line_an_outage(caplog):
    link = Link("redis://r")
    with caplog.at_level("WARNING", logger="edge"):
        assert link.failed(ConnectionError("refused"), 10.0)
        assert not any(link.failed(ConnectionError("refused"), 10.0 + i) for i in range(100))
        assert link.down_for(15.0) == 5.0
        assert link.up(20.0) and not link.up(21.0)
        assert not link.failed(ConnectionError("closed by server"), 22.0)     # a left-over connection
        assert not link.up(22.5) and link.down_since is None
        assert link.failed(ConnectionError("refused"), 40.0, "heartbeat")     # a new outage
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and "unreachable" in lines[0] and "again after 10.0 s" in lines[1]
    assert "(heartbeat: ConnectionError: refused)" in lines[2]


def test_format_cluster():
    text = format_cluster({"node": "a", "redis": "redis://r", "connected": True, "down_for": 0,
                           "members": [{"name": "a", "address": "h:1", "version": "0.1", "self": True},
                                       {"name": "b", "address": "h:2", "version": "0.1", "self": False,
                                        "last_beat_age": 1.25}],
                           "collisions": [], "purges": dict.fromkeys(("sent", "applied", "pending", "resyncs",
                                                                       "emptied"), 0)})
    assert "cluster node a, redis redis://r: connected" in text and "b h:2 0.1: last beat 1.2 s ago" in text


# -- real nodes on a real redis-server --------------------------------------------------------------

def pages(name: str) -> dict:
    page = lambda req, o: (200, [("Cache-Control", "max-age=600"), ("Content-Type", "text/plain")],
                           f"{req.path} from {name}, fetch {sum(1 for s in o.seen if s.path == req.path)}".encode())
    return {"/page": page, "/other": page, "/echo": lambda req, o: (200, [], b"echo")}


def node_yaml(o, redis_url: str, name: str, extra: str = "", ttl: str = "2s") -> str:
    return (f"pools: {{main: {{origins: [{o.url}]}}}}\ncache: {{default_ttl: 60s}}\n{extra}"
            f"cluster:\n  node: {name}\n  redis: {redis_url}\n  ttl: {ttl}\n")


class Node:
    """A node as `edge run -c FILE`: its own process, client port and admin port."""

    def __init__(self, tmp_path: Path, text: str, host: str = "127.0.0.1") -> None:
        self.port, self.admin = free_port(), free_port()
        self.cfg = tmp_path / f"node-{self.port}.yaml"
        self.cfg.write_text(text + f"listen: {host}:{self.port}\nadmin: 127.0.0.1:{self.admin}\n")
        self.log = tmp_path / f"node-{self.port}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([BIN / "edge", "run", "-c", str(self.cfg), "--confdir",
                                          str(tmp_path / "conf")], stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.proc)
        wait_for_port(self.admin, self.proc)
        self.url = f"http://{host}:{self.port}"

    def status(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.admin}/status", timeout=5).json()

    def stop(self, sig=signal.SIGINT) -> str:
        """Its log (what it printed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(20)
        return self.log.read_text()


@pytest.fixture
def nodes(tmp_path):
    started: list[Node] = []

    def start(text: str, **kw) -> Node:
        node = Node(tmp_path, text, **kw)
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop(signal.SIGKILL)


class Relay:
    """A TCP relay in front of redis-server: a node connected through it can be cut off (its
    connections closed, the port refusing) and let back, while Redis and the other nodes go on."""

    def __init__(self, target: int) -> None:
        self.target, self.port = target, free_port()
        self.conns: list[socket.socket] = []
        self.server: socket.socket | None = None
        self.restore()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def restore(self) -> None:
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", self.port))
        self.server.listen(16)
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def cut(self) -> None:
        try:
            self.server.shutdown(socket.SHUT_RDWR)      # wakes the accept() (close alone does not)
        except OSError:
            pass
        self.server.close()
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.conns.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def fetches(o, path: str) -> int:
    return sum(1 for s in o.seen if s.path == path)


def get(url: str, path: str, **kw) -> httpx.Response:
    return httpx.get(url + path, headers={**HOST, **kw.pop("headers", {})}, timeout=10, **kw)


def is_hit(r: httpx.Response) -> bool:
    return r.status_code == 200 and r.headers["cache-status"].startswith("edge; hit")


def names(e) -> list[str]:
    return [m.name for m in e.master.addons.get("edge").cluster.live()]


def redis_client(url: str):
    import redis
    return redis.Redis.from_url(url)


def test_two_nodes_see_each_other_and_a_stopped_node_leaves(origin, edge, nodes, redis_url, tmp_path):
    a = edge(node_yaml(origin("a", pages=pages("a")), redis_url, "a"))
    b = nodes(node_yaml(origin("b", pages=pages("b")), redis_url, "b"))
    until(lambda: names(a) == ["a", "b"], what="A sees B")
    part = until(lambda: (p := b.status().get("cluster")) and len(p["members"]) == 2 and p, what="B sees A")
    assert [m["name"] for m in part["members"]] == ["b", "a"] and part["members"][0]["self"]
    assert part["members"][1]["address"] == f"127.0.0.1:{a.port}" and part["members"][1]["last_beat_age"] < 2
    assert part["connected"] and part["node"] == "b"
    listing = subprocess.run([BIN / "edge", "status", "--cluster", "--admin", f"http://127.0.0.1:{b.admin}"],
                             capture_output=True, text=True, timeout=30)
    assert listing.returncode == 0 and f"a 127.0.0.1:{a.port}" in listing.stdout and "last beat" in listing.stdout
    r = redis_client(redis_url)
    assert len([k for k in r.smembers("edge:{edge}:members") if r.exists(k)]) == 2
    b.stop()                                          # graceful: gone from Redis at once, not after ttl
    assert len([k for k in r.smembers("edge:{edge}:members") if r.exists(k)]) == 1
    until(lambda: names(a) == ["a"], timeout=2, what="A drops B before B's ttl")
    c = nodes(node_yaml(origin("c", pages=pages("c")), redis_url, "c"))
    until(lambda: names(a) == ["a", "c"], what="A sees C")
    c.stop(signal.SIGKILL)                            # killed: its key lives on until the ttl
    killed = time.monotonic()
    assert len([k for k in r.smembers("edge:{edge}:members") if r.exists(k)]) == 2
    until(lambda: names(a) == ["a"], timeout=5, what="A drops the killed C")
    assert time.monotonic() - killed > 1.0            # not before its record's ttl (2 s) ran out


def test_a_second_node_with_the_same_name_is_reported(origin, edge, nodes, redis_url):
    a = edge(node_yaml(origin("a", pages=pages("a")), redis_url, "twin"))
    twin = nodes(node_yaml(origin("b", pages=pages("b")), redis_url, "twin"))
    part = until(lambda: (p := twin.status()["cluster"])["collisions"] and p, what="the twin reports")
    assert "also calls itself 'twin'" in part["collisions"][0]
    until(lambda: a.master.addons.get("edge").cluster.collided, what="A reports")
    assert "NAME COLLISION" in twin.stop()


def test_a_purge_on_one_node_is_gone_from_the_others(origin, edge, nodes, redis_url):
    oa, ob = origin("a", pages=pages("a")), origin("b", pages=pages("b"))
    a = edge(node_yaml(oa, redis_url, "a"))
    b = nodes(node_yaml(ob, redis_url, "b"))
    until(lambda: names(a) == ["a", "b"], what="A sees B")
    for url in (a.url, b.url):
        assert get(url, "/page").status_code == 200 and is_hit(get(url, "/page"))
    get(b.url, "/other")
    assert is_hit(get(b.url, "/other"))
    assert httpx.request("PURGE", a.url + "/page", headers=HOST).status_code == 200
    until(lambda: not is_hit(get(b.url, "/page")), what="B no longer serves /page from memory")
    assert fetches(ob, "/page") == 2 and fetches(oa, "/page") == 1      # B's origin was asked again
    assert is_hit(get(b.url, "/other")) and fetches(ob, "/other") == 1  # nothing else was dropped
    # a purge on B reaches A too; invalidation by an unsafe method is fanned out the same way
    assert httpx.request("PURGE", b.url + "/other", headers=HOST).status_code == 200
    until(lambda: not is_hit(get(a.url, "/other")), what="A no longer serves /other")
    assert is_hit(get(a.url, "/page")) or fetches(oa, "/page") == 2
    purges = b.status()["cluster"]["purges"]
    assert purges["sent"] == 1 and purges["applied"] == 1 and purges["emptied"] == 0


def purge_while_cut_off(origin, edge, nodes, redis_server):
    """A (in this process) and B (through a relay to Redis) both up, B holding /page and
    /other; then B cut off from Redis, and /page purged on A meanwhile."""
    oa, ob = origin("a", pages=pages("a")), origin("b", pages=pages("b"))
    relay = Relay(redis_server.port)
    a = edge(node_yaml(oa, redis_server.url, "a"))
    b = nodes(node_yaml(ob, relay.url, "b"))
    until(lambda: names(a) == ["a", "b"], what="A sees B")
    for path in ("/page", "/other"):
        get(b.url, path)
        assert is_hit(get(b.url, path))
    relay.cut()                                   # B's network to Redis is gone; Redis and A go on
    until(lambda: not b.status()["cluster"]["connected"], what="B notices")
    # A never held /page (404 here), and still tells the others: they may hold it
    assert httpx.request("PURGE", a.url + "/page", headers=HOST).status_code == 404
    return a, b, ob, relay


def test_a_node_cut_off_during_a_purge_resynchronises_on_reconnect(origin, edge, nodes, redis_server):
    a, b, ob, relay = purge_while_cut_off(origin, edge, nodes, redis_server)
    assert is_hit(get(b.url, "/page"))            # B missed it: still its stale copy
    relay.restore()
    until(lambda: not is_hit(get(b.url, "/page")), what="B resynchronised")
    assert fetches(ob, "/page") == 2
    assert is_hit(get(b.url, "/other")) and fetches(ob, "/other") == 1      # read from the stream, not emptied
    purges = b.status()["cluster"]["purges"]
    assert purges["resyncs"] >= 1 and purges["applied"] == 1 and purges["emptied"] == 0
    assert "resynchronised from the purge stream: 1 removals" in b.stop()


def test_a_trimmed_stream_empties_the_memory_of_a_node_that_was_away(origin, edge, nodes, redis_server):
    a, b, ob, relay = purge_while_cut_off(origin, edge, nodes, redis_server)
    r = redis_client(redis_server.url)
    r.xadd("edge:{edge}:purges", {"from": "x", "key": ""})
    r.xtrim("edge:{edge}:purges", maxlen=1, approximate=False)      # as MAXLEN does after many purges: B's last id is gone
    relay.restore()
    until(lambda: not is_hit(get(b.url, "/other")), what="B emptied its memory")
    assert fetches(ob, "/other") == 2 and b.status()["cluster"]["purges"]["emptied"] == 1
    assert "memory tier emptied" in b.stop()


def test_the_bot_challenge_secret_is_shared(origin, edge, nodes, redis_url):
    bots = "shield: {bots: {challenge: true}}\n"
    a = edge(node_yaml(origin("a", pages=pages("a")), redis_url, "a", bots))
    b = nodes(node_yaml(origin("b", pages=pages("b")), redis_url, "b", bots))
    until(lambda: names(a) == ["a", "b"], what="A sees B")
    cluster = a.master.addons.get("edge").cluster
    assert cluster.secret() is not None and len(cluster.secret()) == 32
    agent = {"User-Agent": "curl/8.5.0"}          # an `unknown` client: challenged
    first = get(a.url, "/echo", headers=agent)
    assert first.status_code == 403
    token = first.cookies[Challenge.COOKIE]
    passed = get(b.url, "/echo", headers=agent, cookies={Challenge.COOKIE: token})
    assert passed.status_code == 200 and passed.text == "echo"       # earned on A, accepted by B
    forged = get(b.url, "/echo", headers=agent, cookies={Challenge.COOKIE: token[:-4] + ("0000" if token[-4:] != "0000" else "1111")})
    assert forged.status_code == 403
    assert cluster.bot_secret() != cluster.secret()          # the peers' signing key is not the cookie key


def test_redis_down_both_nodes_keep_serving(origin, edge, nodes, redis_server):
    oa, ob = origin("a", pages=pages("a")), origin("b", pages=pages("b"))
    a = edge(node_yaml(oa, redis_server.url, "a", ttl="6s"))
    b = nodes(node_yaml(ob, redis_server.url, "b", ttl="6s"))
    until(lambda: names(a) == ["a", "b"], what="A sees B")
    for url in (a.url, b.url):
        get(url, "/page")
    redis_server.stop()
    assert names(a) == ["a", "b"]                 # the last known list, until B's ttl ages it out
    until(lambda: not b.status()["cluster"]["connected"], what="B notices")
    for _ in range(10):                           # requests answered, hits still hit
        assert is_hit(get(a.url, "/page")) and is_hit(get(b.url, "/page"))
    until(lambda: names(a) == ["a"], timeout=10, what="only A after the ttl")
    assert httpx.request("PURGE", a.url + "/page", headers=HOST).status_code == 200   # local only
    assert not is_hit(get(a.url, "/page")) and is_hit(get(b.url, "/page"))
    assert a.master.addons.get("edge").cluster.snapshot()["cluster"]["purges"]["pending"] == 1
    redis_server.start()                          # a fresh Redis: the stream is gone
    until(lambda: not is_hit(get(b.url, "/page")), what="B drops /page once Redis is back")
    until(lambda: names(a) == ["a", "b"], what="B is back in the list")
    assert a.master.addons.get("edge").cluster.snapshot()["cluster"]["purges"]["pending"] == 0
    err = b.stop()
    assert err.count("unreachable") == 1 and err.count("answers again") == 1    # one line an outage


def test_a_reload_joins_and_leaves_the_cluster(origin, edge, redis_url, tmp_path):
    o = origin("a", pages=pages("a"))
    cfg = tmp_path / "edge.yaml"
    alone = f"pools: {{main: {{origins: [{o.url}]}}}}\n"
    cfg.write_text(alone)
    a = edge(parse_config(alone, str(cfg)))
    chain = a.master.addons.get("edge")
    assert chain.cluster.live() == [] and "cluster" not in chain.snapshot()
    r = redis_client(redis_url)
    members = lambda: [k for k in r.smembers("edge:{edge}:members") if r.exists(k)]
    loop = a.master.event_loop
    reload = lambda text: loop.call_soon_threadsafe(chain.apply, parse_config(text, str(cfg)))
    reload(node_yaml(o, redis_url, "a"))
    until(lambda: len(members()) == 1, what="joined by a reload")
    assert names(a) == ["a"] and chain.snapshot()["cluster"]["members"][0]["address"] == f"127.0.0.1:{a.port}"
    reload(alone)
    until(lambda: not members(), what="left by a reload")
    assert chain.cluster.live() == []


def test_a_node_reaching_redis_through_sentinel(origin, edge, nodes, redis_server, tmp_path):
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                    f"sentinel monitor main 127.0.0.1 {redis_server.port} 1\n")
    sentinel = subprocess.Popen([redis_server.binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, sentinel)
        ob = origin("b", pages=pages("b"))
        a = edge(node_yaml(origin("a", pages=pages("a")), f"redis+sentinel://127.0.0.1:{port}/main", "a"))
        b = nodes(node_yaml(ob, redis_server.url, "b"))
        until(lambda: names(a) == ["a", "b"], what="A (through Sentinel) sees B")
        get(b.url, "/page")
        assert is_hit(get(b.url, "/page"))
        assert httpx.request("PURGE", a.url + "/page", headers=HOST).status_code == 404
        until(lambda: not is_hit(get(b.url, "/page")), what="B drops what A purged")
        assert a.master.addons.get("edge").cluster.secret() == redis_client(redis_server.url).get("edge:{edge}:secret")
    finally:
        sentinel.terminate()
        sentinel.wait(10)


def test_a_node_started_while_redis_is_down_serves_and_empties_its_memory_once_it_is_back(origin, edge,
                                                                                          redis_server):
    o = origin("a", pages=pages("a"))
    redis_server.stop()
    a = edge(node_yaml(o, redis_server.url, "a"))
    cluster = a.master.addons.get("edge").cluster
    get(a.url, "/page")
    assert is_hit(get(a.url, "/page")) and names(a) == ["a"] and cluster.secret() is None
    redis_server.start()              # what the others purged meanwhile is unknown: memory emptied
    until(lambda: not is_hit(get(a.url, "/page")), what="A empties its memory")
    assert fetches(o, "/page") == 2 and cluster.snapshot()["cluster"]["purges"]["emptied"] == 1
    until(lambda: cluster.secret() is not None, what="the shared key once Redis answers")
