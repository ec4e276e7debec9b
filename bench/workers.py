"""Workers: `edge run --workers 2` against `--workers 1`, forwarding and cache hits, each also
against plain mitmdump (reverse mode), in one run.

    .venv/bin/python bench/workers.py [--seconds 10] [--rounds 3] [--connections 16]

wrk is pinned to CPU 0 as in bench/bench.py; the edges, mitmdump and the nginx origin are not
pinned (two workers need both cores: on a 2-core machine wrk shares CPU 0 with one of them,
as it does with the single worker, which the scheduler may put anywhere). Rounds interleave the
systems and the medians are printed. The goal: 2 workers >= 1.8x one worker. The connections
are spread over the workers by the kernel (SO_REUSEPORT hashes each connection): with few
connections the split can be uneven, hence 16 by default. About 4 minutes with the defaults.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BIN, NGINX_CONF, free_port, median_result, stop, wait_for_port, wrk  # noqa: E402


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its children (a supervisor's workers)."""
    total = 0.0
    for p in (pid, *children(pid)):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def machine_busy() -> float:
    """CPU seconds the whole machine spent not idle (all CPUs), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10, help="per measurement")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    args = ap.parse_args()
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            raise SystemExit(f"bench: needs {tool} (apt-get install wrk nginx-light)")
    work = Path(tempfile.mkdtemp(prefix="edge-bench-workers-"))
    work.chmod(0o755)                   # nginx's workers drop root and must read the page
    (work / "www").mkdir()
    for page in ("index.html", "cached.html"):          # no-store (forwarded), fresh for an hour (hits)
        (work / "www" / page).write_bytes(b"x" * 1024)
    origin_port, mitm_port, one_port, two_port = free_port(), free_port(), free_port(), free_port()
    (work / "nginx.conf").write_text(NGINX_CONF.format(dir=work, port=origin_port, port2=free_port(),
                                                       port3=free_port()))
    origin = f"http://127.0.0.1:{origin_port}"

    def edge(port: int, workers: int) -> list:
        return [BIN / "edge", "run", "--origin", origin, "--listen", f"127.0.0.1:{port}", "--workers", str(workers),
                "--confdir", work / "conf"]
    systems = {      # name: (command, port, path)
        "plain mitmdump -q": ([BIN / "mitmdump", "-q", "--mode", f"reverse:{origin}@127.0.0.1:{mitm_port}",
                               "--set", f"confdir={work / 'conf'}"], mitm_port, "/index.html"),
        "edge 1 worker, forwarding": (edge(one_port, 1), one_port, "/index.html"),
        "edge 2 workers, forwarding": (edge(two_port, 2), two_port, "/index.html"),
        "edge 1 worker, cache hit": (None, one_port, "/cached.html"),
        "edge 2 workers, cache hit": (None, two_port, "/cached.html"),
    }
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    procs = [subprocess.Popen([nginx, "-c", work / "nginx.conf", "-p", work])]
    try:
        for cmd, _, _ in systems.values():
            if cmd:
                procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        runs: dict[str, list] = {name: [] for name in systems}
        for name, (_, port, _) in systems.items():
            wait_for_port(port)
        if dead := [p.args[:3] for p in procs if p.poll() is not None]:
            raise SystemExit(f"bench: exited before the load: {dead}")     # another would answer on its port
        owner = {"plain mitmdump -q": procs[1], "edge 1 worker, forwarding": procs[2],
                 "edge 2 workers, forwarding": procs[3], "edge 1 worker, cache hit": procs[2],
                 "edge 2 workers, cache hit": procs[3]}
        cpu: dict[str, list] = {name: [] for name in systems}
        machine: dict[str, list] = {name: [] for name in systems}
        for _ in range(args.rounds):            # interleaved, so drift hits every system alike
            for name, (_, port, path) in systems.items():
                url = f"http://127.0.0.1:{port}{path}"
                wrk(url, args.connections, 1)                  # warm-up (and fills each worker's cache)
                before, busy = tree_cpu(owner[name].pid), machine_busy()
                runs[name].append(wrk(url, args.connections, args.seconds))
                requests = runs[name][-1].rps * args.seconds
                cpu[name].append((tree_cpu(owner[name].pid) - before) / requests * 1e6)
                machine[name].append((machine_busy() - busy) / args.seconds)
    finally:
        stop(procs, work)
    results = {name: median_result(r) for name, r in runs.items()}
    plain = results["plain mitmdump -q"].rps
    print(f"\nGET of 1 KiB; loopback, wrk pinned to CPU 0, the systems unpinned on {os.cpu_count()} CPUs; "
          f"median of {args.rounds} interleaved rounds of {args.seconds}s at c={args.connections}")
    print(f"{'system':28} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs mitmdump':>12} {'errors':>7} "
          f"{'us CPU/req':>11} {'CPUs busy':>10}")
    for name, r in results.items():
        print(f"{name:28} {r.rps:9.0f} {r.p50:8.2f} {r.p99:8.2f} {r.rps / plain:11.2f}x {r.errors:7d} "
              f"{statistics.median(cpu[name]):11.0f} {statistics.median(machine[name]):10.2f}")
    print("(us CPU/req: the system's processes, supervisor and workers together; CPUs busy: the whole machine,\n"
          " wrk and the origin included: where it reaches the CPU count, the machine, not the edge, is the limit)")
    for kind in ("forwarding", "cache hit"):
        one, two = results[f"edge 1 worker, {kind}"].rps, results[f"edge 2 workers, {kind}"].rps
        print(f"{kind}: 2 workers vs 1: {two / one:.2f}x (goal >= 1.8x); vs plain mitmdump "
              f"{one / plain:.2f}x and {two / plain:.2f}x")


if __name__ == "__main__":
    main()
