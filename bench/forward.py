"""Forward mode (issue 15): what the lists cost, and the proxy's throughput against plain mitmdump.

    .venv/bin/python bench/forward.py lists          # ~1 min: 100,000 listed domains per format
    .venv/bin/python bench/forward.py throughput     # ~4 min: edge forward vs mitmdump --mode regular
    .venv/bin/python bench/forward.py                # both

lists: 100,000 generated domains (several TLDs, ccTLD second levels among them) written as a
plain list, a hosts file, an adblock list of `||host^` rules and an adblock list with 10% url
rules. Each is loaded in a fresh process: load time (CPU seconds, as every time here: other
processes on this shared machine do not count), the memory the list holds (tracemalloc's count
of Python objects still alive, and the process's RSS growth, which also sees adblock-rust's
engine), then one `matches()` for a listed subdomain, an unlisted host (a 4-label miss walks
every suffix), an IDN host (500 hosts asked 10 times: matches() keeps the last 4096 encodings)
and, for the list with url rules, a url through the engine; and one policy decision as the
issue's example makes it on a miss (three lists of 100,000 asked in turn).

throughput: nginx over TLS on loopback (its own CA) serving 1 KiB and 16 MiB files; four proxies
pinned to CPU 1, the client processes to CPU 0:
  edge forward -c (100,000 listed domains, `{list: ads, action: block}` first; tunnels: no
  intercept section; intercepted: `{action: intercept}` and the CA of `edge forward ca init`),
  and mitmdump --mode regular (tunnels: --ignore-hosts '.*'; intercepted: the same CA as confdir).
Three loads each, interleaved over --rounds rounds of --seconds: requests over kept-alive tunnels
(HTTP/1.1 keep-alive inside TLS inside CONNECT), a new tunnel per request (CONNECT + TLS + one
GET), and bulk bytes (16 MiB bodies). Prints the medians: requests/s (or MiB/s), the proxy's CPU
microseconds per request (or per MiB; steadier than rates on a shared machine), and edge/mitmdump
ratios. Every process started is stopped at the end.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import BIN, free_port, pinned, wait_for_port            # noqa: E402  (bench/bench.py)
from cpu_ab import cpu_seconds                                     # noqa: E402

COUNT = 100_000
TLDS = ("com", "net", "org", "de", "co.uk", "com.au", "io", "info", "fr", "co.jp")
FORMATS = ("plain", "hosts", "adblock-hosts", "adblock-urls")


# --- lists ---------------------------------------------------------------------------------

def domains(count: int = COUNT) -> list[str]:
    """`count` distinct registrable-looking domains, some with a subdomain label (seeded)."""
    rng = random.Random(15)
    made = []
    for i in range(count):
        name = f"{rng.choice(('ads', 'track', 'cdn', 'pix', 'srv', 'go'))}{i}-{rng.randrange(10**6):06d}"
        made.append(f"{name}.{TLDS[i % len(TLDS)]}" if i % 3 else f"www.{name}.{TLDS[i % len(TLDS)]}")
    return made


def write_lists(folder: Path) -> dict[str, Path]:
    listed = domains()
    texts = {
        "plain": "# generated\n" + "".join(f"{d}\n" for d in listed),
        "hosts": "# generated\n127.0.0.1 localhost\n" + "".join(f"0.0.0.0 {d}\n" for d in listed),
        "adblock-hosts": "[Adblock Plus 2.0]\n! generated\n" + "".join(f"||{d}^\n" for d in listed),
        "adblock-urls": "[Adblock Plus 2.0]\n! generated\n" + "".join(
            f"||{d}/ads/\n" if i % 20 == 0 else f"/banner{i}/*\n" if i % 20 == 1 else f"||{d}^\n"
            for i, d in enumerate(listed)),
    }
    paths = {}
    for kind, text in texts.items():
        paths[kind] = folder / f"{kind}.txt"
        paths[kind].write_text(text)
    return paths


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def per_call_ns(function, hosts: list, repeat: int = 5) -> float:
    """The best of `repeat` rounds, CPU nanoseconds per call over `hosts` (CPU time: other
    processes on this shared machine do not count)."""
    best = min(timeit.repeat(lambda: [function(*h) for h in hosts], number=1, repeat=repeat, timer=time.process_time))
    return best / len(hosts) * 1e9


def measure_one(kind: str, path: str) -> dict:
    """Run in a fresh process: load, memory, per-call times of one list."""
    from addons.forward import lists
    lists._is_public_suffix("warm.example")           # the PSL's own load is not the list's
    before = rss_bytes()
    started = time.process_time()
    listed = lists.load_list(path, kind)
    load_s = time.process_time() - started
    rss_growth = rss_bytes() - before
    del listed
    tracemalloc.start()
    listed = lists.load_list(path, kind)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    listed_domains = domains()
    rng = random.Random(7)
    chosen = [rng.randrange(len(listed_domains)) for _ in range(20000)]
    hits = [(f"img.{listed_domains[i]}",) for i in chosen]
    # in the list with url rules, every 20th domain has a path rule and the next a /bannerN/ rule: no host rule
    expected = sum(1 for i in chosen if kind != "adblock-urls" or i % 20 > 1)
    misses = [(f"a{i}.b{i}.unlisted-{i}.example",) for i in range(20000)]
    idn = [(f"bücher{i % 500}.example",) for i in range(5000)]         # 500 hosts asked 10 times each
    result = {"kind": kind, "rules": len(listed), "load_s": load_s, "held_mib": held / 2**20,
              "peak_mib": peak / 2**20, "rss_mib": rss_growth / 2**20,
              "hit_ns": per_call_ns(listed.matches, hits), "miss_ns": per_call_ns(listed.matches, misses),
              "idn_ns": per_call_ns(listed.matches, idn),
              "found": sum(listed.matches(*h) for h in hits), "expected": expected,
              "false": sum(listed.matches(*h) for h in misses)}
    if listed.engine is not None:
        urls = [(h[0], f"https://{h[0]}/news/article{i}.html") for i, h in enumerate(misses)]
        result["url_ns"] = per_call_ns(listed.matches, urls)
    if kind == "plain":                              # the example policy on a miss: three lists asked in turn
        three = [lists.load_list(path, name) for name in ("social", "malware")] + [listed]
        result["policy_miss_ns"] = per_call_ns(lambda h: any(x.matches(h) for x in three), misses)
    return result


def bench_lists() -> None:
    with tempfile.TemporaryDirectory(prefix="edge-forward-lists-") as folder:
        paths = write_lists(Path(folder))
        print(f"{COUNT:,} listed domains per list; one fresh process per format\n")
        print(f"{'format':14} {'rules':>8} {'load CPU s':>10} {'held MiB':>9} {'peak MiB':>9} {'RSS +MiB':>9} "
              f"{'hit us':>7} {'miss us':>8} {'IDN us':>7} {'url us':>7}")
        for kind in FORMATS:
            out = subprocess.run([sys.executable, __file__, "_one", kind, str(paths[kind])], check=True,
                                 capture_output=True, text=True).stdout
            r = json.loads(out)
            if r["found"] != r["expected"] or r["false"]:
                raise SystemExit(f"bench: {kind} answered wrong: {r['found']} hits of {r['expected']}, "
                                 f"{r['false']} false")
            url = f"{r['url_ns'] / 1000:7.2f}" if "url_ns" in r else f"{'-':>7}"
            print(f"{kind:14} {r['rules']:>8,} {r['load_s']:10.2f} {r['held_mib']:9.1f} {r['peak_mib']:9.1f} "
                  f"{r['rss_mib']:9.1f} {r['hit_ns'] / 1000:7.2f} {r['miss_ns'] / 1000:8.2f} "
                  f"{r['idn_ns'] / 1000:7.2f} {url}")
            if "policy_miss_ns" in r:
                policy = r["policy_miss_ns"] / 1000
        print(f"\nthe example policy on a miss (3 lists of {COUNT:,} asked in turn): {policy:.2f} us per request")


# --- throughput ----------------------------------------------------------------------------

NGINX_TLS = """\
daemon off; worker_processes 1; pid {dir}/nginx.pid; error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{ access_log off; keepalive_requests 1000000; sendfile on;
  server {{ listen 127.0.0.1:{port} ssl; ssl_certificate {dir}/origin.pem; ssl_certificate_key {dir}/origin.key;
    root {dir}/www; }} }}
