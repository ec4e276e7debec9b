"""Issue 13's cluster figures (purge fan-out, Redis down), through real `edge run` nodes:

    .venv/bin/python bench/cluster.py                 # 3 nodes, 200 purges, then Redis killed and back
    .venv/bin/python bench/cluster.py --nodes 2 --purges 100

One redis-server on an ephemeral port of 127.0.0.1; nodes n1, n2, n3 listening on 127.0.0.1,
127.0.0.2, 127.0.0.3 (loopback aliases: Linux routes all of 127/8 to lo without setup), each
with its own admin port, all in front of one origin (in this process) and one Redis.

purge: for each of N distinct objects, every node fetches it (then holds it in memory), one
node (in turn) gets `PURGE`, and the others are polled with GETs until each answers it from
the origin again: the time from sending the PURGE to sending the GET that node answered with
a miss (an upper bound: it was gone by then; the miss's own answer time is the origin's). Prints p50, p99
and the maximum over all (node, purge) pairs (goal < 100 ms).

outage: Redis is killed (SIGKILL). 100 requests to each node (failures and hits counted), a
purge on n1 (local only: n1 misses, the others still hit), then Redis is started again on
the same port (empty: the stream is gone); prints how long until the others dropped the object
(n1's purge sent from its outbox, or their memory emptied since their stream position is gone)
and until every node lists all the members again.

Prints figures; asserts nothing (tests/test_cluster.py does that). Bounded: N purges, 100 requests a node.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import BIN, free_port, wait_for_port  # noqa: E402
from edgecli.origins import OriginServer  # noqa: E402

HOST = {"Host": "shop.example"}


class Redis:
    def __init__(self, work: Path) -> None:
        self.port, self.work = free_port(), work
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([shutil.which("redis-server"), "--bind", "127.0.0.1", "--port", str(self.port),
                                      "--save", "", "--appendonly", "no", "--dir", str(self.work)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


class Node:
    def __init__(self, name: str, host: str, origin: str, redis: str, work: Path) -> None:
        self.name, self.host, self.port, self.admin = name, host, free_port(), free_port()
        path = work / f"{name}.yaml"
        path.write_text(f"listen: {host}:{self.port}\nadmin: 127.0.0.1:{self.admin}\n"
                        f"pools: {{main: {{origins: [{origin}]}}}}\n"
                        f"cluster: {{node: {name}, redis: '{redis}', ttl: 3s}}\n")
        self.log = open(work / f"{name}.log", "w")
        self.proc = subprocess.Popen([BIN / "edge", "run", "-c", path, "--confdir", work / "conf"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, 20, host=host)
        wait_for_port(self.admin)
        self.url = f"http://{host}:{self.port}"
        self.client = httpx.Client(base_url=self.url, headers=HOST, timeout=10)

    def hit(self, path: str) -> bool | None:
        """True for a hit, False for a miss, None for a failure."""
        try:
            r = self.client.get(path)
        except httpx.HTTPError:
            return None
        return r.headers.get("cache-status", "").startswith("edge; hit") if r.status_code == 200 else None

    def members(self) -> int:
        try:
            return len(httpx.get(f"http://127.0.0.1:{self.admin}/status", timeout=5).json()["cluster"]["members"])
        except (httpx.HTTPError, KeyError, ValueError):
            return 0

    def purges(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.admin}/status", timeout=5).json()["cluster"]["purges"]

    def stop(self) -> None:
        self.client.close()
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(20)
        self.log.close()


def until(condition, timeout: float) -> float | None:
    """Seconds until `condition()` held, polled; None past the timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(0.01)
    return None


def gone_after(node: Node, path: str, sent: float, timeout: float = 5.0) -> float | None:
    """Seconds from `sent` until the node no longer had `path` in memory: the start of the
    first GET it answered from the origin (that answer's own time is the origin fetch's)."""
    while (asked := time.monotonic()) - sent < timeout:
        if node.hit(path) is False:
            return asked - sent
    return None


