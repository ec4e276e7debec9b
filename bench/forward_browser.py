"""The forward proxy with a browser-like client: curl through the proxy, and headless Chromium
with --proxy-server. Prints a table of outcomes: what each client got, and the activity log's
line for it (action, rule, scheme, cache).

    .venv/bin/python bench/forward_browser.py

Loopback only. Test host names (allowed.example...) reach the loopback origins through the
tests' DNS stand-in inside the proxy (tests/test_forward.py Hosts): browsers send names to a
proxy, never addresses, so nothing else changes. Chromium trusts the origins' and the edge's
certificates by their public keys (--ignore-certificate-errors-spki-list; mitmproxy's minted
certificates carry the CA's key); the activity log says which were decrypted.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bcrypt  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

from addons.forward.config import load_forward_config  # noqa: E402
from edgecli import launch as launcher  # noqa: E402
from edgecli.origins import OriginServer  # noqa: E402
from tests.test_forward import NAMES, Hosts, _pem, make_ca, make_leaf, pages  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CURL = shutil.which("curl") or "curl"
CONFIG = """
mode: forward
listen: 127.0.0.1:0
intercept: {ca: edge-ca.pem, never: [never.example]}
lists: {social: social.txt, malware: malware.hosts, inspect: inspect.txt}
cache: {enabled: true}
activity_log: activity.jsonl
"""
POLICY = """
policy:
  - {list: social, action: block}
  - {list: malware, action: block, intercept: true}
  - {list: inspect, action: intercept}
  - {action: allow}
"""
USERS = """
users: {htpasswd: users.htpasswd, groups: {staff: [alice]}}
policy:
  - {group: staff, action: allow}
