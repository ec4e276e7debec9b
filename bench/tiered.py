"""Issue 13's tiered-cache figures: three `edge run` nodes on 127.0.0.1, 127.0.0.2 and 127.0.0.3
(loopback aliases: nothing to set up on Linux) in front of one counting origin.

    .venv/bin/python bench/tiered.py                 # static peers (cluster.peers + secret_file)
    .venv/bin/python bench/tiered.py --redis URL     # membership through that Redis
    .venv/bin/python bench/tiered.py --redis auto    # ... through a redis-server of its own (ephemeral port)

fetches: 1,000 distinct objects, each requested once on every node (the three nodes asked at
once, 4 clients each): the origin's fetches with `cluster.tiered: true` (goal 1,000) and with
it off (3,000).
kill: 4 clients per node loop over 300 objects (bounded: 400 requests or 20 s each, new nodes,
so misses go to owners); node c is killed (SIGKILL) 3 s in. Failed requests on the surviving
nodes (goal 0), on node c those in flight when it died, and those it refused afterwards (a
load balancer's to take out).

With Redis, requests start once every node lists the three members (their /status), so the
first misses already shard over all three.

Prints figures; asserts nothing (tests/test_tiered.py, tests/test_cluster_tiered.py do that)."""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BIN, free_port, wait_for_port  # noqa: E402

NODES = {"a": "127.0.0.1", "b": "127.0.0.2", "c": "127.0.0.3"}
HOST = "shop.example"
CLIENTS = 4


class CountingOrigin:
    """A threaded origin on 127.0.0.1 counting requests per path; every answer is fresh for 10 min."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        lock, counts = threading.Lock(), self.counts

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                with lock:
                    counts[self.path] += 1
                body = self.path.encode() * 8
                self.send_response(200)
                self.send_header("Cache-Control", "max-age=600")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fetches(self, prefix: str) -> int:
        return sum(n for path, n in self.counts.items() if path.startswith(prefix))


def cluster_block(name: str, ports: dict[str, int], tiered: bool, key: Path, redis: str | None) -> str:
    """The node's cluster section: Redis membership, or the static peer list."""
    if redis is not None:
        return f"cluster: {{node: {name}, redis: '{redis}', tiered: {str(tiered).lower()}}}\n"
    peers = ", ".join(f"{n}: '{ip}:{ports[n]}'" for n, ip in NODES.items())
    return f"cluster: {{node: {name}, tiered: {str(tiered).lower()}, secret_file: '{key}', peers: {{{peers}}}}}\n"


