"""Issue 5's figures, through a real `edge run` and a real origin process on loopback.

    .venv/bin/python bench/shield.py flood       # a client at 10x its rate limit beside a normal one
    .venv/bin/python bench/shield.py slowloris   # 200 connections trickling header bytes beside a normal one

Clients bind their own loopback source addresses (127.0.0.2 floods, 127.0.0.3 browses), so the
edge tells them apart as it would two hosts. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from origins import Edge, Origins  # noqa: E402

BROWSER = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
           "Host": "shop.example"}


def client(source: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=source), headers=BROWSER, timeout=10)


def browse(url: str, source: str, seconds: float, per_second: float, out: dict) -> None:
    """A normal visitor: paced requests, latency of each."""
    latencies, statuses = [], Counter()
    with client(source) as c:
        start = time.monotonic()
        n = 0
        while time.monotonic() - start < seconds:
            t = time.perf_counter()
            try:
                statuses[c.get(f"{url}/echo").status_code] += 1
            except httpx.HTTPError as e:
                statuses[type(e).__name__] += 1
            latencies.append((time.perf_counter() - t) * 1000)
            n += 1
            time.sleep(max(0.0, start + n / per_second - time.monotonic()))
    out.update(latencies=latencies, statuses=statuses)


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else values[0]


def flood(work: Path, seconds: float) -> None:
    origins = Origins(["o"])
    rate, burst = 20, 40
    try:
        edge = Edge(f"pools: {{p: {{origins: [{origins.url('o')}]}}}}\n"
                    f"shield:\n  rate_limit: {{rate: {rate}/s, burst: {burst}}}\n", work)
        alone: dict = {}
        browse(edge.url, "127.0.0.3", seconds, 5, alone)
        before = origin_seen(origins)
        flooded: dict = {}
        statuses: Counter = Counter()
        stop = threading.Event()

        def flooder() -> None:          # 10x the limit: 200 requests/s, paced over 4 connections
            with client("127.0.0.2") as c:
                start, n = time.monotonic(), 0
                while not stop.is_set():
                    try:
                        statuses[c.get(f"{edge.url}/echo").status_code] += 1
                    except httpx.HTTPError as e:
                        statuses[type(e).__name__] += 1
                    n += 1
                    time.sleep(max(0.0, start + n / (rate * 10 / 4) - time.monotonic()))

        threads = [threading.Thread(target=flooder) for _ in range(4)]
        for t in threads:
            t.start()
        browse(edge.url, "127.0.0.3", seconds, 5, flooded)
        stop.set()
        for t in threads:
            t.join()
        seen = origin_seen(origins) - before
        edge.stop()
        flood_total = sum(statuses.values())
        normal = flooded["statuses"]
        print(f"rate limit {rate}/s burst {burst} per client IP; {seconds:.0f} s")
        print(f"flooder (127.0.0.2, aiming at {rate * 10}/s): {flood_total} requests, "
              f"{statuses[200]} answered 200, {statuses[429]} answered 429, other {flood_total - statuses[200] - statuses[429]}")
        print(f"origin saw {seen['127.0.0.2']} flooder requests in {seconds:.0f} s "
              f"(allowed at most {burst} + {rate} x {seconds:.0f} = {burst + rate * seconds:.0f})")
        print(f"normal client (127.0.0.3, 5/s): alone {dict(alone['statuses'])}, p99 {p99(alone['latencies']):.1f} ms; "
              f"during the flood {dict(normal)}, p99 {p99(flooded['latencies']):.1f} ms "
              f"({p99(flooded['latencies']) / p99(alone['latencies']):.2f}x; goal within 2x)")
    finally:
        origins.stop()


def origin_seen(origins: Origins) -> Counter:
    """Requests the origin has received, by the client the edge named (X-Forwarded-For)."""
    return Counter(httpx.get(f"{origins.url('o')}/seen").json())


def slowloris(work: Path, connections: int, header_timeout: float) -> None:
    origins = Origins(["o"])
    try:
        edge = Edge(f"pools: {{p: {{origins: [{origins.url('o')}]}}}}\n"
                    f"shield:\n  connections_per_ip: 1000\n  timeouts: {{request_headers: {header_timeout}s}}\n", work)
        socks, opened = [], time.monotonic()
        for _ in range(connections):
            s = socket.create_connection(("127.0.0.1", edge.port), source_address=("127.0.0.4", 0))
            s.sendall(b"GET / HTTP/1.1\r\nHost: shop.example\r\n")
            socks.append(s)
        closed_at: dict[int, float] = {}
        stop = threading.Event()

        def trickle() -> None:          # one header byte per connection every 2 s until closed
            while not stop.is_set() and len(closed_at) < len(socks):
                for i, s in enumerate(socks):
                    if i in closed_at:
                        continue
                    try:
                        s.sendall(b"X")
                        s.setblocking(False)
                        if s.recv(1) == b"":
                            closed_at[i] = time.monotonic() - opened
                    except BlockingIOError:
                        pass
                    except OSError:
                        closed_at[i] = time.monotonic() - opened
                    finally:
                        s.setblocking(True)
                stop.wait(2.0)

        t = threading.Thread(target=trickle)
        t.start()
        during: dict = {}
        browse(edge.url, "127.0.0.3", header_timeout + 5, 5, during)
        stop.set()
        t.join()
        edge.stop()
        times = sorted(closed_at.values())
        print(f"{connections} slowloris connections from 127.0.0.4, one header byte each every 2 s; "
              f"request_headers timeout {header_timeout:.0f} s")
        print(f"closed by the edge: {len(times)} of {connections}, "
              f"{times[0]:.1f}-{times[-1]:.1f} s after they opened" if times else "none closed")
        print(f"normal client meanwhile (5/s): {dict(during['statuses'])}, "
              f"p50 {statistics.median(during['latencies']):.1f} ms, p99 {p99(during['latencies']):.1f} ms")
        for s in socks:
            s.close()
    finally:
        origins.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["flood", "slowloris"])
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--connections", type=int, default=200)
    ap.add_argument("--header-timeout", type=float, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as work:
        if args.what == "flood":
            flood(Path(work), args.seconds)
        else:
            slowloris(Path(work), args.connections, args.header_timeout)


if __name__ == "__main__":
    main()
