"""Throughput and latency on loopback, all in one run: direct origin, plain mitmdump, edge.

    make bench                      # or: .venv/bin/python bench/bench.py [--seconds 10]

wrk drives the load pinned to CPU 0; the system under test is pinned to CPU 1 (on a 2-core
machine). The origin is nginx serving a 1 KiB body. Figures drift between machines: compare
the ratios, which come from the same run. Then, from bench/cache_disk.py, a disk hit of a 1 MiB
object against a memory hit of the same (its own nginx and two edges, --disk-seconds per
measurement, 3 rounds: about 45 s). About 13 minutes in all with the defaults.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
# /index.html must not be stored by edge's cache (the forwarding figure); /cached.html is
# fresh for an hour (the cache-hit figure); /big/ serves distinct 100 KiB objects per query.
# nginx listens on three ports: the routing figure balances over them as three origins.
NGINX_CONF = """\
daemon off; worker_processes 1; pid {dir}/nginx.pid; error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{port}; listen 127.0.0.1:{port2}; listen 127.0.0.1:{port3}; root {dir}/www;
    location = /index.html {{ add_header Cache-Control no-store; }}
    location / {{ expires 1h; }} }} }}
"""


# The same forwarding as `edge run --origin`, plus what issue 4 adds on every request: geo
# steering from a trusted X-Forwarded-For (the embedded database), weighted balancing over two
# origins, active health checks, slow start, a fallback pool.
ROUTED = """\
listen: 127.0.0.1:{listen}
trusted_proxies: [127.0.0.1/32]
pools:
  eu:
    origins: [{{url: http://127.0.0.1:{a}, weight: 3}}, {{url: http://127.0.0.1:{b}, weight: 1}}]
    health: {{path: /cached.html, interval: 1s, timeout: 500ms}}
    slow_start: 10s
    location: {{lat: 50.11, lon: 8.68}}
    fallback: us
  us:
    origins: [http://127.0.0.1:{c}]
    health: {{path: /cached.html, interval: 1s, timeout: 500ms}}
    location: {{lat: 39.04, lon: -77.49}}
routing:
  default_pool: us
  geo: {{countries: {{US: us}}, continents: {{EU: eu, NA: us}}, nearest: true}}
"""


# Issue 11: three sites and ten routes in front of the same origin (the request takes the
# longest prefix of shop.example's routes, after exact and wildcard host lookups), against the
# plain forwarding figure.
SITES = """\
listen: 127.0.0.1:{listen}
pools: {{p: {{origins: [http://127.0.0.1:{a}]}}, q: {{origins: [http://127.0.0.1:{b}]}}}}
routing: {{default_pool: p}}
sites:
  shop:
    hosts: [shop.example, "*.shop.example"]
    headers: {{response: {{set: {{X-Frame-Options: DENY}}}}}}
    routes:
      - {{path: /, pool: p}}
      - {{path: /api/, pool: q, strip_prefix: true}}
      - {{path: /api/v2/, pool: q}}
      - {{path: /static/, pool: p, cache: {{default_ttl: 1h}}}}
      - {{path: /index, pool: p, methods: [GET, HEAD]}}
      - {{path: /index.html, pool: q, headers: {{X-Beta: "1"}}}}
  blog:
    hosts: [blog.example]
    routes: [{{path: /, pool: q, origin_path: /blog}}, {{path: /feed/, pool: q}}]
  docs:
    hosts: [docs.example, "*.docs.example"]
    routes: [{{path: /, pool: p}}, {{path: /v1/, pool: q, strip_prefix: true}}]
default_site: null
"""


# The shield without and with the WAF on every request (limits generous enough never to refuse
# the benchmark), and an edge whose rate limit refuses everything after the first request (the
# cost of a refusal).
LIMITS_ONLY = """\
listen: 127.0.0.1:{listen}
pools: {{p: {{origins: [http://127.0.0.1:{a}]}}}}
shield:
  connections_per_ip: 10000
  rate_limit: {{rate: 1000000/s, burst: 1000000}}
  bots: {{block: [scanner, bad]}}
"""
SHIELDED = LIMITS_ONLY + "  waf: {{paranoia: 1, anomaly_threshold: 5}}\n"
REFUSING = """\
listen: 127.0.0.1:{listen}
pools: {{p: {{origins: [http://127.0.0.1:{a}]}}}}
shield:
  rate_limit: {{rate: 1/h, burst: 1}}
"""
BROWSER = ("Host: shop.example", "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
           "Accept: text/html,application/xhtml+xml")


_GIVEN: set[int] = set()


def free_port() -> int:
    """A free loopback port not handed out before in this run: the kernel may give a closed
    port again, and two systems told one port would measure one of them twice (with
    SO_REUSEPORT workers, the one that bound first answers for both)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def wait_for_port(port: int, timeout: float = 20, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench: nothing listening on {host}:{port}")


def pinned(cpu: int, args: list) -> list:
    return ["taskset", "-c", str(cpu), *map(str, args)] if shutil.which("taskset") and os.cpu_count() > 1 else args


@dataclass
class Result:
    rps: float
    p50: float
    p99: float
    errors: int


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]


def wrk(url: str, connections: int, seconds: int, headers: tuple[str, ...] = ()) -> Result:
    extra = [a for h in headers for a in ("-H", h)]
    out = subprocess.run(pinned(0, ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", *extra, url]),
                         capture_output=True, text=True, check=True).stdout
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    errors = sum(map(int, m.groups())) if (m := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)) else 0
    errors += int(m[1]) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    return Result(float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1]), _ms(lat["50"]), _ms(lat["99"]), errors)


def median_result(results: list[Result]) -> Result:
    return Result(statistics.median(r.rps for r in results), statistics.median(r.p50 for r in results),
                  statistics.median(r.p99 for r in results), sum(r.errors for r in results))


def stop(procs: list, work: Path) -> None:
    """The edges and mitmdump (SIGINT), then nginx (the first, SIGQUIT), then the work folder."""
    for p in procs[1:]:
        p.send_signal(signal.SIGINT)
        p.wait(15)
    procs[0].send_signal(signal.SIGQUIT)
    procs[0].wait(15)
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10, help="per measurement")
    ap.add_argument("--connections", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    ap.add_argument("--disk-seconds", type=int, default=3, help="per measurement of the disk vs memory hit")
    args = ap.parse_args()
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            raise SystemExit(f"bench: needs {tool} (apt-get install wrk nginx-light)")

    work = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    work.chmod(0o755)                   # nginx's workers drop root and must read the page
    (work / "www").mkdir()
    (work / "www" / "index.html").write_bytes(b"x" * 1024)
    (work / "www" / "cached.html").write_bytes(b"x" * 1024)
    text = b"".join(b"<tr><td>row %d</td><td>edge bench text, compressible like a real page</td></tr>\n" % i
                    for i in range(2000))[:100 * 1024]
    (work / "www" / "page100k.html").write_bytes(text)
    origin_port, mitm_port, edge_port, routed_port = free_port(), free_port(), free_port(), free_port()
    port2, port3, shielded_port, refusing_port = free_port(), free_port(), free_port(), free_port()
    limits_port, sites_port = free_port(), free_port()
    (work / "sites.yaml").write_text(SITES.format(listen=sites_port, a=origin_port, b=port2))
    (work / "limits.yaml").write_text(LIMITS_ONLY.format(listen=limits_port, a=origin_port))
    (work / "shielded.yaml").write_text(SHIELDED.format(listen=shielded_port, a=origin_port))
    (work / "refusing.yaml").write_text(REFUSING.format(listen=refusing_port, a=origin_port))
    (work / "nginx.conf").write_text(NGINX_CONF.format(dir=work, port=origin_port, port2=port2, port3=port3))
    (work / "routed.yaml").write_text(ROUTED.format(listen=routed_port, a=origin_port, b=port2, c=port3))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    origin = f"http://127.0.0.1:{origin_port}"
    edge = [BIN / "edge", "run", "--origin", origin, "--listen", f"127.0.0.1:{edge_port}", "--confdir", work / "conf"]
    br = ("Accept-Encoding: br",)
    systems = {      # name: (command, port, path, request headers)
        "direct origin (nginx)": (None, origin_port, "/index.html", ()),
        "plain mitmdump -q": ([BIN / "mitmdump", "-q", "--mode", f"reverse:{origin}@127.0.0.1:{mitm_port}",
                               "--set", f"confdir={work / 'conf'}"], mitm_port, "/index.html", ()),
        "edge run (forwarding)": (edge, edge_port, "/index.html", ()),
        "edge run (cache hit)": (None, edge_port, "/cached.html", ()),
        "edge routing+health+geo": ([BIN / "edge", "run", "-c", work / "routed.yaml", "--confdir", work / "conf"],
                                    routed_port, "/index.html", ("X-Forwarded-For: 81.2.69.160",)),
        "edge forwarding, browser": (None, edge_port, "/index.html", BROWSER),
        "edge 3 sites, 10 routes": ([BIN / "edge", "run", "-c", work / "sites.yaml", "--confdir", work / "conf"],
                                    sites_port, "/index.html", BROWSER),
        "edge shield w/o WAF, browser": ([BIN / "edge", "run", "-c", work / "limits.yaml", "--confdir", work / "conf"],
                                         limits_port, "/index.html", BROWSER),
        "edge shield+WAF, browser": ([BIN / "edge", "run", "-c", work / "shielded.yaml", "--confdir", work / "conf"],
                                     shielded_port, "/index.html", BROWSER),
        "edge refusing (429)": ([BIN / "edge", "run", "-c", work / "refusing.yaml", "--confdir", work / "conf"],
                                refusing_port, "/index.html", BROWSER),
        "plain mitmdump 100 KiB": (None, mitm_port, "/page100k.html", br),
        "edge hit 100 KiB br": (None, edge_port, "/page100k.html", br),
    }
    procs = [subprocess.Popen(pinned(1, [nginx, "-c", work / "nginx.conf", "-p", work]))]
    try:
        for cmd, _, _, _ in systems.values():
            if cmd:
                procs.append(subprocess.Popen(pinned(1, cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        sizes = {}
        for name, (_, port, path, headers) in systems.items():
            wait_for_port(port)
            check = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                                    *[a for h in headers for a in ("-H", h)], f"http://127.0.0.1:{port}{path}"],
                                   capture_output=True, text=True).stdout.split()
            if check[0] != "200":              # (the refusing edge lets its first request through)
                raise SystemExit(f"bench: {name} answered {check!r}, not 200")
            sizes[name] = int(check[1])
        runs: dict[str, list[tuple[Result, Result]]] = {name: [] for name in systems}
        for _ in range(args.rounds):            # interleaved, so drift hits every system alike
            for name, (_, port, path, headers) in systems.items():
                url = f"http://127.0.0.1:{port}{path}"
                wrk(url, args.connections, 1, headers)                 # warm-up (and fills the cache)
                runs[name].append((wrk(url, args.connections, args.seconds, headers),
                                   wrk(url, 1, args.seconds, headers)))
    finally:
        stop(procs, work)
    results = {name: (median_result([m for m, _ in r]), median_result([o for _, o in r])) for name, r in runs.items()}

    plain = results["plain mitmdump -q"][0].rps
    direct_p50 = results["direct origin (nginx)"][1].p50
    print("\nGET of 1 KiB unless named; bytes on the wire: "
          + ", ".join(f"{n} {sizes[n]}" for n in systems if "100 KiB" in n))
    print(f"loopback, wrk pinned to CPU 0, systems under test to CPU 1; "
          f"median of {args.rounds} interleaved rounds of {args.seconds}s")
    print(f"{'system':24} {'req/s c=' + str(args.connections):>12} {'p50 ms':>8} {'p99 ms':>8} {'vs mitmdump':>12}"
          f" {'req/s c=1':>10} {'p50 ms c=1':>11} {'errors':>7}")
    for name, (many, one) in results.items():
        print(f"{name:24} {many.rps:12.0f} {many.p50:8.2f} {many.p99:8.2f} {many.rps / plain:11.2f}x"
              f" {one.rps:10.0f} {one.p50:11.3f} {many.errors + one.errors:7d}")
    big_plain, big_edge = results["plain mitmdump 100 KiB"][0], results["edge hit 100 KiB br"][0]
    print(f"\n100 KiB page: edge cache hit, br-compressed ({sizes['edge hit 100 KiB br']} bytes), "
          f"{big_edge.rps:.0f} req/s vs plain mitmdump (identity) {big_plain.rps:.0f} req/s: "
          f"{big_edge.rps / big_plain.rps:.2f}x")
    edge_many, edge_one = results["edge run (forwarding)"]
    print(f"\nedge forwarding vs plain mitmdump at c={args.connections}: {edge_many.rps / plain:.2f}x (goal >= 2.0x)")
    routed = results["edge routing+health+geo"][0]
    print(f"edge routing+health+geo vs edge forwarding at c={args.connections}: "
          f"{routed.rps / edge_many.rps:.2f}x (goal >= 0.95)")
    plain_fwd, waf = results["edge forwarding, browser"], results["edge shield+WAF, browser"]
    sites = results["edge 3 sites, 10 routes"][0]
    print(f"edge 3 sites and 10 routes vs edge forwarding (same browser-like request) at c={args.connections}: "
          f"{sites.rps / plain_fwd[0].rps:.2f}x (goal >= 0.95)")
    print(f"edge shield+WAF vs edge forwarding (same browser-like request) at c={args.connections}: "
          f"{waf[0].rps / plain_fwd[0].rps:.2f}x; the shield costs {1000 / waf[0].rps - 1000 / plain_fwd[0].rps:.2f} ms "
          f"of CPU per request, {waf[1].p50 - plain_fwd[1].p50:.2f} ms of p50 at c=1")
    limits = results["edge shield w/o WAF, browser"][0]
    print(f"edge shield without the WAF (lists, limits, bots, deadlines) vs edge forwarding: "
          f"{limits.rps / plain_fwd[0].rps:.2f}x; the WAF alone costs "
          f"{1000 / waf[0].rps - 1000 / limits.rps:.2f} ms of CPU per request")
    refused = results["edge refusing (429)"][0]
    print(f"edge refusing (429) vs edge forwarding at c={args.connections}: {refused.rps / plain_fwd[0].rps:.2f}x "
          f"the requests/s (a refusal is cheaper than a forwarded request when > 1)")
    hit = results["edge run (cache hit)"][0]
    print(f"edge cache hit vs plain mitmdump at c={args.connections}: {hit.rps / plain:.2f}x (goal >= 3.0x), "
          f"p99 {hit.p99:.2f} ms vs {results['plain mitmdump -q'][0].p99:.2f} ms")
    plain_added = results["plain mitmdump -q"][1].p50 - direct_p50
    print(f"edge p50 added over direct at c=1: {edge_one.p50 - direct_p50:.3f} ms (goal <= 0.6 ms); "
          f"plain mitmdump adds {plain_added:.3f} ms, so edge adds {(edge_one.p50 - direct_p50) / plain_added:.2f}x of that")
    from cache_disk import disk_vs_memory      # (it imports this module's helpers)
    print("\ndisk hit vs memory hit, " + "\n".join(disk_vs_memory(args.disk_seconds, args.rounds, 4)), flush=True)


if __name__ == "__main__":
    main()
