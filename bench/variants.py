"""Issue 10's variant figures, through a real `edge run` in front of a counting origin on loopback.

    .venv/bin/python bench/variants.py [--edge /work/main/.venv/bin/edge]   # --edge: another build, for "before"

1. Origin fetches for one page asked for with br, zstd, gzip and identity, then each again.
2. Event-loop stall: a 50 MiB text page fetched with br while a second client asks a cached small
   page every 10 ms; prints the slowest small answer (the stall everyone else waits through).
Prints figures; asserts nothing (the tests do that)."""

from __future__ import annotations

import argparse
import http.client
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BIN, free_port, wait_for_port  # noqa: E402

PAGE = "".join(f"<li>row {i}: one origin fetch for every coding</li>\n" for i in range(2000)).encode()
BIG = b"".join(b"line %d of a large text page %s\n" % (i, str(i * 7919).encode()) for i in range(1_500_000))[:50 << 20]


class Origin(BaseHTTPRequestHandler):
    served: dict[str, int] = {}

    def do_GET(self) -> None:
        Origin.served[self.path] = Origin.served.get(self.path, 0) + 1
        body = BIG if self.path == "/big" else PAGE
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Cache-Control", "max-age=600")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def get(port: int, path: str, accept: str) -> tuple[str, str, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("GET", path, headers={"Accept-Encoding": accept})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.getheader("content-encoding", "identity"), resp.getheader("cache-status", ""), len(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edge", default=str(BIN / "edge"))
    args = ap.parse_args()
    origin_port, edge_port = free_port(), free_port()
    server = ThreadingHTTPServer(("127.0.0.1", origin_port), Origin)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    work = Path(tempfile.mkdtemp(prefix="edge-variants-"))
    edge = subprocess.Popen([args.edge, "run", "--origin", f"http://127.0.0.1:{origin_port}",
                             "--listen", f"127.0.0.1:{edge_port}", "--confdir", str(work)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=Path(args.edge).parents[2])      # its checkout: an empty PYTHONPATH entry reads the cwd
    try:
        wait_for_port(edge_port)
        codings = ("br", "zstd", "gzip", "identity")
        first = [get(edge_port, "/page", c) for c in codings]
        again = [get(edge_port, "/page", c) for c in codings]
        print(f"four codings: origin fetches {Origin.served.get('/page', 0)} "
              f"(sent {[f[0] for f in first]}; second round: {[a[1].split(';')[1].strip() for a in again]})")
        stalls: list[float] = []
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                t = time.perf_counter()
                get(edge_port, "/page", "br")
                stalls.append(time.perf_counter() - t)
                time.sleep(0.01)
        poller = threading.Thread(target=poll)
        poller.start()
        t = time.perf_counter()
        coding, _, size = get(edge_port, "/big", "br")
        took = time.perf_counter() - t
        done.set()
        poller.join()
        print(f"50 MiB with br: {coding} {len(BIG) >> 20} MiB -> {size / 2**20:.1f} MiB in {took:.2f} s; "
              f"small hits meanwhile: {len(stalls)}, slowest {max(stalls) * 1000:.0f} ms, "
              f"median {sorted(stalls)[len(stalls) // 2] * 1000:.1f} ms")
    finally:
        edge.terminate()
        edge.wait(10)
        server.shutdown()


if __name__ == "__main__":
    main()
