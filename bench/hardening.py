"""Issue 9's "Measure and report": every attack class of the issue against a real `edge run`, with a
normal client beside it, each run twice: a config without a `shield:` section and one with a
moderate shield (timeouts and sizes; no rate limit, no WAF, no bots, so they hide nothing).

    .venv/bin/python bench/hardening.py              # everything, about 6 minutes
    .venv/bin/python bench/hardening.py --only 2,6   # some scenarios (numbers as in the issue)
    make bench-hardening

Each scenario starts a fresh edge (pinned to CPU 0) in front of a fresh raw-socket origin
(tests/rawnet.py's RecordingOrigin, answering per path), and a normal client (its own process,
50 requests/s to a good URL) whose first 2 s are its unloaded latency. A row per attack: what the
attack achieved (origin requests, what the attacker got, poisoned, leaked, RSS growth), the
normal client's answers and p50/p99 over the attack's window against its unloaded p99 of the same
edge, and whether the issue's goal is met. Prints figures; asserts nothing; exits 0.
Flooding attackers run in processes of their own, at lower priority, killed at their deadline.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import math
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from urllib.parse import urlsplit

import httpx

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
import hardening_peers as peers  # noqa: E402
from rawnet import CLOSE, RecordingOrigin, exchange, status_of  # noqa: E402

BIN = Path(sys.executable).parent
RATE = 50            # normal client requests/s
UNLOADED = 2.0       # seconds of the normal client alone on each new edge
CAP = 12.0           # longest wait for a slow-connection verdict
HOST = peers.HOST
SHIELD = """\
shield:
  connections_per_ip: 10000
  timeouts: {request_headers: 3s, request_body: 5s, idle: 10s}
  max_header_bytes: 32KB
  max_body: 10MB