class Cluster:
    def __init__(self, work: Path, origin: str, tiered: bool, redis: str | None) -> None:
        # one port on three addresses (the tiered cache lets a peer at 127.0.0.1 past
        # mitmproxy's loop guard); an admin port each, to see the members
        port = free_port()
        self.ports = {name: port for name in NODES}
        self.admins = {name: free_port() for name in NODES}
        key = work / "cluster.key"
        key.write_bytes(b"bench-cluster-secret-0123456789")
        self.procs: dict[str, subprocess.Popen] = {}
        for name, ip in NODES.items():
            path = work / f"{name}-{tiered}.yaml"
            path.write_text(f"listen: {ip}:{self.ports[name]}\nadmin: 127.0.0.1:{self.admins[name]}\n"
                            f"pools: {{main: {{origins: ['{origin}']}}}}\n"
                            + cluster_block(name, self.ports, tiered, key, redis))
            self.procs[name] = subprocess.Popen([BIN / "edge", "run", "-c", path, "--confdir", work / "conf"],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for name, ip in NODES.items():
            wait_for_port(self.ports[name], 60, host=ip)
        if redis is not None:
            self.wait_members()

    def wait_members(self, timeout: float = 60) -> None:
        """Until every node lists all three (their first heartbeats are in)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if all(len(httpx.get(f"http://127.0.0.1:{port}/status", timeout=5).json()["cluster"]["members"])
                       == len(NODES) for port in self.admins.values()):
                    return
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.1)
        raise SystemExit("bench: the nodes never listed each other (is Redis reachable?)")

    def url(self, name: str) -> str:
        return f"http://{NODES[name]}:{self.ports[name]}"

    def kill(self, name: str) -> None:
        self.procs[name].kill()
        self.procs[name].wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def ask_all(cluster: Cluster, paths: list[str]) -> int:
    """Every path once on every node, the nodes at once (CLIENTS clients each); failures."""
    def client(name: str, part: list[str]) -> int:
        failed = 0
        with httpx.Client(base_url=cluster.url(name), headers={"Host": HOST}, timeout=30) as c:
            for path in part:
                try:
                    failed += c.get(path).status_code != 200
                except httpx.HTTPError:
                    failed += 1
        return failed

    with ThreadPoolExecutor(len(NODES) * CLIENTS) as pool:
        jobs = [pool.submit(client, name, paths[i::CLIENTS]) for name in NODES for i in range(CLIENTS)]
        return sum(job.result() for job in jobs)


def fetches(work: Path, origin: CountingOrigin, redis: str | None) -> None:
    paths = [f"/object/{i}" for i in range(1000)]
    for tiered in (True, False):
        prefix = f"/{'tiered' if tiered else 'alone'}"
        cluster = Cluster(work, origin.url, tiered, redis)
        try:
            started = time.monotonic()
            failed = ask_all(cluster, [prefix + p for p in paths])
            took = time.monotonic() - started
        finally:
            cluster.stop()
        print(f"tiered {'on ' if tiered else 'off'}: 1,000 objects x 3 nodes -> origin fetches "
              f"{origin.fetches(prefix):,} (failed requests {failed}, {took:.1f} s)")


def kill(work: Path, origin: CountingOrigin, redis: str | None) -> None:
    cluster = Cluster(work, origin.url, True, redis)
    killed_at: list[float] = []
    results: dict[str, Counter] = {name: Counter() for name in NODES}
    lock = threading.Lock()

    def client(name: str, index: int) -> None:
        deadline = time.monotonic() + 20
        with httpx.Client(base_url=cluster.url(name), headers={"Host": HOST}, timeout=30) as c:
            for i in range(400):
                if time.monotonic() > deadline:
                    break
                started = time.monotonic()
                try:
                    outcome = "ok" if c.get(f"/load/{(index * 97 + i * 7) % 300}").status_code == 200 else "failed"
                except httpx.ConnectError:
                    outcome = "refused"
                except httpx.HTTPError:
                    outcome = "failed"
                if outcome != "ok" and name == "c" and killed_at and started <= killed_at[0]:
                    outcome = "in flight"
                with lock:
                    results[name][outcome] += 1

    try:
        threads = [threading.Thread(target=client, args=(name, i)) for name in NODES for i in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(3)
        killed_at.append(time.monotonic())
        cluster.kill("c")
        for t in threads:
            t.join()
    finally:
        cluster.stop()
    survivors = sum(results[n]["failed"] + results[n]["refused"] for n in ("a", "b"))
    print(f"kill c under load: failed on the surviving nodes {survivors} (a {dict(results['a'])}, "
          f"b {dict(results['b'])}); on c {dict(results['c'])}; origin fetches of 300 objects "
          f"{origin.fetches('/load/')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", choices=("fetches", "kill"), default=None)
    parser.add_argument("--redis", default=None,
                        help="membership through this Redis URL instead of static peers; auto: a redis-server of its own")
    args = parser.parse_args()
    origin = CountingOrigin()
    with tempfile.TemporaryDirectory() as work:
        redis, server = args.redis, None
        if redis == "auto":
            redis, server = own_redis(Path(work))
        try:
            print(f"members: {'redis ' + redis if redis else 'static peers'}")
            if args.what in (None, "fetches"):
                fetches(Path(work), origin, redis)
            if args.what in (None, "kill"):
                kill(Path(work), origin, redis)
        finally:
            if server is not None:
                server.terminate()
                server.wait(10)


def own_redis(work: Path) -> tuple[str, subprocess.Popen]:
    """A redis-server on an ephemeral loopback port, nothing saved: (its URL, the process)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("bench: --redis auto needs redis-server (Debian's redis-server package)")
    port = free_port()
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, 60)
    return f"redis://127.0.0.1:{port}/0", proc


if __name__ == "__main__":
    main()
