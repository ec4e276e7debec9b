"""Screenshots of mitmweb as the edge's console (issue 12), taken with headless Chromium:

    .venv/bin/python bench/console_screenshots.py            # PNGs in /tmp/edge-console/
    .venv/bin/python bench/console_screenshots.py --out DIR

Starts two demo origins (eu-1, eu-2) in this process and `edge run -c CONFIG --web` as a
process (a site `shop.example` with an /api/ route that strips its prefix, the bot filter and,
where Debian's CRS is installed, the WAF), then sends: a cache miss and its hit, an API call
(the origin gets another path), a WAF refusal, a scanner's request, a request for a host no
site serves (421), and after eu-2 is stopped, requests until one fails over to eu-1. Then
Chromium loads mitmweb's UI (with its token) and saves: the flow list, the same list filtered
to `~marked`, two flows' Comment tabs and the API call's Request tab. Look at them; they are not committed. Every process
started is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edgecli.origins import OriginServer                      # noqa: E402
from tests.conftest import free_port                          # noqa: E402

CONFIG = """\
listen: 127.0.0.1:{port}
pools:
  eu: {{origins: [{eu1}, {eu2}]}}
sites:
  shop:
    hosts: [shop.example]
    routes:
      - {{path: /api/, pool: eu, strip_prefix: true}}
      - {{path: /, pool: eu}}
shield:
  bots: {{block: [scanner, bad]}}
{waf}access_log: {log}
"""
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))      # loopback: never a proxy
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-proxy-server", "--hide-scrollbars", "--virtual-time-budget=8000", "--window-size=1400,900"]


def start_edge(config: Path, web_port: int, folder: Path) -> tuple[subprocess.Popen, str]:
    """`edge run --web` and the UI's URL with its token, from what it prints."""
    proc = subprocess.Popen([sys.executable, "-m", "edgecli", "run", "-c", str(config), "--web",
                             "--web-port", str(web_port), "--confdir", str(folder / "confdir")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 30
    for line in proc.stderr:
        if "mitmweb at " in line:
            return proc, line.split("mitmweb at ", 1)[1].strip()
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit(f"edge run --web did not start: {proc.stderr.read()}")


def send(port: int, path: str, host: str = "shop.example", agent: str = "curl/8.5.0") -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Host": host, "User-Agent": agent})
    try:
        with DIRECT.open(request, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def api(ui: str, path: str):
    parts = urlsplit(ui)
    token = parse_qs(parts.query)["token"][0]
    request = urllib.request.Request(f"{parts.scheme}://{parts.netloc}{path}", headers={"Authorization": f"Bearer {token}"})
    with DIRECT.open(request, timeout=10) as r:
        return json.loads(r.read())


def annotated(ui: str, count: int) -> list[dict]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        flows = api(ui, "/flows")
        if len(flows) >= count and all(f["comment"] for f in flows):
            return flows
        time.sleep(0.05)
    raise SystemExit("the flows were not annotated")


def screenshot(chromium: str, url: str, out: Path, folder: Path) -> None:
    profile = tempfile.mkdtemp(dir=folder, prefix="chromium-")
    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}", url],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120, check=True)
    print(f"  {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/edge-console", help="where the PNGs go")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Debian's chromium (apt-get install chromium)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    waf = "  waf: {paranoia: 1, anomaly_threshold: 5}\n" if Path("/usr/share/modsecurity-crs/rules").is_dir() else ""
    with tempfile.TemporaryDirectory(prefix="edge-console-") as tmp:
        folder = Path(tmp)
        eu1, eu2 = OriginServer("eu-1").start(), OriginServer("eu-2").start()
        port, web_port = free_port(), free_port()
        config = folder / "edge.yaml"
        config.write_text(CONFIG.format(port=port, eu1=eu1.url, eu2=eu2.url, waf=waf, log=folder / "access.log"))
        proc, ui = start_edge(config, web_port, folder)
        try:
            sent = [send(port, "/cacheable"), send(port, "/cacheable"), send(port, "/api/echo?q=1")]
            if waf:
                sent.append(send(port, "/products?id=1%27%20OR%20%271%27%3D%271"))
            sent += [send(port, "/admin", agent="sqlmap/1.7.2#stable (https://sqlmap.org)"),
                     send(port, "/", host="other.example")]
            eu2.stop()                          # a crashed origin: the next request for it fails over
            for _ in range(4):
                sent.append(send(port, "/echo"))
            print(f"edge on 127.0.0.1:{port}, mitmweb {ui}\n  statuses: {sent}")
            flows = annotated(ui, len(sent))
            for f in flows:
                print(f"  {f['marked'] or ' '} {f['request']['scheme']}://{f['request']['pretty_host']}"
                      f"{f['request']['path']}  {f['comment'].splitlines()[0]}")
            base = ui.split("#", 1)[0]
            screenshot(chromium, f"{base}#/flows", out / "flows.png", folder)
            screenshot(chromium, f"{base}#/flows?s={quote('~marked')}", out / "marked.png", folder)
            detail = next((f for f in flows if "origin:" in f["comment"] and "route" in f["comment"]), flows[0])
            screenshot(chromium, f"{base}#/flows/{detail['id']}/comment", out / "comment.png", folder)
            routed = next((f for f in flows if f["request"]["path"].startswith("/api/")), flows[0])
            screenshot(chromium, f"{base}#/flows/{routed['id']}/request", out / "request.png", folder)
            refused = next((f for f in flows if f["marked"] == "⛔"), flows[0])
            screenshot(chromium, f"{base}#/flows/{refused['id']}/comment", out / "refused.png", folder)
        finally:
            proc.terminate()
            proc.wait(20)
            eu1.stop()


if __name__ == "__main__":
    main()
