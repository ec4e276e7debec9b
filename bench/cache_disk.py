"""A disk hit of a 1 MiB object against a memory hit of the same object, in one run.

    .venv/bin/python bench/cache_disk.py [--seconds 5] [--rounds 3] [--connections 4]

Two `edge run` processes in front of one nginx origin serving /one.bin (1 MiB, fresh for an
hour): "memory" keeps it in the memory tier (cache.max_object 2MB); "disk" has cache.max_object
512KB and a cache.disk directory, so every hit is read from disk. wrk is pinned to CPU 0 and
the edges to CPU 1; rounds alternate between the two and the medians are printed. A disk hit
reads the body whole today (the streaming relay will send it from the file), so the figure is
the index lookup plus a 1 MiB read. The directory is on the machine's temporary filesystem,
and the page cache keeps the file hot after the first read: this measures the edge's overhead,
not the disk. About a minute with the defaults; `make bench` (bench/bench.py) runs it too, with
3-second measurements.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BIN, NGINX_CONF, free_port, median_result, pinned, wait_for_port, wrk  # noqa: E402

SIZE = 2**20
EDGES = {
    "memory": "cache: {{max_size: 64MB, max_object: 2MB}}\n",
    "disk": "cache: {{max_size: 64MB, max_object: 512KB, disk: {{path: {dir}/disk, max_size: 1GB}}}}\n",
}


def disk_vs_memory(seconds: int, rounds: int, connections: int) -> list[str]:
    """Measure both edges (alternating rounds, medians); the report's lines."""
    for tool in ("wrk", "nginx"):
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists()):
            raise SystemExit(f"bench: needs {tool} (apt-get install wrk nginx-light)")
    work = Path(tempfile.mkdtemp(prefix="edge-disk-"))
    work.chmod(0o755)
    (work / "www").mkdir()
    (work / "www" / "one.bin").write_bytes(bytes(range(256)) * (SIZE // 256))
    origin = free_port()
    (work / "nginx.conf").write_text(NGINX_CONF.format(dir=work, port=origin, port2=free_port(), port3=free_port()))
    procs = [subprocess.Popen([shutil.which("nginx") or "/usr/sbin/nginx", "-c", work / "nginx.conf", "-p", work])]
    urls = {}
    try:
        wait_for_port(origin)
        for name, cache in EDGES.items():
            port = free_port()
            (work / f"{name}.yaml").write_text(f"listen: 127.0.0.1:{port}\n"
                                               f"pools: {{o: {{origins: [http://127.0.0.1:{origin}]}}}}\n"
                                               + cache.format(dir=work))
            procs.append(subprocess.Popen(pinned(1, [BIN / "edge", "run", "-c", work / f"{name}.yaml",
                                                     "--confdir", work / "conf"]),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_for_port(port)
            urls[name] = f"http://127.0.0.1:{port}/one.bin"
            for _ in range(2):                               # store it, then check it is a hit
                with urllib.request.urlopen(urls[name]) as r:
                    body, status = r.read(), r.headers["cache-status"]
            if len(body) != SIZE or not status.startswith("edge; hit"):
                raise SystemExit(f"bench: {name} edge did not hit: {status}")
        stored = sum(p.stat().st_size for p in (work / "disk").rglob("*.val"))
        runs: dict[str, list] = {name: [] for name in EDGES}
        for _ in range(rounds):
            for name, url in urls.items():
                wrk(url, connections, 1)                    # warm-up
                runs[name].append((wrk(url, connections, seconds), wrk(url, 1, seconds)))
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGQUIT if proc is procs[0] else signal.SIGINT)
            proc.wait(15)
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"1 MiB object, loopback, wrk -c{connections} and -c1 for {seconds}s x {rounds} rounds "
             f"(medians); disk tier file {stored} bytes"]
    res = {}
    for name, pairs in runs.items():
        loaded, single = median_result([p[0] for p in pairs]), median_result([p[1] for p in pairs])
        res[name] = loaded
        lines.append(f"  {name:6s} hit: {loaded.rps:8.1f} req/s ({loaded.rps * SIZE / 2**20:7.1f} MiB/s), "
                     f"p50 {loaded.p50:6.2f} ms, p99 {loaded.p99:6.2f} ms; one client p50 {single.p50:6.2f} ms; "
                     f"errors {loaded.errors + single.errors}")
    lines.append(f"  disk/memory throughput: {res['disk'].rps / res['memory'].rps:.2f}x")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=4)
    args = ap.parse_args()
    print("\n".join(disk_vs_memory(args.seconds, args.rounds, args.connections)))


if __name__ == "__main__":
    main()
