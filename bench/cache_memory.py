"""Memory bound of the cache: fill it with distinct 100 KiB objects to several times
`cache.max_size` and watch the edge's resident memory.

    .venv/bin/python bench/cache_memory.py [--max-size-mb 64] [--fill 3]

Prints RSS after each multiple of max_size; growth should stop near max_size plus a constant.
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import BIN, NGINX_CONF, free_port, wait_for_port

OBJECT = 100 * 1024


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("bench: no VmRSS")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-size-mb", type=int, default=64)
    ap.add_argument("--fill", type=int, default=3, help="how many times max_size to request")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edge-mem-"))
    work.chmod(0o755)
    (work / "www").mkdir()
    (work / "www" / "big.bin").write_bytes(b"m" * OBJECT)
    origin_port, edge_port = free_port(), free_port()
    (work / "nginx.conf").write_text(NGINX_CONF.format(dir=work, port=origin_port))
    (work / "edge.yaml").write_text(
        f"listen: 127.0.0.1:{edge_port}\npools: {{o: {{origins: [http://127.0.0.1:{origin_port}]}}}}\n"
        f"cache: {{max_size: {args.max_size_mb}MB, max_object: 1MB}}\n")
    nginx = subprocess.Popen([shutil.which("nginx") or "/usr/sbin/nginx", "-c", work / "nginx.conf", "-p", work])
    edge = subprocess.Popen([BIN / "edge", "run", "-c", work / "edge.yaml", "--confdir", work / "conf"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(origin_port)
        wait_for_port(edge_port)
        conn = http.client.HTTPConnection("127.0.0.1", edge_port)
        per_fill = args.max_size_mb * 2**20 // OBJECT
        n = 0

        def get(path: str) -> str:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            return resp.getheader("cache-status", "")

        for i in range(20):                  # warm up code paths with one cached object
            get("/big.bin?warm")
        base = rss_mib(edge.pid)
        print(f"cache.max_size {args.max_size_mb} MiB, objects of {OBJECT // 1024} KiB; edge RSS at start {base:.1f} MiB")
        for fill in range(1, args.fill + 1):
            for _ in range(per_fill):
                status = get(f"/big.bin?i={n}")
                n += 1
            assert "stored" in status, status
            rss = rss_mib(edge.pid)
            print(f"after {n:5d} objects ({fill}x max_size requested): RSS {rss:7.1f} MiB, "
                  f"growth {rss - base:6.1f} MiB = max_size + {rss - base - args.max_size_mb:5.1f} MiB")
        first = get("/big.bin?i=0")
        print(f"first object now: {first!r} (evicted if fwd=uri-miss)")
    finally:
        edge.send_signal(signal.SIGINT)
        edge.wait(15)
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(15)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
