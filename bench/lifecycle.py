"""Issue 12's reload and shutdown figures, through a real `edge run`:

    .venv/bin/python bench/lifecycle.py reload      # 8 clients for 20 s, the config changed every 2 s
    .venv/bin/python bench/lifecycle.py shutdown    # SIGTERM with 20 slow requests and 2 large downloads
    .venv/bin/python bench/lifecycle.py             # both

reload: origins a, b, c in their own processes; pools blue and green. Every 2 s the config
file is rewritten, alternately swapping the default pool (blue <-> green) and replacing the
origin of pool blue, with the cache's purge_from and the rate limit's burst changed too, and
the edge is told by SIGHUP and `POST /reload` (the admin write side) in turn. Prints failed
requests and, for each change, how long after the trigger the first request got the new
config's origin and the last one started after the trigger still got the old one.

shutdown: an origin in this process answers /slow after 3 s and sends /big (30 MB) in 1 MB
pieces over 3 s. 20 /slow requests and 2 /big downloads are started, SIGTERM is sent once the
origin has all of them and both downloads are streaming; prints how many completed whole,
the exit code, the time from SIGTERM to exit and the access-log lines written.

Prints figures; asserts nothing (tests/test_lifecycle.py does that). Bounded: 20 s of load.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BIN, free_port, wait_for_port  # noqa: E402
from origins import Origins  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"


def _config(port: int, admin: int, token: Path, blue: str, green: str, default: str, turn: int) -> str:
    return (f"listen: 127.0.0.1:{port}\nadmin: {{address: 127.0.0.1:{admin}, token_file: {token}}}\n"
            f"pools:\n  blue: {{origins: [{blue}]}}\n  green: {{origins: [{green}]}}\n"
            f"routing: {{default_pool: {default}}}\ncache: {{purge_from: [127.0.0.1/32, 10.0.0.{turn % 250}/32]}}\n"
            f"shield:\n  rate_limit: {{rate: 100000/s, burst: {100000 + turn}}}\n")


def reload_under_load(work: Path, seconds: float = 20.0, clients: int = 8, every: float = 2.0) -> None:
    origins = Origins(["a", "b", "c"])
    token = work / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    port, admin = free_port(), free_port()
    path = work / "reload.yaml"
    # (origin of pool blue, default pool) per turn: every change swaps the default pool, every
    # other one also replaces blue's origin; what answers: a, b, c, b, a, ...
    plan = [("a", "blue"), ("a", "green"), ("c", "blue"), ("c", "green")]

    def write(turn: int) -> str:
        blue, default = plan[turn % len(plan)]
        path.write_text(_config(port, admin, token, origins.url(blue), origins.url("b"), default, turn))
        return blue if default == "blue" else "b"

    now_serving = write(0)
    proc = subprocess.Popen([BIN / "edge", "run", "-c", path, "--confdir", work / "conf"],
                            stdout=open(work / "reload.out", "w"), stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        wait_for_port(admin)
        url = f"http://127.0.0.1:{port}/echo"
        samples: list[tuple[float, float, str]] = []     # (started, answered, origin or failure)
        lock = threading.Lock()
        start = time.monotonic()

        def client() -> None:
            with httpx.Client(timeout=10) as c:
                while (begun := time.monotonic()) - start < seconds:
                    try:
                        r = c.get(url)
                        got = r.json()["origin"] if r.status_code == 200 else f"HTTP {r.status_code}"
                    except (httpx.HTTPError, ValueError) as e:
                        got = type(e).__name__
                    with lock:
                        samples.append((begun - start, time.monotonic() - start, got))

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        changes = []            # (trigger time, how, old origin, new origin, admin answer)
        turn = 1
        while (at := start + turn * every) < start + seconds - 0.5:
            time.sleep(max(0.0, at - time.monotonic()))
            new = write(turn)
            how = "SIGHUP" if turn % 2 else "POST /reload"
            t0 = time.monotonic() - start
            if how == "SIGHUP":
                proc.send_signal(signal.SIGHUP)
                answer = ""
            else:
                r = httpx.post(f"http://127.0.0.1:{admin}/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
                answer = f"{r.status_code}, answered in {(time.monotonic() - start - t0) * 1000:.1f} ms"
            changes.append((t0, how, now_serving, new, answer))
            now_serving, turn = new, turn + 1
        for t in threads:
            t.join()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        origins.stop()
    failed = [s for s in samples if s[2] not in "abc"]
    print(f"reload under load: {clients} clients for {seconds:.0f} s, {len(changes)} reloads "
          f"(SIGHUP and POST /reload in turn): {len(samples)} requests, {len(failed)} failed"
          + (f" ({', '.join(sorted({s[2] for s in failed}))})" if failed else "") + f"; edge exit code {code}")
    for i, (t0, how, old, new, answer) in enumerate(changes):
        until = changes[i + 1][0] if i + 1 < len(changes) else seconds
        window = [s for s in samples if t0 <= s[0] < until]
        first_new = min((s[1] for s in window if s[2] == new), default=None)
        last_old = max((s[0] for s in window if s[2] == old), default=None)
        print(f"  t={t0:5.2f}s {how:12} {old} -> {new}: first answer from {new} "
              + (f"{(first_new - t0) * 1000:6.1f} ms after the trigger" if first_new is not None else "never")
              + (f"; last request started on the old config {(last_old - t0) * 1000:6.1f} ms after it"
                 if last_old is not None else "; none on the old config after it")
              + (f" (admin: {answer})" if answer else ""))


class SlowOrigin:
    """/slow: 200 after 3 s; /big: 30 MB in 1 MB pieces, one every 100 ms."""

    def __init__(self) -> None:
        self.seen = 0
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                origin.seen += 1
                if self.path.startswith("/big"):
                    self.send_response(200)
                    self.send_header("Content-Length", str(30 * 2**20))
                    self.send_header("Cache-Control", "no-store")
                    self.end_headers()
                    for _ in range(30):
                        self.wfile.write(b"x" * 2**20)
                        time.sleep(0.1)
                    return
                time.sleep(3)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(b"ok")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def shutdown_in_flight(work: Path, slow: int = 20, downloads: int = 2) -> None:
    origin = SlowOrigin()
    port = free_port()
    log = work / "shutdown-access.log"
    path = work / "shutdown.yaml"
    path.write_text(f"listen: 127.0.0.1:{port}\npools: {{main: {{origins: [{origin.url}]}}}}\naccess_log: {log}\n")
    output = work / "shutdown.out"          # the edge's log (stdout) and Python's tracebacks (stderr)
    proc = subprocess.Popen([BIN / "edge", "run", "-c", path, "--confdir", work / "conf"],
                            stdout=open(output, "w"), stderr=subprocess.STDOUT)
    results: dict[str, tuple[int | str, int]] = {}
    streaming = threading.Semaphore(0)

    def get(name: str) -> None:
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/{name}", timeout=60)
            results[name] = (r.status_code, len(r.content))
        except httpx.HTTPError as e:
            results[name] = (type(e).__name__, 0)

    def download(name: str) -> None:
        got, status = 0, None
        try:
            with httpx.stream("GET", f"http://127.0.0.1:{port}/{name}", timeout=60) as r:
                status = r.status_code
                for i, chunk in enumerate(r.iter_bytes()):
                    got += len(chunk)
                    if i == 0:
                        streaming.release()
            results[name] = (status, got)
        except httpx.HTTPError as e:
            results[name] = (f"{type(e).__name__} after status {status}", got)

    try:
        wait_for_port(port)
        threads = [threading.Thread(target=get, args=(f"slow{i}",)) for i in range(slow)]
        threads += [threading.Thread(target=download, args=(f"big{i}",)) for i in range(downloads)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while origin.seen < slow + downloads and time.monotonic() < deadline:
            time.sleep(0.01)
        for _ in range(downloads):
            streaming.acquire(timeout=10)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        took = time.monotonic() - sent
        for t in threads:
            t.join(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        origin.httpd.shutdown()
    whole = sum(1 for name, (status, size) in results.items()
                if status == 200 and size == (30 * 2**20 if name.startswith("big") else 2))
    lines = len(log.read_text().splitlines()) if log.exists() else 0
    tracebacks = output.read_text().count("Traceback")
    print(f"SIGTERM with {slow} slow requests (3 s) and {downloads} downloads of 30 MB in flight: "
          f"{whole}/{slow + downloads} complete and whole, exit code {code}, exit {took:.2f} s after SIGTERM, "
          f"{lines} access-log lines, {tracebacks} tracebacks in its output")
    for name, (status, size) in sorted(results.items()):
        if name.startswith("big") or status != 200:
            print(f"  {name}: {status}, {size} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", choices=("reload", "shutdown", "all"), default="all")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edge-lifecycle-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o700)
        if args.what in ("reload", "all"):
            reload_under_load(work)
        if args.what in ("shutdown", "all"):
            shutdown_in_flight(work)


if __name__ == "__main__":
    main()
