"""A screenshot of `edge forward report --html` in headless Chromium (issue 15), to look at:

    .venv/bin/python bench/forward_report_screenshot.py            # /tmp/edge-forward-report/report.png
    .venv/bin/python bench/forward_report_screenshot.py --out DIR

Writes a day of made-up activity (seeded: the same log each run; 12 users and two clients
without a user, 40 domains, blocks by three rules, busier office hours, and a truncated last
line), runs `edge forward report --since 24h --html` on it through the real command, and has
Chromium save the page. The PNG is not committed.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from click.testing import CliRunner                          # noqa: E402

from edgecli.forward_tools import report                     # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-proxy-server", "--hide-scrollbars"]
USERS = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar"]
SITES = [f"{name}.example" for name in (
    "news", "mail", "docs", "wiki", "video", "music", "shop", "bank", "maps", "weather", "search", "code",
    "chat", "photos", "cloud", "travel", "sport", "games", "forum", "jobs")] + ["www.example.co.uk", "cdn.example.co.uk",
                                                                              "intranet.example.org"]
BLOCKED = {"ads": ("policy[2]", ["ads.tracker.example", "pixel.adnet.example", "metrics.spy.example"]),
           "social": ("policy[0]", ["social.example", "friends.example"]),
           "malware": ("policy[1]", ["evil-download.example", "phish-login.example"])}


def activity(now: datetime, count: int = 6000) -> list[dict]:
    """`count` entries over the day before `now`, office hours (UTC) busier."""
    rng = random.Random(15)
    entries = []
    for _ in range(count):
        hour = rng.choices(range(24), weights=[1, 1, 1, 1, 1, 2, 4, 8, 14, 16, 15, 14, 10, 14, 15, 15, 13, 9,
                                               5, 4, 3, 2, 2, 1])[0]
        at = now.replace(hour=hour, minute=0, second=0, microsecond=0)          # that clock hour, the last one passed
        at = (at if at < now else at - timedelta(days=1)) + timedelta(seconds=rng.uniform(0, 3600))
        at = min(at, now - timedelta(seconds=1))
        user = rng.choice(USERS + [None, None])
        client = f"10.0.1.{USERS.index(user) + 10}" if user else rng.choice(["10.0.9.17", "10.0.9.23"])
        if rng.random() < 0.08:
            category = rng.choice(list(BLOCKED))
            rule, hosts = BLOCKED[category]
            host, action, size_in, size_out = rng.choice(hosts), "block", 0, 0
        else:
            category = rule = None
            host = rng.choices(SITES, weights=[1 + 30 / (i + 1) for i in range(len(SITES))])[0]
            action = rng.choice(["allow"] * 8 + ["intercept", "log"])
            size_in, size_out = rng.randint(200, 4000), int(rng.paretovariate(1.2) * 20000)
        tunnel = action in ("allow", "block") and rng.random() < 0.6
        entries.append({"time": at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z",
                        "user": user, "group": "staff" if user else None, "client": client,
                        "method": "CONNECT" if tunnel else "GET", "host": host, "port": 443 if tunnel else 80,
                        "url": None if tunnel else f"http://{host}/", "scheme": "tunnel" if tunnel else "http",
                        "category": category, "rule": rule, "action": action, "status": None if tunnel else 200,
                        "bytes_in": size_in, "bytes_out": size_out, "duration_ms": rng.uniform(5, 900),
                        "cache": None})
    return sorted(entries, key=lambda e: e["time"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/edge-forward-report", help="Where the log, HTML and PNG go.")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    log, page, png = out / "activity.jsonl", out / "report.html", out / "report.png"
    with open(log, "w", encoding="utf-8") as file:
        file.writelines(json.dumps(e) + "\n" for e in activity(datetime.now(UTC)))
        file.write('{"time": "2026-')                            # the proxy is writing its next line
    result = CliRunner().invoke(report, ["--log", str(log), "--since", "24h", "--html", str(page)])
    print(result.output, end="")
    if result.exit_code:
        sys.exit(result.exit_code)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("no chromium on PATH (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
                        "--window-size=1280,1600", page.resolve().as_uri()],
                       check=True, timeout=120, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"screenshot: {png}")


if __name__ == "__main__":
    main()