"""


def spki(public_key) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


class Proxy:
    """A forward proxy in a thread of this process, on an ephemeral port."""

    def __init__(self, folder: Path, text: str, upstream_ca: Path, hosts: Hosts) -> None:
        (folder / "forward.yaml").write_text(text)
        config = load_forward_config(str(folder / "forward.yaml"))
        ready, self.box = threading.Event(), {}

        def on_ready(master, addr) -> None:
            self.box.update(master=master, port=addr[1])
            ready.set()

        launch = launcher.ForwardLaunch(config=config, confdir=str(folder / "confdir"), on_ready=on_ready,
                                        handle_signals=False, extra_addons=[hosts],
                                        settings=[f"ssl_verify_upstream_trusted_ca={upstream_ca}"])
        self.thread = threading.Thread(target=launcher.run_forward, args=(launch,), daemon=True)
        self.thread.start()
        if not ready.wait(30):
            raise SystemExit("the forward proxy did not start")
        self.port, self.log = self.box["port"], folder / "activity.jsonl"

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def stop(self) -> None:
        self.box["master"].shutdown()
        self.thread.join(10)


def chromium(port: int, url: str, spkis: list[str]) -> str:
    """What headless Chromium shows for `url` through the proxy: the page's text or the error."""
    with tempfile.TemporaryDirectory() as profile:
        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={profile}", f"--proxy-server=http://127.0.0.1:{port}",
                f"--ignore-certificate-errors-spki-list={','.join(spkis)}", "--virtual-time-budget=3000",
                "--dump-dom", url]
        try:
            out = subprocess.run(args, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            return "timeout"
    dom = out.stdout
    for error in ("ERR_TUNNEL_CONNECTION_FAILED", "ERR_PROXY_AUTH", "ERR_CONNECTION_CLOSED",
                  "ERR_CONNECTION_RESET", "ERR_CERT", "ERR_EMPTY_RESPONSE", "ERR_SSL_PROTOCOL_ERROR",
                  "ERR_INVALID_AUTH_CREDENTIALS", "ERR_NO_SUPPORTED_PROXIES"):
        if error in dom or error in out.stderr:
            return error
    if "This site is blocked" in dom:
        return "block page: " + ("policy[" + dom.split("policy[", 1)[1].split("]", 1)[0] + "]" if "policy[" in dom else "?")
    text = dom.split("<body>", 1)[-1].split("</body>", 1)[0]
    if "<pre" in text:                  # a text/plain page
        text = text.split("<pre", 1)[1].split(">", 1)[1].split("</pre>", 1)[0]
    return "page: " + text.strip()[:32] if text.strip() else f"(empty page; exit {out.returncode})"


def curl(port: int, url: str, cafile: Path, *extra: str) -> str:
    out = subprocess.run([CURL, "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}B",
                          "--proxy", f"http://127.0.0.1:{port}", "--cacert", str(cafile), *extra, url],
                         capture_output=True, text=True, timeout=30)
    return out.stdout if out.returncode == 0 else f"curl exit {out.returncode} ({out.stdout.strip() or 'no answer'})"


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="forward-bench-"))
    ca_key, ca_cert = make_ca("bench origins CA")
    leaf_key, leaf = make_leaf(ca_key, ca_cert, NAMES + ("localhost",))
    edge_key, edge_cert = make_ca("bench edge CA")
    (folder / "origin-ca.pem").write_bytes(_pem(ca_cert))
    (folder / "origin.pem").write_bytes(_pem(leaf, leaf_key))
    (folder / "edge-ca.pem").write_bytes(_pem(edge_cert, edge_key))
    (folder / "both-cas.pem").write_bytes(_pem(ca_cert, edge_cert))
    (folder / "social.txt").write_text("social.example\n")
    (folder / "malware.hosts").write_text("0.0.0.0 malware.example\n")
    (folder / "inspect.txt").write_text("inspected.example\nnever.example\n")
    (folder / "users.htpasswd").write_text("alice:" + bcrypt.hashpw(b"alice-pw", bcrypt.gensalt(5)).decode() + "\n")
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "origin.pem")
    http_origin = OriginServer("plain", pages=pages()).start()
    https_origin = OriginServer("secure", pages=pages(), tls=context).start()
    hosts = Hosts({80: ("127.0.0.1", http_origin.port), 443: ("127.0.0.1", https_origin.port)})
    spkis = [spki(leaf_key.public_key()), spki(edge_key.public_key())]
    cafile = folder / "both-cas.pem"

    rows = []
    proxy = Proxy(folder, CONFIG + POLICY, folder / "origin-ca.pem", hosts)
    scenarios = [
        ("allowed site, HTTP", "http://allowed.example/"),
        ("allowed site, HTTPS (tunnel)", "https://allowed.example/"),
        ("blocked by list, HTTP", "http://social.example/"),
        ("blocked by list, HTTPS, no interception", "https://social.example/"),
        ("blocked by list, HTTPS, intercepted", "https://malware.example/"),
        ("intercept rule, HTTPS", "https://inspected.example/"),
        ("never-intercept host", "https://never.example/"),
        ("static file, 1st fetch", "http://allowed.example/static.css"),
        ("static file, 2nd fetch", "http://allowed.example/static.css"),
    ]
    for client in ("curl", "chromium"):
        for name, url in scenarios:
            url = url.replace("static.css", f"static.css?client={client}")      # each client's own first fetch
            before = len(proxy.lines())
            got = curl(proxy.port, url, cafile) if client == "curl" else chromium(proxy.port, url, spkis)
            deadline = time.monotonic() + 5
            while len(proxy.lines()) <= before and time.monotonic() < deadline:
                time.sleep(0.05)
            host = url.split("/")[2]
            lines = [line for line in proxy.lines()[before:] if line["host"] == host]   # not favicon, not Chromium's own
            rows.append((name, client, got, [line for line in lines if line["url"] in (None, url)]
                         or lines))
    proxy.stop()

    (folder / "activity.jsonl").unlink(missing_ok=True)
    proxy = Proxy(folder, CONFIG + USERS, folder / "origin-ca.pem", hosts)
    for name, client, run in (
            ("unauthenticated user", "curl", lambda: curl(proxy.port, "https://allowed.example/", cafile)),
            ("authenticated user", "curl", lambda: curl(proxy.port, "https://allowed.example/", cafile,
                                                        "--proxy-user", "alice:alice-pw")),
            ("wrong password", "curl", lambda: curl(proxy.port, "http://allowed.example/", cafile,
                                                    "--proxy-user", "alice:nope")),
            ("unauthenticated user", "chromium", lambda: chromium(proxy.port, "https://allowed.example/", spkis))):
        before = len(proxy.lines())
        got = run()
        time.sleep(0.3)
        rows.append((name, client, got, [line for line in proxy.lines()[before:] if line["host"] == "allowed.example"]))
    proxy.stop()
    http_origin.stop()
    https_origin.stop()

    print(f"| {'scenario':40} | {'client':8} | {'outcome':38} | activity log: action rule scheme status cache (user) |")
    print(f"|{'-' * 42}|{'-' * 10}|{'-' * 40}|{'-' * 54}|")
    for name, client, got, lines in rows:
        logged = "; ".join(f"{l['action']} {l['rule']} {l['scheme']} {l['status']} {l['cache']}"
                           + (f" ({l['user']})" if l["user"] else "") for l in lines[-2:])
        print(f"| {name:40} | {client:8} | {got[:38]:38} | {logged or '-':52} |")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("EDGE_DEBUG", "")
    main()