"""

# ---------------------------------------------------------------- the origin's pages

OVERRIDES = [("X-Forwarded-Host", "evil.example"), ("X-Forwarded-Scheme", "nothttps"), ("X-Forwarded-Ssl", "on"),
             ("X-Forwarded-Server", "evil.example"), ("X-Forwarded-Prefix", "/evil"), ("X-Forwarded-Port", "1337"),
             ("X-Host", "evil.example"), ("X-Original-URL", "/admin"), ("X-Rewrite-URL", "/admin"),
             ("X-HTTP-Method-Override", "DELETE")]
INTERNAL = "origin-7.internal.example"
# name -> (status, header, value template ({port}: the origin's), markers that must not reach a client,
#          header kept is part of the goal)
LEAKS = {
    "Location to an internal name": (302, "Location", f"http://{INTERNAL}/login", ["internal.example"], True),
    "Location to *.ec2.internal": (302, "Location", "http://ip-10-1-2-3.ec2.internal/x", ["ec2.internal"], True),
    "Location to localhost:PORT": (302, "Location", "http://localhost:{port}/x", ["localhost", "{port}"], True),
    "Alt-Svc with the origin's port": (200, "Alt-Svc", 'h3=":{port}"; ma=86400', ["{port}"], False),
    "Location to decimal 10.1.2.3": (302, "Location", "http://167838211/x", ["167838211"], True),
    "Location to hex 10.1.2.3": (302, "Location", "http://0x0a010203/x", ["0x0a010203"], True),
    "Location to IPv4-mapped 10.1.2.3": (302, "Location", "http://[::ffff:10.1.2.3]/x", ["10.1.2.3"], True),
    "protocol-relative Location //10.1.2.3": (302, "Location", "//10.1.2.3/x", ["10.1.2.3"], True),
    "CSP naming 10.1.2.3": (200, "Content-Security-Policy",
                            "default-src 'self'; script-src 'self' http://10.1.2.3:8080; object-src 'none'",
                            ["10.1.2.3"], True),
    "WWW-Authenticate naming 10.1.2.3": (401, "WWW-Authenticate", 'Bearer realm="http://10.1.2.3/auth"',
                                         ["10.1.2.3"], True),
    "ACAO naming 10.1.2.3": (200, "Access-Control-Allow-Origin", "http://10.1.2.3:3000", ["10.1.2.3"], False),
    "5xx body naming an internal host": (502, "", f"upstream {INTERNAL} (10.1.2.3:8080) timed out",
                                         ["internal.example", "10.1.2.3"], False),
}


def response(status: int, body: bytes | str = b"", *headers: tuple[str, str], cache: str = "no-store") -> bytes:
    body = body.encode() if isinstance(body, str) else body
    lines = [f"HTTP/1.1 {status} {'OK' if status < 300 else 'Other'}", f"Content-Length: {len(body)}",
             "Content-Type: text/html", *(f"{k}: {v}" for k, v in headers)]
    if cache:
        lines.append(f"Cache-Control: {cache}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Seen:
    """One request as the origin received it."""
    at: float
    method: str
    target: str
    head: bytes
    body: bytes

    @property
    def path(self) -> str:
        return urlsplit(self.target).path if "://" in self.target else self.target.split("?")[0]

    def header(self, name: str) -> str | None:
        m = re.search(rb"(?im)^" + re.escape(name.encode()) + rb":[ \t]*([^\r\n]*)", self.head)
        return m[1].decode("latin-1").strip() if m else None


def parse_seen(request: bytes) -> Seen:
    head, _, body = request.partition(b"\r\n\r\n")
    parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
    method, target = (parts + ["", ""])[:2]
    return Seen(time.monotonic(), method, target, head + b"\r\n\r\n", body)


def origin_answer(seen: Seen, port: int) -> bytes | None | object:
    """The site behind the edge: one page per probe of this benchmark."""
    path = seen.path
    if path == "/good":
        return response(200, "good")
    if path == "/close":
        return CLOSE
    if path == "/dupcl":
        return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\nCache-Control: no-store\r\n\r\nhello!"
    if path == "/err503":
        return response(503, "origin busy")
    if path == "/page":         # a vhost origin: the absolute-form authority wins over Host (RFC 9112 3.2.2)
        host = urlsplit(seen.target).hostname if "://" in seen.target else (seen.header("Host") or "")
        return response(200, f"page of {host}", cache="max-age=60")
    if path.startswith("/ovr/"):
        effect = [f"{k}={v}" for k, v in OVERRIDES if (seen.header(k) or "").lower() == v.lower()]
        return response(200, "effect: " + ",".join(effect) if effect else "clean", cache="max-age=60")
    if path == "/gbody":
        return response(200, "effect: body" if seen.body else "clean", cache="max-age=60")
    if path.startswith(("/account.php", "/account2.php")):
        if "session=alice" not in (seen.header("Cookie") or ""):
            return response(200, "please log in", cache="")
        dated = [("Last-Modified", formatdate(time.time() - 86400 * 30, usegmt=True))] \
            if path.startswith("/account.php") else []
        return response(200, "account of alice: card 4111-1111-1111-1111", *dated,
                        ("Set-Cookie", "session=alice; Path=/; HttpOnly"), cache="")
    if path == "/h5/purge":     # an unknown method gets an error, which invalidates nothing (RFC 9111 4.4)
        return response(200, "cached page", cache="max-age=60") if seen.method == "GET" \
            else response(405, "method not allowed")
    if path == "/h6/silent":
        return None
    if path.startswith("/l7/"):
        status, header, value, _, _ = LEAKS[LEAK_PATHS[path]]
        value = value.format(port=port)
        return response(status, value, cache="no-store") if not header \
            else response(status, "leak probe", (header, value))
    return response(200, "ok")


LEAK_PATHS = {f"/l7/{i}": name for i, name in enumerate(LEAKS)}

# ---------------------------------------------------------------- edge processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cpu: int, args: list) -> list:
    return ["taskset", "-c", str(cpu), *map(str, args)] if shutil.which("taskset") and os.cpu_count() > 1 \
        else list(map(str, args))


class EdgeProc:
    """`edge run -c CONFIG --listen 127.0.0.1:PORT` as a subprocess on CPU 0, output to a file."""

    def __init__(self, work: Path, config: str, cert: Path | None, web: bool = False) -> None:
        self.port = free_port()
        self.config_path = work / f"edge-{self.port}.yaml"
        self.config_path.write_text(config)
        self.log_path = work / f"edge-{self.port}.log"
        args = [BIN / "edge", "run", "-c", self.config_path, "--listen", f"127.0.0.1:{self.port}",
                "--confdir", work / "conf"]
        if cert:
            args += ["--cert", cert]
        if web:
            args += ["--web", "--web-port", free_port()]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(pinned(0, args), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"edge exited at start ({self.proc.returncode}): {self.log()[-300:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("edge did not listen within 30 s")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM in MiB (empty once the process is gone)."""
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return {}
        return {k: int(v) // 1024 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def self_signed(folder: Path) -> Path:
    """A throw-away certificate for localhost (what `--cert` takes: certificate, then key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.DNSName(HOST),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    pem = folder / "edge.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return pem


# ---------------------------------------------------------------- rows and statistics

@dataclass
class Stats:
    statuses: Counter
    p50: float
    p99: float
    unloaded_p99: float

    @classmethod
    def of(cls, samples: list[tuple], unloaded_p99: float) -> Stats | None:
        if not samples:
            return None
        ms = sorted(s[1] for s in samples)
        return cls(Counter(s[2] for s in samples), percentile(ms, 50), percentile(ms, 99), unloaded_p99)

    @property
    def ratio(self) -> float:
        return self.p99 / self.unloaded_p99 if self.unloaded_p99 else math.inf

    @property
    def all_ok(self) -> bool:
        return set(self.statuses) == {200}

    def answers(self) -> str:
        return " ".join(f"{k}x{v}" for k, v in sorted(self.statuses.items(), key=lambda kv: -kv[1]))


def percentile(ordered: list[float], p: float) -> float:
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass
class Row:
    scenario: str
    config: str
    label: str
    outcome: str = ""
    met: bool | None = None                            # the goal, when the attack alone decides it
    check: Callable[[Stats], bool] | None = None       # ... or when the normal client's figures do
    with_normal: bool = True
    span: tuple[float, float] = (0.0, 0.0)
    normal: Stats | None = None

    def goal(self) -> str:
        met = self.met
        if self.check is not None:
            met = self.check(self.normal) if self.normal else False
        return {True: "met", False: "NO", None: "-"}[met]


class Table:
    WIDTHS = (44, 9, 4, 22, 20, 6)

    def __init__(self) -> None:
        self.rows: list[Row] = []
        print(self._line("probe", "config", "goal", "normal: answers", "p50/p99 (unl) ms", "p99 x") + "  attack outcome")
        print("-" * 130)

    def _line(self, *cells: str) -> str:
        return "  ".join(c[:w].ljust(w) for c, w in zip(cells, self.WIDTHS))

    def add(self, row: Row) -> None:
        self.rows.append(row)
        n = row.normal
        normal = (n.answers(), f"{n.p50:.1f}/{n.p99:.1f} ({n.unloaded_p99:.1f})", f"{n.ratio:.1f}x") if n else \
            (("(no normal figures)" if row.with_normal else ""), "", "")
        lead = self._line(row.label, row.config, row.goal(), *normal)
        wrapped = textwrap.wrap(row.outcome, 200 - len(lead)) or [""]
        print(f"{lead}  {wrapped[0]}")
        for more in wrapped[1:]:
            print(" " * (len(lead) + 2) + more)
        sys.stdout.flush()

    def summary(self) -> None:
        configs = ["no shield", "shield"]
        print("\nsummary: the issue's goals (met / NO; '-' informational)")
        labels = list(dict.fromkeys(r.label for r in self.rows if r.goal() != "-"))
        by = {(r.label, r.config): r.goal() for r in self.rows}
        print(f"  {'probe':60}  {'no shield':9}  shield")
        for label in labels:
            print(f"  {label[:60]:60}  {by.get((label, 'no shield'), ''):9}  {by.get((label, 'shield'), '')}")
        for config in configs:
            goals = [r.goal() for r in self.rows if r.config == config and r.goal() != "-"]
            if goals:
                print(f"  {config}: {goals.count('met')} of {len(goals)} goals met")
        baselines = sorted({r.normal.unloaded_p99 for r in self.rows if r.normal})
        if baselines:
            print(f"  the normal client's unloaded p99 on the {len(baselines)} edges of this run: min "
                  f"{baselines[0]:.1f}, median {percentile(baselines, 50):.1f}, max {baselines[-1]:.1f} ms "
                  f"(a high one means the machine was busy then: read that row's 'p99 x' with care)")


# ---------------------------------------------------------------- a site under attack

class Bench:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.table: Table | None = None
        (work / "conf").mkdir()
        self.cert = self_signed(work)
        self.read_timeout = self.supports("    read_timeout: 2s\n")

    def supports(self, pool_lines: str) -> bool:
        """Whether this edge's config accepts these lines after a pool (`edge check`)."""
        path = self.work / "probe.yaml"
        path.write_text(f"pools:\n  p:\n    origins: [http://127.0.0.1:9]\n{pool_lines}")
        return subprocess.run([BIN / "edge", "check", "-c", path], capture_output=True).returncode == 0


class Site:
    """A fresh edge in front of a fresh origin, with the normal client running from the start."""

    def __init__(self, bench: Bench, scenario: str, shielded: bool, *, pool_extra: str = "", extra: str = "",
                 cert: bool = True, web: bool = False, config_name: str | None = None) -> None:
        self.bench, self.scenario = bench, scenario
        self.config = config_name or ("shield" if shielded else "no shield")
        self.seen: list[Seen] = []
        self.origin = RecordingOrigin(self._answer)
        config = f"pools:\n  p:\n    origins: [{self.origin.url}]\n{pool_extra}{extra}{SHIELD if shielded else ''}"
        self.rows: list[Row] = []
        try:
            self.edge = EdgeProc(bench.work, config, bench.cert if cert else None, web=web)
        except RuntimeError:
            self.origin.stop()
            raise
        self.port = self.edge.port
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = peers.stop_event()
        self._normal = peers.Child(peers.browse, f"{self.url}/good", RATE, self._stop, 300.0)
        self._started = time.monotonic()
        time.sleep(UNLOADED + 0.3)

    def _answer(self, request: bytes):
        seen = parse_seen(request)
        self.seen.append(seen)
        return origin_answer(seen, self.origin.port)

    def requests_since(self, t0: float, prefix: str = "") -> list[Seen]:
        """What the origin received since t0, the normal client's /good excepted."""
        return [s for s in self.seen if s.at >= t0 and s.path != "/good" and s.path.startswith(prefix)]

    def settle(self, t0: float, prefix: str = "", quiet: float = 0.5, cap: float = 5.0) -> list[Seen]:
        """Wait until the origin received nothing new for `quiet` seconds (at most `cap`)."""
        deadline, last, since = time.monotonic() + cap, -1, time.monotonic()
        while time.monotonic() < deadline:
            n = len(self.requests_since(t0, prefix))
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
            time.sleep(0.05)
        return self.requests_since(t0, prefix)

    @contextmanager
    def window(self, label: str, min_seconds: float = 1.0, with_normal: bool = True) -> Iterator[Row]:
        """A row: the attack runs inside; the normal client's figures are those of this time span."""
        row = Row(self.scenario, self.config, label, with_normal=with_normal)
        t0 = time.monotonic()
        try:
            yield row
        except Exception as e:  # noqa: BLE001 - a probe that fails is a row, not the end of the run
            row.outcome += f" [probe failed: {type(e).__name__}: {e}]"
            row.met, row.check = False, None
        finally:
            time.sleep(max(0.0, t0 + min_seconds - time.monotonic()))
            row.span = (t0, time.monotonic())
            if not self.edge.alive:
                row.outcome += f" [EDGE DIED, exit {self.edge.proc.returncode}]"
            self.rows.append(row)

    def get(self, path: str, **kw) -> httpx.Response:
        headers = {"Host": HOST, "User-Agent": peers.BROWSER_UA, **kw.pop("headers", {})}
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=5, **kw)

    def raw(self, data: bytes, timeout: float = 3.0) -> bytes:
        return exchange("127.0.0.1", self.port, data, timeout=timeout, until_close=False)

    def close(self) -> None:
        self._stop.set()
        samples = self._normal.result(20).get("samples", [])
        warm = [s for s in samples if self._started + 0.3 <= s[0] < self._started + UNLOADED + 0.3]
        unloaded = Stats.of(warm, 0.0)
        for row in self.rows:
            if row.with_normal:
                row.normal = Stats.of([s for s in samples if row.span[0] <= s[0] < row.span[1]],
                                      unloaded.p99 if unloaded else 0.0)
        log = self.edge.log()
        self.edge.stop()
        self.origin.stop()
        crashes, tracebacks = log.count("has crashed"), log.count("Traceback")
        if crashes or tracebacks:
            self.rows.append(Row(self.scenario, self.config, f"{self.scenario} (edge log of the above)",
                                 f"{crashes}x 'mitmproxy has crashed', {tracebacks} tracebacks", with_normal=False))
        for row in self.rows:
            self.bench.table.add(row)