"""
FORWARD_TUNNEL = """\
mode: forward
listen: 127.0.0.1:{port}
lists: {{ads: {lists}}}
policy:
  - {{list: ads, action: block}}
  - {{action: allow}}
activity_log: {dir}/activity-{port}.jsonl
connect_ports: [{origin_port}]
"""
FORWARD_INTERCEPT = """\
mode: forward
listen: 127.0.0.1:{port}
intercept: {{ca: {ca}}}
lists: {{ads: {lists}}}
policy:
  - {{list: ads, action: block}}
  - {{action: intercept}}
activity_log: {dir}/activity-{port}.jsonl
connect_ports: [{origin_port}]
"""


def origin_files(folder: Path) -> Path:
    """A CA, and nginx's certificate for 127.0.0.1 signed by it; returns the CA's PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    now = datetime.datetime.now(datetime.UTC)

    def cert(name, key, issuer, issuer_key, ca):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("bench origin CA", ca_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench origin CA")]),
              ca_key, True)
    pem = serialization.Encoding.PEM
    (folder / "origin-ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "origin.pem").write_bytes(cert("127.0.0.1", key, ca.subject, ca_key, False).public_bytes(pem))
    (folder / "origin.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    return folder / "origin-ca.pem"


def _read_response(tls: ssl.SSLSocket, buffer: bytearray) -> int:
    """One HTTP/1.1 response with a Content-Length off `tls`; returns its body's length."""
    while b"\r\n\r\n" not in buffer:
        chunk = tls.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response head")
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    body = len(rest)
    del buffer[:]
    while body < length:
        chunk = tls.recv(min(1 << 20, length - body))
        if not chunk:
            raise ConnectionError("closed mid-body")
        body += len(chunk)
    buffer += rest[length:] if len(rest) > length else b""
    return length


def _tunnel(proxy: int, origin: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", proxy), timeout=30)
    raw.sendall(f"CONNECT 127.0.0.1:{origin} HTTP/1.1\r\nHost: 127.0.0.1:{origin}\r\n\r\n".encode())
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = raw.recv(4096)
        if not chunk:
            raise ConnectionError("proxy closed the CONNECT")
        reply += chunk
    if not reply.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(reply.split(b"\r\n", 1)[0].decode(errors="replace"))
    return context.wrap_socket(raw)


def client(args: tuple) -> tuple[int, int, int]:
    """One client process: (requests, body bytes, errors) until the deadline."""
    proxy, origin, ca_file, load, deadline = args
    if hasattr(os, "sched_setaffinity") and os.cpu_count() > 1:
        os.sched_setaffinity(0, {0})
    context = ssl.create_default_context(cafile=ca_file)
    context.check_hostname = False                     # the chain is checked; the leaf names 127.0.0.1 either way
    path = "/big.bin" if load == "bulk" else "/1k.bin"
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{origin}\r\nUser-Agent: bench\r\n\r\n".encode()
    requests = size = errors = 0
    tls = None
    buffer = bytearray()
    while time.monotonic() < deadline:
        try:
            if tls is None:
                tls, buffer = _tunnel(proxy, origin, context), bytearray()
            tls.sendall(request)
            size += _read_response(tls, buffer)
            requests += 1
            if load == "new":
                tls.close()
                tls = None
        except (OSError, ConnectionError, StopIteration):
            errors += 1
            tls = None
            time.sleep(0.01)
    return requests, size, errors


def bench_throughput(seconds: int, rounds: int, clients: int) -> None:
    from click.testing import CliRunner

    from edgecli.forward_tools import ca
    work = Path(tempfile.mkdtemp(prefix="edge-forward-bench-"))
    work.chmod(0o755)
    procs: list[subprocess.Popen] = []
    try:
        (work / "www").mkdir()
        (work / "www" / "1k.bin").write_bytes(b"x" * 1024)
        (work / "www" / "big.bin").write_bytes(os.urandom(16 << 20))
        origin_ca = origin_files(work)
        lists = write_lists(work)["plain"]
        if CliRunner().invoke(ca, ["init", "--out", str(work / "ca")]).exit_code:
            raise SystemExit("bench: edge forward ca init failed")
        proxy_ca = work / "ca" / "mitmproxy-ca-cert.pem"
        origin = free_port()
        (work / "nginx.conf").write_text(NGINX_TLS.format(dir=work, port=origin))
        nginx = "/usr/sbin/nginx"
        procs.append(subprocess.Popen(pinned(0, [nginx, "-c", work / "nginx.conf", "-e", work / "error.log"])))
        wait_for_port(origin)
        trust = f"ssl_verify_upstream_trusted_ca={origin_ca}"
        systems = {}
        for name, template in (("edge forward tunnel", FORWARD_TUNNEL), ("edge forward intercept", FORWARD_INTERCEPT)):
            port = free_port()
            config = work / f"{port}.yaml"
            config.write_text(template.format(port=port, lists=lists, ca=work / "ca" / "mitmproxy-ca.pem", dir=work,
                                              origin_port=origin))     # CONNECT elsewhere than 443 is refused by default
            systems[name] = (port, [BIN / "edge", "forward", "-c", config, "--confdir", work / f"confdir-{port}",
                                    "--set", trust])
        for name, extra in (("mitmdump tunnel", ["--ignore-hosts", ".*"]), ("mitmdump intercept", [])):
            port = free_port()
            systems[name] = (port, [BIN / "mitmdump", "-q", "--mode", f"regular@127.0.0.1:{port}",
                                    "--set", f"confdir={work / 'ca'}", "--set", trust, *extra])
        running = {}
        for name, (port, command) in systems.items():
            proc = subprocess.Popen(pinned(1, command), stdout=subprocess.DEVNULL, stderr=open(work / f"{port}.err", "w"),
                                    cwd=REPO)
            procs.append(proc)
            wait_for_port(port, 60)
            running[name] = (port, proc)
        results: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
        with multiprocessing.Pool(clients) as pool:
            for _ in range(rounds):
                for load in ("keepalive", "new", "bulk"):
                    for name, (port, proc) in running.items():
                        ca_file = str(proxy_ca if "intercept" in name else origin_ca)
                        cpu = cpu_seconds(proc.pid)
                        started = time.monotonic()
                        deadline = started + seconds
                        done = pool.map(client, [(port, origin, ca_file, load, deadline)] * clients)
                        elapsed = time.monotonic() - started
                        requests, size, errors = (sum(x) for x in zip(*done))
                        used = cpu_seconds(proc.pid) - cpu
                        per = size / 2**20 if load == "bulk" else requests      # bulk: per MiB relayed
                        results.setdefault((name, load), []).append(
                            (per / elapsed, used / max(per, 1e-9) * 1e6, errors))
        report_throughput(results, clients, seconds, rounds)
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGQUIT if proc is procs[0] else signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


def report_throughput(results: dict, clients: int, seconds: int, rounds: int) -> None:
    print(f"\n{clients} client processes (CPU 0), proxies on CPU 1; medians of {rounds} rounds of {seconds} s")
    print(f"{'system':24} {'load':10} {'rate':>14} {'proxy CPU us/req (bulk: /MiB)':>30} {'errors':>7}")
    medians = {}
    for (name, load), runs in results.items():
        rate, cpu = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        medians[(name, load)] = (rate, cpu)
        unit = "MiB/s" if load == "bulk" else "req/s"
        print(f"{name:24} {load:10} {rate:8.1f} {unit:5} {cpu:30.0f} {sum(r[2] for r in runs):7}")
    print()
    for kind in ("tunnel", "intercept"):
        for load in ("keepalive", "new", "bulk"):
            edge, plain = medians[(f"edge forward {kind}", load)], medians[(f"mitmdump {kind}", load)]
            per = "per MiB" if load == "bulk" else "per request"
            print(f"edge forward / mitmdump, {kind:9} {load:9}: rate {edge[0] / plain[0]:.2f}x, "
                  f"CPU {per} {edge[1] / plain[1]:.2f}x")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "_one":
        print(json.dumps(measure_one(sys.argv[2], sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", nargs="?", choices=("lists", "throughput"), help="one half only")
    parser.add_argument("--seconds", type=int, default=5, help="per throughput measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    args = parser.parse_args()
    if args.part in (None, "lists"):
        bench_lists()
    if args.part in (None, "throughput"):
        bench_throughput(args.seconds, args.rounds, args.clients)


if __name__ == "__main__":
    main()