def purge_latency(nodes: list[Node], purges: int) -> None:
    latencies, lost = [], 0
    for i in range(purges):
        path = f"/obj{i}"
        for node in nodes:
            node.hit(path)
        purger, others = nodes[i % len(nodes)], [n for n in nodes if n is not nodes[i % len(nodes)]]
        if not all(n.hit(path) for n in others):
            continue
        sent = time.monotonic()
        purger.client.request("PURGE", path)
        results: dict[str, float | None] = {}
        threads = [threading.Thread(target=lambda n=n: results.__setitem__(n.name, gone_after(n, path, sent)))
                   for n in others]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for value in results.values():
            if value is None:
                lost += 1
            else:
                latencies.append(value * 1000)
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    print(f"purge on one node -> gone on the others: {len(latencies)} (node, purge) pairs over {purges} purges; "
          f"p50 {p(0.5):.1f} ms, p90 {p(0.9):.1f} ms, p99 {p(0.99):.1f} ms, max {latencies[-1]:.1f} ms, "
          f"mean {statistics.mean(latencies):.1f} ms; not gone within 5 s: {lost}")


def outage(nodes: list[Node], redis: Redis) -> None:
    for node in nodes:
        node.hit("/hot")
    redis.kill()
    killed = time.monotonic()
    answers = {n.name: [n.hit("/hot") for _ in range(100)] for n in nodes}
    for name, seen in answers.items():
        print(f"redis down: {name}: 100 requests, {sum(1 for s in seen if s is None)} failed, "
              f"{sum(1 for s in seen if s)} hits")
    n1, others = nodes[0], nodes[1:]
    n1.client.request("PURGE", "/hot")
    print(f"redis down: purge on {n1.name}: {n1.name} serves it from the origin: {n1.hit('/hot') is False}; "
          f"still served from memory by {', '.join(n.name for n in others if n.hit('/hot'))} (local purge only); "
          f"{n1.name} waiting to send: {n1.purges()['pending']}")
    alone = until(lambda: all(n.members() == 1 for n in nodes), 15)
    print(f"redis down: every node lists only itself {time.monotonic() - killed:.1f} s after the kill"
          if alone is not None else "redis down: members still listed after 15 s")
    redis.start()
    back = time.monotonic()
    dropped = {n.name: gone_after(n, "/hot", back, 15) for n in others}
    listed = until(lambda: all(n.members() == len(nodes) for n in nodes), 15)
    print("redis back (empty): the others dropped the object after "
          + ", ".join(f"{k} {v:.2f} s" if v is not None else f"{k} never (15 s)" for k, v in dropped.items())
          + f"; all {len(nodes)} members listed again after "
          + (f"{time.monotonic() - back:.2f} s" if listed is not None else "more than 15 s"))
    for n in nodes:
        p = n.purges()
        print(f"  {n.name}: purges sent {p['sent']}, applied {p['applied']}, resyncs {p['resyncs']}, "
              f"memory emptied {p['emptied']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3, choices=(2, 3))
    parser.add_argument("--purges", type=int, default=200)
    args = parser.parse_args()
    page = lambda req, o: (200, [("Cache-Control", "max-age=600")], b"x" * 2000)
    origin = OriginServer("origin", pages={**{f"/obj{i}": page for i in range(args.purges)}, "/hot": page}).start()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        redis = Redis(work)
        redis.start()
        nodes: list[Node] = []
        try:
            for i in range(args.nodes):
                nodes.append(Node(f"n{i + 1}", f"127.0.0.{i + 1}", origin.url, redis.url, work))
            if until(lambda: all(n.members() == args.nodes for n in nodes), 20) is None:
                raise SystemExit("bench: the nodes never saw each other")
            print(f"{args.nodes} nodes on {', '.join(n.url for n in nodes)}, redis {redis.url}")
            purge_latency(nodes, args.purges)
            outage(nodes, redis)
        finally:
            for n in nodes:
                n.stop()
            if redis.proc and redis.proc.poll() is None:
                redis.kill()
            origin.stop()


if __name__ == "__main__":
    main()