@contextmanager
def site(bench: Bench, scenario: str, shielded: bool, **kw) -> Iterator[Site]:
    s = Site(bench, scenario, shielded, **kw)
    try:
        yield s
    finally:
        s.close()


def text_status(answer: bytes) -> str:
    status = status_of(answer)
    return str(status) if status else ("closed, no answer" if not answer else "not HTTP")


def body_of(answer: bytes) -> bytes:
    return answer.partition(b"\r\n\r\n")[2]


# ---------------------------------------------------------------- 1. passive health

def passive_health(b: Bench, shielded: bool) -> None:
    seconds = 7

    def unusable(s: Site, i: int, got: Counter) -> None:
        got[text_status(s.raw(f"GET {'/close' if i % 2 == 0 else '/dupcl'} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()))] += 1

    def five_503(s: Site, i: int, got: Counter) -> None:
        with ThreadPoolExecutor(5) as pool:
            for answer in pool.map(lambda _: s.raw(f"GET /err503 HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()), range(5)):
                got["503 from the origin" if body_of(answer) == b"origin busy" else text_status(answer)] += 1

    for label, attack in [("1a unusable answer 1/s (close, dup C-L)", unusable),
                          ("1b five origin 503s at once, 1/s", five_503)]:
        with site(b, "1", shielded) as s, s.window(label, seconds) as row:
            got: Counter = Counter()
            start = time.monotonic()
            for i in range(seconds):
                attack(s, i, got)
                time.sleep(max(0.0, start + i + 1 - time.monotonic()))
            row.outcome = f"attacker got {dict(got)}; goal: the normal client gets no 503"
            row.check = lambda n: n.statuses.get(503, 0) == 0


# ---------------------------------------------------------------- 2. HTTP/2 -> HTTP/1 smuggling

def smuggling(b: Bench, shielded: bool) -> None:
    copies = 50
    with site(b, "2", shielded) as s, s.window("2 h2 body w/o content-length, 50 reqs inside", 2.0) as row:
        t0 = time.monotonic()
        r = peers.h2_smuggle(s.port, copies)
        seen = s.settle(t0)
        upload = [x for x in seen if x.path == "/h2/upload"]
        framing = "none"
        if upload:
            framing = "Content-Length" if upload[0].header("Content-Length") else \
                "chunked" if "chunked" in (upload[0].header("Transfer-Encoding") or "") else "none"
        smuggled = sum(x.path == "/smuggled" for x in seen)
        row.outcome = (f"origin requests {len(seen)} (goal 1), /smuggled {smuggled}; framing to origin: {framing}; "
                       f"attacker got {r.get('status', r.get('error'))}")
        row.met = len(seen) == 1 and framing != "none"


# ---------------------------------------------------------------- 3. cache poisoning

def poisoning(b: Bench, shielded: bool) -> None:
    with site(b, "3", shielded) as s:
        with s.window("3 (normal client over the probes above)", 2.0) as group:
            with s.window("3a absolute-form GET http://other.example/page", 0, with_normal=False) as row:
                t0 = time.monotonic()
                attacker = s.raw(f"GET http://other.example/page HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
                seen = s.settle(t0, "/page", quiet=0.2)
                visitor = s.get("/page").text
                target = seen[0].target if seen else "-"
                poisoned = "other.example" in visitor
                row.outcome = (f"origin got target {target!r} Host {seen[0].header('Host') if seen else '-'}; "
                               f"attacker got {text_status(attacker)} {body_of(attacker)[:30]!r}; "
                               f"then a visitor of /page got {visitor!r}: {'POISONED' if poisoned else 'clean'}")
                row.met = not poisoned and target.startswith("/")
            for i, (name, value) in enumerate(OVERRIDES):
                with s.window(f"3b {name}: {value}", 0, with_normal=False) as row:
                    t0 = time.monotonic()
                    s.get(f"/ovr/{i}", headers={name: value})
                    seen = s.settle(t0, f"/ovr/{i}", quiet=0.2)
                    reached = any((x.header(name) or "").lower() == value.lower() for x in seen)
                    visitor = s.get(f"/ovr/{i}").text
                    row.outcome = (f"origin saw it: {'YES' if reached else 'no'}; a visitor then got {visitor!r}: "
                                   f"{'POISONED' if visitor != 'clean' else 'clean'}")
                    row.met = not reached and visitor == "clean"
            with s.window("3c GET with a body", 0, with_normal=False) as row:
                t0 = time.monotonic()
                attacker = s.raw(f"GET /gbody HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 8\r\n\r\nx=evil12".encode())
                seen = s.settle(t0, "/gbody", quiet=0.2)
                visitor = s.get("/gbody").text
                row.outcome = (f"attacker got {text_status(attacker)}; origin got the body: "
                               f"{'yes' if any(x.body for x in seen) else 'no'}; a visitor then got {visitor!r}: "
                               f"{'POISONED' if visitor != 'clean' else 'clean'}")
                row.met = visitor == "clean"
            group.outcome = "informational: the normal client while the probes ran"


# ---------------------------------------------------------------- 4. web cache deception

def deception(b: Bench, shielded: bool) -> None:
    cases = [("4a /account.php/x/nonexistent.css, Last-Modified", "", "/account.php/x/nonexistent.css"),
             ("4b same, no validator, cache.default_ttl 60s", "cache: {default_ttl: 60s}\n",
              "/account2.php/x/nonexistent.css")]
    for label, extra, path in cases:
        with site(b, "4", shielded, extra=extra) as s, s.window(label, 1.0) as row:
            victim = s.get(path, headers={"Cookie": "session=alice"})
            visitor = s.get(path)
            leaked = "alice" in visitor.text
            row.outcome = (f"victim (with cookie) got {victim.status_code}; a visitor without cookie got "
                           f"{visitor.text[:24]!r}: {'LEAKED' if leaked else 'not leaked'}"
                           f"{', with Set-Cookie' if 'set-cookie' in visitor.headers else ''}; "
                           f"Cache-Status {visitor.headers.get('cache-status', '-')!r}")
            row.met = not leaked


# ---------------------------------------------------------------- 5. header tricks

TRICKS = [
    ("5a bare CR in a value (hides an XFF)", b"GET /h5/cr HTTP/1.1\r\nHost: shop.example\r\nX-A: a\rX-Forwarded-For: 6.6.6.6\r\n\r\n",
     b"6.6.6.6"),
    ("5b NUL in a value", b"GET /h5/nul HTTP/1.1\r\nHost: shop.example\r\nX-A: a\x00b\r\n\r\n", b"\x00"),
    ("5c obs-fold (hides an XFH)", b"GET /h5/fold HTTP/1.1\r\nHost: shop.example\r\nX-A: a\r\n X-Forwarded-Host: evil.example\r\n\r\n",
     b"evil.example"),
    ("5d missing Host (HTTP/1.1)", b"GET /h5/nohost HTTP/1.1\r\n\r\n", None),
    ("5e two Host fields", b"GET /h5/twohost HTTP/1.1\r\nHost: shop.example\r\nHost: evil.example\r\n\r\n", b"evil.example"),
    ("5f #fragment in the target", b"GET /h5/frag#x HTTP/1.1\r\nHost: shop.example\r\n\r\n", b"#"),
    ("5g HTTP/1.2", b"GET /h5/v12 HTTP/1.2\r\nHost: shop.example\r\n\r\n", None),
]


def header_tricks(b: Bench, shielded: bool) -> None:
    with site(b, "5", shielded) as s:
        with s.window("5 (normal client over the probes above)", 2.0) as group:
            for label, data, marker in TRICKS:
                with s.window(label, 0, with_normal=False) as row:
                    path = data.split(b" ", 2)[1].split(b"#")[0].decode()
                    t0 = time.monotonic()
                    answer = s.raw(data)
                    seen = s.settle(t0, path, quiet=0.3, cap=2)
                    carried = bool(marker) and any(marker in x.head for x in seen)
                    status = status_of(answer)
                    row.outcome = (f"attacker got {text_status(answer)}; origin saw it: {'YES' if seen else 'no'}"
                                   f"{', with the hidden bytes' if carried else ''}")
                    row.met = not seen and status in (400, 505)
            with s.window("5h lower-case `purge` of a cached URL", 0, with_normal=False) as row:
                s.get("/h5/purge"), s.get("/h5/purge")
                before = len(s.requests_since(0, "/h5/purge"))
                answer = s.raw(f"purge /h5/purge HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
                s.get("/h5/purge")
                after = s.requests_since(0, "/h5/purge")
                dropped = sum(x.method == "GET" for x in after) > before
                row.outcome = (f"attacker got {text_status(answer)}; origin saw `purge`: "
                               f"{'yes' if any(x.method == 'purge' for x in after) else 'no'}; "
                               f"cached entry purged: {'YES' if dropped else 'no'}")
                row.met = not dropped
            group.outcome = "informational: the normal client while the probes ran"


# ---------------------------------------------------------------- 6. floods and slow peers

def floods(b: Bench, shielded: bool) -> None:
    rapid_reset(b, shielded, "6a rapid reset, 1,000 pairs", 1000, 10.0)
    rapid_reset(b, shielded, "6b rapid reset, 20,000 pairs (5 s max)", 20000, 5.0)
    for kind in ("settings", "ping"):
        with site(b, "6", shielded) as s, s.window(f"6{'c' if kind == 'settings' else 'd'} {kind.upper()} flood, 3 s", 4.0) as row:
            r = peers.Child(peers.control_flood, s.port, kind, 3.0, nice=5).result(20)
            row.outcome = (f"{r.get('sent', 0):,} frames sent, {r.get('acks', 0):,} ACKs; GOAWAY {r.get('goaway')}; "
                           f"closed {r.get('closed')} {r.get('error', '')}")
            row.check = lambda n: n.all_ok and n.ratio <= 2
    huge_head(b, shielded)
    slow_peers(b, shielded)


def rapid_reset(b: Bench, shielded: bool, label: str, pairs: int, seconds: float) -> None:
    with site(b, "6", shielded) as s, s.window(label, seconds + 3 if pairs > 1000 else 2.0) as row:
        t0, connections = time.monotonic(), len(s.origin.connections)
        r = peers.Child(peers.rapid_reset, s.port, pairs, seconds, nice=5).result(seconds + 20)
        sent = r.get("sent", 0)
        if pairs <= 1000:       # a busy edge may forward late: 4 s, then until 1 s passes with nothing new
            time.sleep(max(0.0, t0 + 4 - time.monotonic()))
            seen = s.settle(t0, "/rr", quiet=1.0, cap=4.0)
        else:                   # the normal client's window: the flood and 3 s of aftermath
            time.sleep(max(0.0, t0 + seconds + 3 - time.monotonic()))
            seen = s.requests_since(t0, "/rr")
        per = len(seen) * 1000 / sent if sent else 0
        row.outcome = (f"{sent:,} pairs written (to socket buffers) in {r.get('seconds', 0):.2f} s; origin requests "
                       f"{len(seen):,} = {per:.0f} per 1,000 reset streams (goal 0), origin connections "
                       f"{len(s.origin.connections) - connections:,}; GOAWAY {r.get('goaway')}, closed "
                       f"{r.get('closed')} {r.get('error', '')}")
        if pairs <= 1000:
            row.met = sent > 0 and not seen
        else:
            row.check = lambda n: n.ratio <= 2


def huge_head(b: Bench, shielded: bool) -> None:
    with site(b, "6", shielded) as s, s.window("6e huge HTTP/1 head (256 MB max, 5 s)", 7.0) as row:
        before = s.edge.memory()
        r = peers.Child(peers.huge_head, s.port, 256 << 20, 5.0, nice=5).result(30)
        time.sleep(1.0)
        after = s.edge.memory()
        grew = after.get("VmHWM", 0) - before.get("VmHWM", 0)
        row.outcome = (f"{r.get('sent', 0) / (1 << 20):.0f} MB sent in {r.get('seconds', 0):.1f} s, "
                       f"send failed: {r.get('cut', '-')}, answer {r.get('status', r.get('error'))}; edge RSS "
                       f"{before.get('VmRSS')} -> {after.get('VmRSS')} MiB, peak +{grew} MiB")
        row.check = lambda n, grew=grew: grew < 64 and n.all_ok


def wait_for_close(sock: socket.socket, cap: float) -> tuple[bytes, float | None]:
    """Read until the peer closes: what it sent, and when it closed (None: still open at `cap`)."""
    start, got = time.monotonic(), b""
    sock.settimeout(0.25)
    while time.monotonic() - start < cap:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            return got, time.monotonic() - start
        if not chunk:
            return got, time.monotonic() - start
        got += chunk
    return got, None


def first_answer(sock: socket.socket, cap: float) -> tuple[bytes, float | None]:
    """Read until a whole response head arrived or the peer closed: what it sent, and when the
    first byte came (None: nothing by `cap`)."""
    start, got, first = time.monotonic(), b"", None
    sock.settimeout(0.25)
    while time.monotonic() - start < cap and b"\r\n\r\n" not in got:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            break
        if not chunk:
            break
        first = first if first is not None else time.monotonic() - start
        got += chunk
    return got, first


def slow_peers(b: Bench, shielded: bool) -> None:
    pool_extra = "    read_timeout: 2s\n" if b.read_timeout else ""
    with site(b, "6", shielded, pool_extra=pool_extra) as s:
        results: dict[str, str] = {}

        def half_line() -> None:
            with socket.create_connection(("127.0.0.1", s.port), timeout=5) as sock:
                sock.sendall(b"GET /good HTT")
                got, closed = wait_for_close(sock, CAP)
            results["half"] = (f"closed after {closed:.1f} s, answer {text_status(got)}" if closed is not None
                               else f"still open after {CAP:.0f} s")

        def silent() -> None:
            with socket.create_connection(("127.0.0.1", s.port), timeout=5) as sock:
                start = time.monotonic()
                sock.sendall(f"GET /h6/silent HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
                got, first = first_answer(sock, CAP)
            took = time.monotonic() - start
            results["silent"] = (f"{text_status(got)} after {first:.1f} s" if got else
                                 f"closed without an answer after {took:.1f} s" if took < CAP
                                 else f"nothing after {CAP:.0f} s")
            results["silent_status"] = str(status_of(got))

        with s.window("6f/6g (normal client meanwhile)", 0) as group:
            threads = [threading.Thread(target=half_line), threading.Thread(target=silent)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(CAP + 5)
            group.outcome = "informational"
        with s.window("6f half-sent request line `GET /good HTT`", 0, with_normal=False) as row:
            row.outcome = results.get("half", "probe did not finish")
            row.met = row.outcome.startswith("closed")
        with s.window("6g origin accepts, never answers", 0, with_normal=False) as row:
            row.outcome = (results.get("silent", "probe did not finish") +
                           ("" if b.read_timeout else " (this edge has no pools.*.read_timeout)"))
            row.met = results.get("silent_status") == "504"
        with s.window("6h chunked request with trailers", 0, with_normal=False) as row:
            t0 = time.monotonic()
            answer = s.raw(f"POST /h6/trailers HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n"
                           "5\r\nhello\r\n0\r\nX-Trailer: yes\r\n\r\n".encode())
            seen = s.settle(t0, "/h6/trailers", quiet=0.2, cap=2)
            crashed = "has crashed" in s.edge.log()
            row.outcome = (f"attacker got {text_status(answer)}; origin got it: {'yes' if seen else 'no'}"
                           f"{'; edge log: mitmproxy has crashed' if crashed else ''}")
            row.met = status_of(answer) == 200 and not crashed
        with s.window("6i `Connection: close` from HTTP/1.1", 0, with_normal=False) as row:
            with socket.create_connection(("127.0.0.1", s.port), timeout=5) as sock:
                sock.sendall(f"GET /good HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
                got, closed = wait_for_close(sock, 3.0)
            row.outcome = (f"answer {text_status(got)}; connection "
                           f"{f'closed after {closed:.2f} s' if closed is not None else 'still open after 3 s'}")
            row.met = closed is not None and status_of(got) == 200


# ---------------------------------------------------------------- 7. identity leaks

# the site's own internal domain, as its operator declares it (a name under a public-looking
# suffix cannot be told internal by default: only reserved suffixes such as .internal are)
LEAK_CONFIG = "scrub: {internal_domains: [internal.example]}\n"


def leaks(b: Bench, shielded: bool) -> None:
    with site(b, "7", shielded, extra=LEAK_CONFIG if b.supports(LEAK_CONFIG) else "") as s:
        with s.window("7 (normal client over the probes above)", 2.0) as group:
            for path, name in LEAK_PATHS.items():
                status, header, value, markers, keep = LEAKS[name]
                with s.window(f"7 {name}", 0, with_normal=False) as row:
                    r = s.get(path)
                    port = str(s.origin.port)
                    got = r.text if not header else r.headers.get(header)
                    leaked = got is not None and any(m.format(port=port).lower() in got.lower() for m in markers)
                    shown = "removed" if got is None else repr(got[:70])
                    row.outcome = (f"{r.status_code}; {header or 'body'}: {shown}: "
                                   f"{'LEAKED' if leaked else 'no leak'}{'' if got is not None or not keep else ', header lost'}")
                    row.met = not leaked and (got is not None or not keep)
            group.outcome = "informational: the normal client while the probes ran"


# ---------------------------------------------------------------- 8. mitmproxy showing through

def mitmproxy_shows(b: Bench, shielded: bool) -> None:
    with site(b, "8", shielded, cert=False) as s:
        with s.window("8 (normal client over the probes above)", 2.0) as group:
            with s.window("8a TLS handshake on a plain listener", 0, with_normal=False) as row:
                row.outcome, row.met = tls_on_plain(s.port)
            probes = [("8b 400 page for a bad request line", b"GET /<script>x</script> HTTP/1.1 junk\r\n\r\n", b"junk"),
                      ("8c 400 page for a header without a colon",
                       f"GET / HTTP/1.1\r\nHost: {HOST}\r\nno colon here\r\n\r\n".encode(), b"colon"),
                      ("8d CONNECT", b"CONNECT internal.example:443 HTTP/1.1\r\nHost: internal.example:443\r\n\r\n",
                       b"internal.example"),
                      ("8e 502 page (origin closes)", f"GET /close HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode(), b"/close")]
            for label, data, marker in probes:
                with s.window(label, 0, with_normal=False) as row:
                    answer = s.raw(data)
                    row.outcome, row.met = judge_page(answer, marker)
                    if label.startswith("8d"):
                        row.met = row.met and status_of(answer) == 405
            group.outcome = "informational: the normal client while the probes ran"
    if not shielded:
        with site(b, "8", False, cert=False, web=True, config_name="no shield") as s:
            with s.window("8f --web: Host: mitm.it", 1.0) as row:
                page = s.raw(b"GET / HTTP/1.1\r\nHost: mitm.it\r\n\r\n")
                ca = s.raw(b"GET /cert/pem HTTP/1.1\r\nHost: mitm.it\r\n\r\n")
                onboarding = b"mitmproxy" in body_of(page).lower()
                served_ca = b"BEGIN CERTIFICATE" in ca
                row.outcome = (f"/ got {text_status(page)}{' (mitmproxy onboarding page)' if onboarding else ''}; "
                               f"/cert/pem got {text_status(ca)}{': the CA certificate' if served_ca else ''}")
                row.met = not onboarding and not served_ca


def tls_on_plain(port: int) -> tuple[str, bool]:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as raw, \
                ctx.wrap_socket(raw, server_hostname=HOST) as tls:
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as e:
        return f"no TLS: {type(e).__name__}", True
    from cryptography import x509
    issuer = x509.load_der_x509_certificate(der).issuer.rfc4514_string()
    return f"handshake completed, certificate issuer {issuer}", "mitmproxy" not in issuer.lower()


def judge_page(answer: bytes, marker: bytes) -> tuple[str, bool]:
    """An answer the edge made itself: its own page (Server: edge), no mitmproxy wording, no echo."""
    head, _, body = answer.partition(b"\r\n\r\n")
    server = re.search(rb"(?im)^server:[ \t]*([^\r\n]*)", head)
    server = server[1].decode() if server else "-"
    wording = b"mitmproxy" in answer.lower()
    echoed = marker in body
    out = (f"{text_status(answer)}, Server {server}; mitmproxy wording: {'YES' if wording else 'no'}; "
           f"echoes the input: {'YES' if echoed else 'no'}; request id: {'yes' if b'request id' in body else 'no'}; "
           f"body {body[:60]!r}")
    return out, bool(answer) and not wording and not echoed and server == "edge"


# ---------------------------------------------------------------- 9. access log on a full disk

def full_disk(b: Bench, shielded: bool) -> None:
    with site(b, "9", shielded, extra="access_log: /dev/full\n") as s, \
            s.window("9 access log on /dev/full: slowloris x5", 1.0) as row:
        socks, closed_at = [], {}
        start = time.monotonic()
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", s.port), timeout=5)
            sock.sendall(f"GET /good HTTP/1.1\r\nHost: {HOST}\r\n".encode())
            sock.setblocking(False)
            socks.append(sock)
        while len(closed_at) < len(socks) and time.monotonic() - start < CAP:
            for i, sock in enumerate(socks):
                if i in closed_at:
                    continue
                try:
                    sock.send(b"X")
                    if sock.recv(4096) == b"":
                        closed_at[i] = time.monotonic() - start
                except BlockingIOError:
                    pass
                except OSError:
                    closed_at[i] = time.monotonic() - start
            time.sleep(0.5)
        for sock in socks:
            sock.close()
        times = sorted(closed_at.values())
        errors = s.edge.log().lower().count("access log")
        row.outcome = ((f"{len(times)} of 5 cut, {times[0]:.1f}-{times[-1]:.1f} s after opening" if times
                        else f"none cut within {CAP:.0f} s") + f"; edge log lines naming the access log: {errors}")
        row.met = len(times) == len(socks)


def revision() -> str:
    """The checkout measured (BEFORE or AFTER a merge): commit, branch, and whether it is modified."""
    git = lambda *a: subprocess.run(["git", "-C", HERE.parent, *a], capture_output=True, text=True).stdout.strip()
    dirty = " (modified)" if git("status", "--porcelain", "--untracked-files=no") else ""
    return f"{git('rev-parse', '--short', 'HEAD') or '?'} on {git('rev-parse', '--abbrev-ref', 'HEAD') or '?'}{dirty}"


SCENARIOS = {1: passive_health, 2: smuggling, 3: poisoning, 4: deception, 5: header_tricks, 6: floods,
             7: leaks, 8: mitmproxy_shows, 9: full_disk}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated scenario numbers (1-9) [all]")
    args = ap.parse_args()
    chosen = [int(n) for n in args.only.split(",") if n.strip()] or list(SCENARIOS)
    if os.cpu_count() > 1:
        os.sched_setaffinity(0, {1})        # the harness, its origin and clients; the edge gets CPU 0
    peers.preload()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edge-hardening-") as work:
        bench = Bench(Path(work))
        print(f"edge at {revision()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
        print(f"(edge {'accepts' if bench.read_timeout else 'has no'} pools.*.read_timeout; "
              f"normal client {RATE}/s; shield section: {SHIELD.strip().replace(chr(10), ' ')})")
        bench.table = table = Table()
        for n in chosen:
            for shielded in (False, True):
                try:
                    SCENARIOS[n](bench, shielded)
                except Exception as e:  # noqa: BLE001 - one scenario failing must not end the run
                    table.add(Row(str(n), "shield" if shielded else "no shield", f"{n} scenario failed",
                                  f"{type(e).__name__}: {e}", met=False, with_normal=False))
        table.summary()
    print(f"\n{time.monotonic() - started:.0f} s in all")


if __name__ == "__main__":
    main()
