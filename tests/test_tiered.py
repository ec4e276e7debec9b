"""The tiered cache over the nodes of a cluster (addons/cluster): the owner of a key by
rendezvous hashing, the signed Edge-Peer header, and real edges sharing their misses: one edge
in this process beside recording peers (which show byte for byte what a node sends a peer),
and two or three `edge run` processes with a static peer list in front of one recording origin."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from addons.cluster.tier import Peer, owner, sign, verify, why_not_shared
from addons.config import ConfigError, parse_config
from tests.conftest import free_port, wait_for_port
from tests.rawnet import CLOSE, RecordingOrigin

BIN = Path(sys.executable).parent
SECRET = b"a-cluster-secret-for-the-tests-0123"
HOST = "shop.test"


# -- the ring ---------------------------------------------------------------------------------------

def members(n: int) -> list[Peer]:
    return [Peer(f"node-{i}", "127.0.0.1", 8000 + i) for i in range(n)]


def test_every_node_with_the_same_members_picks_the_same_owner_and_keys_spread():
    ring = members(4)
    keys = [f"http://{HOST}/object/{i}" for i in range(8000)]
    owners = Counter(owner(k, ring).name for k in keys)
    assert owners == Counter(owner(k, list(reversed(ring))).name for k in keys)     # order does not matter
    assert len(owners) == 4 and all(1600 < n < 2400 for n in owners.values())


def test_a_member_joining_or_leaving_moves_only_about_one_key_in_n():
    keys = [f"http://{HOST}/object/{i}" for i in range(10000)]
    five, six = members(5), members(6)
    before = {k: owner(k, five).name for k in keys}
    after = {k: owner(k, six).name for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert 0.12 < len(moved) / len(keys) < 0.22             # 1/6 moves, all of it to the new member
    assert {after[k] for k in moved} == {"node-5"}
    gone = members(6)[1:]                                   # node-0 leaves: only its keys move
    left = {k: owner(k, gone).name for k in keys}
    assert all(left[k] == after[k] for k in keys if after[k] != "node-0")
    assert all(left[k] != "node-0" for k in keys)


def test_an_unusable_member_passes_its_keys_to_the_next_and_none_usable_is_none():
    ring = members(3)
    key = "http://shop.test/x"
    first = owner(key, ring)
    second = owner(key, ring, lambda m: m is not first)
    assert second is not None and second is not first
    assert owner(key, ring, lambda m: False) is None and owner(key, []) is None


# -- the signature ------------------------------------------------------------------------------------

def signed(now: float = 1_800_000_000.0, **kw) -> str:
    args = dict(node="edge-a", client="203.0.113.9", base="https://shop.test", method="GET",
                authority="shop.test", path="/a?b=1")
    args.update(kw)
    return sign(SECRET, args["node"], args["client"], args["base"], args["method"], args["authority"],
                args["path"], now)


def test_a_signature_verifies_for_its_own_request_only():
    now = 1_800_000_000.0
    value = signed(now)
    assert re.fullmatch(r"edge-a; t=1800000000; client=203\.0\.113\.9; base=https://shop\.test; sig=[0-9a-f]{64}",
                        value)
    claim = verify(SECRET, value, "GET", "shop.test", "/a?b=1", now + 59)
    assert (claim.node, claim.client, claim.base) == ("edge-a", "203.0.113.9", "https://shop.test")
    for method, authority, path in (("HEAD", "shop.test", "/a?b=1"), ("GET", "evil.test", "/a?b=1"),
                                    ("GET", "shop.test", "/a?b=2"), ("GET", "shop.test", "/a")):
        assert verify(SECRET, value, method, authority, path, now) is None
    assert verify(b"another-secret-of-sixteen-bytes", value, "GET", "shop.test", "/a?b=1", now) is None
    assert verify(None, value, "GET", "shop.test", "/a?b=1", now) is None


def test_a_signature_out_of_its_window_or_altered_is_refused():
    now = 1_800_000_000.0
    value = signed(now)
    assert verify(SECRET, value, "GET", "shop.test", "/a?b=1", now + 61) is None       # a replay, later
    assert verify(SECRET, value, "GET", "shop.test", "/a?b=1", now - 61) is None       # from the future
    for old, new in (("client=203.0.113.9", "client=198.51.100.1"), ("base=https", "base=http"),
                     ("edge-a;", "edge-b;"), ("t=1800000000", "t=1800000001")):
        assert verify(SECRET, value.replace(old, new), "GET", "shop.test", "/a?b=1", now) is None
    broken = [value + "; extra=1", value.replace("; sig=", "; sig=0"), value.rsplit(";", 1)[0],
              value.replace("t=1800000000", "t=-1"), "", "edge-a", value + ";" + value.split(";", 1)[1], "x" * 3000]
    for bad in broken:
        assert verify(SECRET, bad, "GET", "shop.test", "/a?b=1", now) is None


def test_a_value_that_cannot_travel_in_the_header_is_not_signed():
    assert signed(client="1.2.3.4; sig=0") is None and signed(base="http://a b") is None and signed(node="") is None


def test_only_plain_get_and_head_misses_are_shared():
    plain = {"host": HOST, "accept": "*/*"}
    assert why_not_shared("GET", plain, False, None, None) is None
    assert why_not_shared("HEAD", plain, True, None, None) is None
    assert why_not_shared("POST", plain, False, None, None) == "method"
    assert why_not_shared("PURGE", plain, False, None, None) == "method"
    for extra in ({"authorization": "Basic eDp5"}, {"upgrade": "websocket"}, {"range": "bytes=0-1"}):
        assert why_not_shared("GET", plain | extra, False, None, None) == "request"
    assert why_not_shared("GET", plain | {"if-none-match": '"x"'}, False, None, None) == "conditional"
    for cc in ("no-store", "max-age=0, no-cache"):
        assert why_not_shared("GET", plain | {"cache-control": cc}, False, None, None) == "no-store"


# -- the config -----------------------------------------------------------------------------------------

def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.key"
    path.write_bytes(SECRET)
    return path


def test_the_cluster_section_and_its_mistakes(tmp_path):
    key = secret_file(tmp_path)
    pools = "pools: {main: {origins: [http://127.0.0.1:1]}}\n"
    config = parse_config(pools + f"cluster: {{node: a, tiered: true, secret_file: {key}, "
                          "peers: {a: 127.0.0.2:8080, b: 127.0.0.3:8080}}\n")
    c = config.cluster
    assert (c.node, c.tiered, c.redis, c.ttl, c.peers) == ("a", True, None, 10.0,
                                                          {"a": ("127.0.0.2", 8080), "b": ("127.0.0.3", 8080)})
    assert parse_config(pools).cluster is None
    assert parse_config(pools + "cluster: {redis: 'redis://127.0.0.1:6379/0'}\n").cluster.tiered is False
    short = tmp_path / "short.key"
    short.write_bytes(b"short")
    for text, where in (
            ("cluster: {node: a, tiered: yes-please}", "test.yaml:2: cluster.tiered: expected true or false"),
            ("cluster: {node: a, tiered: true}", "test.yaml:2: cluster.tiered: needs the members"),
            ("cluster: {node: a, tiered: true, peers: {a: 127.0.0.1:1}}", "cluster.secret_file: tiered without Redis"),
            ("cluster: {node: a, peers: {b: 127.0.0.1:1}}", "cluster.peers: this node (a) must be in"),
            ("cluster: {node: a, peers: {a: nowhere}}", "cluster.peers.a: 'nowhere': expected HOST:PORT"),
            ("listen: 127.0.0.1:8080\ncluster: {node: a, peers: {a: 127.0.0.1:8080, b: localhost:8080}}",
             "test.yaml:3: cluster.peers.b: this node listens on port 8080 too"),
            ("cluster: {node: 'a b'}", "cluster.node: expected a name"),
            (f"cluster: {{node: a, secret_file: {short}}}", "fewer than 16 bytes of key"),
            ("cluster: {node: a, redis: 'http://x'}", "cluster.redis: 'http://x': unknown scheme 'http'"),
            ("cluster: {node: a, peer: {}}", "test.yaml:2: cluster.peer: unknown key")):
        with pytest.raises(ConfigError) as e:
            parse_config(pools + text + "\n", "test.yaml")
        assert where in str(e.value), str(e.value)


# -- one edge in this process, recording peers beside it ---------------------------------------------------

def cacheable(request: bytes) -> bytes:
    """The origin's answer: the path, cacheable for five minutes."""
    path = request.split(b" ", 2)[1]
    return (b"HTTP/1.1 200 OK\r\nCache-Control: max-age=300\r\nContent-Type: text/plain\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(path), path))


def from_peer(request: bytes) -> bytes:
    body = b"from the owner " + request.split(b" ", 2)[1]
    return (b"HTTP/1.1 200 OK\r\nCache-Control: max-age=300\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def node_config(node: str, origin: str, peers: dict[str, str], key: Path, extra: str = "") -> str:
    table = ", ".join(f"{name}: '{address}'" for name, address in peers.items())
    return (f"listen: 127.0.0.1:0\npools: {{main: {{origins: ['{origin}']}}}}\n"
            f"cluster: {{node: {node}, tiered: true, secret_file: '{key}', peers: {{{table}}}}}\n" + extra)


def paths_owned(by: str, names: list[str], count: int, prefix: str = "/object/", base: str = f"http://{HOST}") -> list[str]:
    ring = [Peer(n, "127.0.0.1", 1) for n in names]
    out, i = [], 0
    while len(out) < count:
        path = f"{prefix}{i}"
        if owner(base + path, ring).name == by:
            out.append(path)
        i += 1
    return out


def paths_of(origin: RecordingOrigin) -> list[str]:
    return [r.split(b" ", 2)[1].decode() for r in origin.requests]


def field(request: bytes, name: str) -> list[str]:
    head = request.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    return [line.split(":", 1)[1].strip() for line in head.split("\r\n")[1:]
            if line.split(":", 1)[0].strip().lower() == name.lower()]


def beside(edge, tmp_path: Path, node: str, other: str, extra: str = "", script=from_peer):
    """This process's edge `node` and a recording peer `other` beside it, in front of a
    recording origin: (edge, origin, peer)."""
    origin, peer = RecordingOrigin(cacheable), RecordingOrigin(script)
    peers = {node: "127.0.0.1:1", other: f"127.0.0.1:{peer.port}"}
    return edge(node_config(node, origin.url, peers, secret_file(tmp_path), extra)), origin, peer


def test_a_miss_owned_by_a_peer_goes_there_signed_with_the_clients_head(edge, tmp_path):
    e, origin, peer = beside(edge, tmp_path, "a", "b")
    theirs, mine = paths_owned("b", ["a", "b"], 1)[0], paths_owned("a", ["a", "b"], 1)[0]
    with httpx.Client(base_url=e.url, headers={"Host": HOST}) as c:
        sent = time.time()
        r = c.get(theirs + "?q=1", headers={"X-Forwarded-For": "6.6.6.6", "Accept-Encoding": "gzip"})
        assert r.status_code == 200 and r.text == f"from the owner {theirs}?q=1"
        again = c.get(theirs + "?q=1")          # stored here as well
        assert again.text == r.text and "hit" in again.headers["cache-status"]
        assert c.get(mine).text == mine
    assert len(peer.requests) == 1 and paths_of(origin) == [mine]
    request = peer.requests[0]
    assert request.startswith(f"GET {theirs}?q=1 HTTP/1.1\r\n".encode())
    assert field(request, "host") == [HOST] and field(request, "accept-encoding") == ["identity"]
    assert field(request, "x-forwarded-for") == []          # the client's own forwarding headers: never
    [value] = field(request, "edge-peer")
    claim = verify(SECRET, value, "GET", HOST, f"{theirs}?q=1", sent)
    assert claim is not None and (claim.node, claim.client, claim.base) == ("a", "127.0.0.1", f"http://{HOST}")
    assert b"edge-peer" not in origin.received.lower()
    origin.stop(), peer.stop()


def test_an_http2_client_over_tls_is_signed_for_its_https_base(edge, tmp_path):
    from tests.test_tls import CA
    cert, key, _ = CA().issue(tmp_path, "shop", HOST)
    origin, peer = RecordingOrigin(cacheable), RecordingOrigin(from_peer)
    tls = free_port()
    text = node_config("a", origin.url, {"a": "127.0.0.1:1", "b": f"127.0.0.1:{peer.port}"}, secret_file(tmp_path),
                       f"certificates: [{{cert: '{cert}', key: '{key}'}}]\n")
    edge(text.replace("listen: 127.0.0.1:0\n", f"listen: [127.0.0.1:0, {{address: 127.0.0.1:{tls}, tls: true}}]\n"))
    authority = f"{HOST}:{tls}"
    theirs = paths_owned("b", ["a", "b"], 1, prefix="/tls/", base=f"https://{authority}")[0]
    out = subprocess.run(["curl", "-sk", "--http2", "-o", "-", "-w", " %{http_version}", "--resolve",
                          f"{authority}:127.0.0.1", f"https://{authority}{theirs}"], capture_output=True, timeout=20)
    assert out.stdout.decode() == f"from the owner {theirs} 2"
    [request] = peer.requests
    assert field(request, "host") == [authority]          # :authority, as the Host of an HTTP/1.1 request
    claim = verify(SECRET, field(request, "edge-peer")[0], "GET", authority, theirs, time.time())
    assert claim is not None and claim.base == f"https://{authority}"
    assert origin.requests == []
    origin.stop(), peer.stop()


def test_uncacheable_requests_never_go_to_the_peer(edge, tmp_path):
    e, origin, peer = beside(edge, tmp_path, "a", "b")
    paths = paths_owned("b", ["a", "b"], 7)
    with httpx.Client(base_url=e.url, headers={"Host": HOST}) as c:
        assert c.get(paths[0], headers={"Authorization": "Bearer x"}).status_code == 200
        assert c.get(paths[1], headers={"Cache-Control": "no-store"}).status_code == 200
        assert c.post(paths[2], content=b"data").status_code == 200
        assert c.get(paths[3], headers={"Range": "bytes=0-1"}).status_code in (200, 206)
        assert c.get(paths[4], headers={"Upgrade": "websocket", "Connection": "Upgrade"}).status_code in (200, 400)
        assert c.get(paths[5], headers={"If-None-Match": '"x"'}).status_code == 200
        assert c.request("PURGE", paths[6]).status_code == 404      # answered by the cache, here
        assert c.get(paths[6]).text == "from the owner " + paths[6]   # the control: a plain GET does go
    assert paths_of(peer) == [paths[6]]
    assert sorted(paths_of(origin)) == sorted(paths[:6])
    assert b"edge-peer" not in origin.received.lower()
    origin.stop(), peer.stop()


def test_a_forged_edge_peer_is_dropped_and_the_request_served_as_a_clients(edge, tmp_path):
    e, origin, peer = beside(edge, tmp_path, "a", "b")
    mine = paths_owned("a", ["a", "b"], 3)
    theirs = paths_owned("b", ["a", "b"], 1)[0]
    forged = [signed(time.time(), method="GET", authority=HOST, path=mine[0]).replace("sig=", "sig=0")[:-1],
              sign(b"not-the-cluster-secret-0123456", "b", "198.51.100.7", f"http://{HOST}", "GET", HOST, mine[1],
                   time.time()),
              sign(SECRET, "b", "198.51.100.7", f"http://{HOST}", "GET", HOST, mine[2], time.time() - 120)]
    with httpx.Client(base_url=e.url, headers={"Host": HOST}) as c:
        for path, value in zip(mine, forged):
            assert c.get(path, headers={"Edge-Peer": value}).text == path
        # as a client's request, a forged one for a peer's key is sent on to the peer, signed afresh
        r = c.get(theirs, headers={"Edge-Peer": "b; t=1; client=1.2.3.4; base=http://x; sig=" + "0" * 64})
        assert r.text == "from the owner " + theirs
    assert paths_of(origin) == mine
    assert b"edge-peer" not in origin.received.lower() and b"198.51.100.7" not in origin.received
    assert all(field(req, "x-forwarded-for") == ["127.0.0.1"] for req in origin.requests)
    [value] = field(peer.requests[0], "edge-peer")
    assert verify(SECRET, value, "GET", HOST, theirs, time.time()).client == "127.0.0.1"
    assert "1.2.3.4" not in peer.received.decode("latin-1")
    origin.stop(), peer.stop()


def test_a_signed_request_is_served_here_and_never_sent_to_another_peer(edge, tmp_path):
    e, origin, trap = beside(edge, tmp_path, "b", "c")
    # the paths that this node's ring gives to c, sent as a's peer requests (a's ring said b)
    paths = paths_owned("c", ["b", "c"], 3)
    with httpx.Client(base_url=e.url, headers={"Host": HOST}) as c:
        for path in paths[:2]:
            value = sign(SECRET, "a", "198.51.100.7", f"http://{HOST}", "GET", HOST, path, time.time())
            r = c.get(path, headers={"Edge-Peer": value})
            assert r.status_code == 200 and r.text == path
        assert c.get(paths[2]).text == "from the owner " + paths[2]    # the control: a client's request goes to c
    assert paths_of(trap) == [paths[2]] and paths_of(origin) == paths[:2]
    assert b"edge-peer" not in origin.received.lower()
    # the owner trusts the client the peer signed for: the origin is told of it, not of the peer
    assert [field(req, "x-forwarded-for") for req in origin.requests] == [["198.51.100.7"]] * 2
    origin.stop(), trap.stop()


def test_the_owner_limits_the_client_a_peer_signed_for_not_the_peer(edge, tmp_path):
    e, origin, trap = beside(edge, tmp_path, "b", "c", "shield: {rate_limit: {rate: 1/m, burst: 2}}\n")
    paths = [f"/limited/{i}" for i in range(8)]

    def as_peer(path: str, client: str) -> int:
        value = sign(SECRET, "a", client, f"http://{HOST}", "GET", HOST, path, time.time())
        return c.get(path, headers={"Edge-Peer": value}).status_code

    with httpx.Client(base_url=e.url, headers={"Host": HOST}) as c:
        assert [as_peer(p, f"198.51.100.{i}") for i, p in enumerate(paths[:5])] == [200] * 5   # five clients
        assert [as_peer(p, "203.0.113.9") for p in paths[5:]] == [200, 200, 429]                 # one client
    assert trap.requests == []
    origin.stop(), trap.stop()


def test_a_dead_or_failing_peer_falls_back_to_the_origin(edge, tmp_path):
    origin, closing = RecordingOrigin(cacheable), RecordingOrigin(lambda _: CLOSE)
    dead = free_port()                  # nothing listens there: refused
    peers = {"a": "127.0.0.1:1", "b": f"127.0.0.1:{dead}", "c": f"127.0.0.1:{closing.port}"}
    e = edge(node_config("a", origin.url, peers, secret_file(tmp_path)))
    of_b, of_c = paths_owned("b", list(peers), 3), paths_owned("c", list(peers), 3)
    with httpx.Client(base_url=e.url, headers={"Host": HOST}) as c:
        for path in of_b + of_c:
            r = c.get(path)
            assert r.status_code == 200 and r.text == path
    assert sorted(paths_of(origin)) == sorted(of_b + of_c)
    assert len(closing.requests) == 1       # asked once: then left alone for its cool-down
    origin.stop(), closing.stop()


def test_an_owner_that_cannot_serve_a_peer_closes_so_the_peer_takes_the_origin(edge, tmp_path):
    """Its origin shown down by the checks: a client gets the edge's 503, a peer's signed
    request a closed connection (the peer then falls back to the origin itself)."""
    dead = free_port()
    text = node_config("b", f"http://127.0.0.1:{dead}", {"b": "127.0.0.1:1"}, secret_file(tmp_path))
    text = text.replace("origins: [", "health: {path: /health, interval: 100ms, timeout: 50ms}, origins: [")
    e = edge(text)
    with httpx.Client(base_url=e.url, headers={"Host": HOST}) as c:
        until = time.monotonic() + 10
        while c.get("/x").status_code != 503 and time.monotonic() < until:
            time.sleep(0.05)
        assert c.get("/x").status_code == 503
    value = sign(SECRET, "a", "198.51.100.7", f"http://{HOST}", "GET", HOST, "/x", time.time())
    with httpx.Client(base_url=e.url, headers={"Host": HOST}) as c, pytest.raises(httpx.RemoteProtocolError):
        c.get("/x", headers={"Edge-Peer": value})


# -- two and three real edges ----------------------------------------------------------------------------

class Node:
    """`edge run` of one node of a static cluster, as its own process."""

    def __init__(self, tmp_path: Path, name: str, port: int, text: str) -> None:
        self.name, self.port = name, port
        self.config = tmp_path / f"{name}.yaml"
        self.config.write_text(text.replace("listen: 127.0.0.1:0", f"listen: 127.0.0.1:{port}"))
        self.out = open(tmp_path / f"{name}.out", "w")
        self.proc = subprocess.Popen([BIN / "edge", "run", "-c", str(self.config), "--confdir", str(tmp_path / "conf")],
                                     stdout=self.out, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()


@pytest.fixture
def cluster(tmp_path):
    """cluster(n, origin) -> n nodes named a, b, c... with one static peer list, all started."""
    started: list[Node] = []

    def start(n: int, origin: RecordingOrigin) -> list[Node]:
        names = "abcdefgh"[:n]
        ports = {name: free_port() for name in names}
        peers = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
        key = secret_file(tmp_path)
        nodes = [Node(tmp_path, name, ports[name], node_config(name, origin.url, peers, key)) for name in names]
        started.extend(nodes)
        for node in nodes:
            wait_for_port(node.port, node.proc, timeout=60)
        return nodes

    yield start
    for node in started:
        node.stop()


def test_three_nodes_asked_for_thirty_objects_each_fetch_each_once_from_the_origin(cluster):
    origin = RecordingOrigin(cacheable)
    nodes = cluster(3, origin)
    paths = [f"/object/{i}" for i in range(30)]
    for node in nodes:
        with httpx.Client(base_url=node.url, headers={"Host": HOST}, timeout=20) as c:
            for path in paths:
                r = c.get(path)
                assert r.status_code == 200 and r.text == path
    assert Counter(paths_of(origin)) == Counter({path: 1 for path in paths})
    assert b"edge-peer" not in origin.received.lower()
    ring = [Peer(n, "127.0.0.1", 1) for n in "abc"]
    assert len({owner(f"http://{HOST}{p}", ring).name for p in paths}) == 3     # all three owned some
    origin.stop()


def test_two_nodes_owner_killed_requests_still_answered_and_purge_is_per_node(cluster):
    origin = RecordingOrigin(cacheable)
    a, b = cluster(2, origin)
    of_b = paths_owned("b", ["a", "b"], 6)
    with httpx.Client(base_url=a.url, headers={"Host": HOST}, timeout=20) as c:
        assert c.get(of_b[0]).text == of_b[0]
        assert c.get(of_b[1]).text == of_b[1]
    with httpx.Client(base_url=b.url, headers={"Host": HOST}, timeout=20) as c:
        assert "hit" in c.get(of_b[0]).headers["cache-status"]
        # a purge on the owner removes the owner's copy; a's stays until its freshness ends
        # (without Redis a purge is this node's: purge every node, or let cluster fan it out)
        assert c.request("PURGE", of_b[0]).status_code == 200
        assert c.get(of_b[0]).text == of_b[0]
    assert Counter(paths_of(origin))[of_b[0]] == 2
    with httpx.Client(base_url=a.url, headers={"Host": HOST}, timeout=20) as c:
        assert "hit" in c.get(of_b[0]).headers["cache-status"]
        assert c.get(of_b[2]).text == of_b[2]      # through b, on a connection a keeps to b
        b.proc.kill()
        b.proc.wait()
        for path in of_b[3:]:           # the first over the connection b's death closed, the rest refused
            r = c.get(path)
            assert r.status_code == 200 and r.text == path
    assert Counter(paths_of(origin)) == Counter({of_b[0]: 2, **{p: 1 for p in of_b[1:]}})
    assert b"edge-peer" not in origin.received.lower()
    origin.stop()
