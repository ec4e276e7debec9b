"""The cost of sites and routes, measured alone: `edge run` forwarding and `edge run` with
3 sites and 10 routes (bench.py's SITES), the same browser-like request to the same nginx origin,
interleaved for more rounds than `make bench` gives this one ratio (issue 11's goal: the
routing costs < 5 % of forwarding throughput).

    .venv/bin/python bench/sites.py [--rounds 8 --seconds 5]     # about 1.5 minutes

wrk pinned to CPU 0, nginx and both edges to CPU 1; prints each round's ratio and the median.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench import BIN, BROWSER, NGINX_CONF, SITES, free_port, pinned, stop, wait_for_port, wrk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--connections", type=int, default=10)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edge-bench-sites-"))
    work.chmod(0o755)
    (work / "www").mkdir()
    (work / "www" / "index.html").write_bytes(b"x" * 1024)
    origin_port, port2, port3, plain_port, sites_port = (free_port() for _ in range(5))
    (work / "nginx.conf").write_text(NGINX_CONF.format(dir=work, port=origin_port, port2=port2, port3=port3))
    (work / "sites.yaml").write_text(SITES.format(listen=sites_port, a=origin_port, b=port2))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    systems = {
        "forwarding": [BIN / "edge", "run", "--origin", f"http://127.0.0.1:{origin_port}",
                       "--listen", f"127.0.0.1:{plain_port}", "--confdir", work / "conf"],
        "3 sites, 10 routes": [BIN / "edge", "run", "-c", work / "sites.yaml", "--confdir", work / "conf"],
    }
    ports = {"forwarding": plain_port, "3 sites, 10 routes": sites_port}
    procs = [subprocess.Popen(pinned(1, [nginx, "-c", work / "nginx.conf", "-p", work]))]
    ratios = []
    try:
        for cmd in systems.values():
            procs.append(subprocess.Popen(pinned(1, cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in ports.values():
            wait_for_port(port)
        for n in range(args.rounds):
            rps = {}
            for name, port in ports.items():
                url = f"http://127.0.0.1:{port}/index.html"
                wrk(url, args.connections, 1, BROWSER)
                rps[name] = wrk(url, args.connections, args.seconds, BROWSER).rps
            ratios.append(rps["3 sites, 10 routes"] / rps["forwarding"])
            print(f"round {n + 1}: forwarding {rps['forwarding']:.0f} req/s, 3 sites and 10 routes "
                  f"{rps['3 sites, 10 routes']:.0f} req/s: {ratios[-1]:.3f}x")
    finally:
        stop(procs, work)
    print(f"3 sites and 10 routes vs forwarding, median of {args.rounds} interleaved rounds: "
          f"{statistics.median(ratios):.3f}x (goal >= 0.95)")


if __name__ == "__main__":
    main()
