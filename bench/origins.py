"""Issue 4's figures, through a real `edge run` and real origin processes on loopback.

    .venv/bin/python bench/origins.py distribution   # 4,000 requests at 3:1; hash stickiness and remapping
    .venv/bin/python bench/origins.py failover       # 20 s of load, one origin killed and restarted

Prints figures; asserts nothing (the tests do that).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BIN, free_port, wait_for_port  # noqa: E402

ORIGIN = "from edgecli.origins import OriginServer; import sys, time; " \
         "OriginServer(sys.argv[1], port=int(sys.argv[2])).start(); time.sleep(10**6)"


class Origins:
    """Origin servers, each its own process, so one can be killed like a crashed machine."""

    def __init__(self, names: list[str]) -> None:
        self.ports = {name: free_port() for name in names}
        self.procs: dict[str, subprocess.Popen] = {}
        for name in names:
            self.start(name)

    def start(self, name: str) -> None:
        self.procs[name] = subprocess.Popen([sys.executable, "-c", ORIGIN, name, str(self.ports[name])])
        wait_for_port(self.ports[name])

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def stop(self) -> None:
        for p in self.procs.values():
            p.kill()
            p.wait()


class Edge:
    def __init__(self, config: str, work: Path) -> None:
        self.port, self.admin = free_port(), free_port()
        path = work / f"edge-{self.port}.yaml"
        path.write_text(f"listen: 127.0.0.1:{self.port}\nadmin: 127.0.0.1:{self.admin}\n{config}")
        self.proc = subprocess.Popen([BIN / "edge", "run", "-c", path, "--confdir", work / "conf"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        wait_for_port(self.admin)
        self.url = f"http://127.0.0.1:{self.port}"

    def status(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/status", timeout=5) as r:
            return json.load(r)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(15)


def distribution(work: Path) -> None:
    origins = Origins(["a", "b", "c", "d"])
    try:
        edge = Edge(f"pools:\n  p:\n    origins: [{{url: {origins.url('a')}, weight: 3}}, "
                    f"{{url: {origins.url('b')}, weight: 1}}]\n", work)
        with httpx.Client() as c:
            seen = Counter(c.get(f"{edge.url}/echo").json()["origin"] for _ in range(4000))
        edge.stop()
        print(f"weighted round robin 3:1, 4,000 requests through the edge: a {seen['a']} ({seen['a'] / 40:.1f} %), "
              f"b {seen['b']} ({seen['b'] / 40:.1f} %)")

        def hashed(names: list[str]) -> dict[str, str]:
            pool = ", ".join(origins.url(n) for n in names)
            e = Edge(f"pools:\n  p:\n    origins: [{pool}]\n    balance: hash\n    hash_key: header:X-User\n", work)
            out: dict[str, str] = {}
            sticky = True
            with httpx.Client() as c:
                for i in range(1000):
                    first, again = (c.get(f"{e.url}/echo", headers={"X-User": f"user-{i}"}).json()["origin"]
                                    for _ in range(2))
                    sticky &= first == again
                    out[f"user-{i}"] = first
            e.stop()
            print(f"hash over {len(names)} origins, 1,000 keys each asked twice: "
                  f"{'every key stuck to its origin' if sticky else 'NOT sticky'}; spread {dict(sorted(Counter(out.values()).items()))}")
            return out

        four = hashed(["a", "b", "c", "d"])
        three = hashed(["a", "b", "c"])
        moved = sum(four[k] != three[k] for k in four)
        print(f"removing d remapped {moved} of 1,000 keys ({moved / 10:.1f} %), of which d had "
              f"{sum(v == 'd' for v in four.values())} (goal <= 30 %)")
    finally:
        origins.stop()


def failover(work: Path, seconds: float, clients: int) -> None:
    origins = Origins(["a", "b", "c"])
    kill_at, restart_at = seconds * 0.35, seconds * 0.65
    try:
        pool = ", ".join(origins.url(n) for n in "abc")
        edge = Edge(f"pools:\n  p:\n    origins: [{pool}]\n"
                    f"    health: {{path: /health, interval: 1s, timeout: 500ms, rise: 2, fall: 2}}\n", work)
        start = time.monotonic()
        served: dict[int, Counter] = defaultdict(Counter)       # second -> origin -> count
        failures: list[str] = []
        lock = threading.Lock()

        def client() -> None:
            with httpx.Client(timeout=10) as c:
                while (t := time.monotonic() - start) < seconds:
                    try:
                        r = c.get(f"{edge.url}/echo")
                        who = r.json()["origin"] if r.status_code == 200 else f"HTTP {r.status_code}"
                    except httpx.HTTPError as e:
                        who = type(e).__name__
                    with lock:
                        served[int(t)][who] += 1
                        if who not in "abc":
                            failures.append(f"{t:.2f}s {who}")

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        states: list[tuple[float, bool]] = []
        killed = restarted = False
        while (t := time.monotonic() - start) < seconds:
            if not killed and t >= kill_at:
                origins.kill("b")
                killed_t, killed = time.monotonic() - start, True
            if not restarted and t >= restart_at:
                origins.start("b")
                restarted_t, restarted = time.monotonic() - start, True
            b = next(o for o in edge.status()["pools"]["p"]["origins"] if o["url"] == origins.url("b"))
            states.append((t, b["available"]))
            time.sleep(0.05)
        for t in threads:
            t.join()
        edge.stop()
        out_at = next(t for t, ok in states if t >= killed_t and not ok)
        back_at = next((t for t, ok in states if t >= restarted_t and ok), None)
        total = sum(sum(c.values()) for c in served.values())
        print(f"{clients} clients for {seconds:.0f} s against 3 origins (health interval 1 s, rise 2, fall 2); "
              f"b SIGKILLed at {killed_t:.1f} s, restarted at {restarted_t:.1f} s")
        print(f"requests: {total}, failed: {len(failures)} {failures[:5]}")
        print(f"b out of rotation {out_at - killed_t:.2f} s after the kill; back {back_at - restarted_t:.2f} s after "
              f"the restart" if back_at else "b not back before the end")
        print("second  " + "  ".join(f"{n:>5}" for n in "abc") + "  other")
        for sec in sorted(served):
            c = served[sec]
            other = sum(v for k, v in c.items() if k not in "abc")
            print(f"{sec:6d}  " + "  ".join(f"{c[n]:5d}" for n in "abc") + f"  {other:5d}")
    finally:
        origins.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["distribution", "failover"])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as work:
        if args.what == "distribution":
            distribution(Path(work))
        else:
            failover(Path(work), args.seconds, args.clients)


if __name__ == "__main__":
    main()
