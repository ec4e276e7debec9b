"""CPU seconds per forwarded request of two edge source trees side by side, under one wrk load
(steadier than requests/s on this noisy machine): did a change make the data path dearer?

    .venv/bin/python bench/cpu_ab.py OLD_TREE [NEW_TREE] [--shield limits|waf]   # e.g. a `git worktree add /tmp/old REV`

Each tree's `addons`/`edgecli` run on this venv (PYTHONPATH puts the tree first), `edge run
--origin` in front of one nginx, both pinned to CPU 1, wrk to CPU 0; 4 interleaved rounds of
5 s with a browser's request; prints the median CPU microseconds per request and requests/s.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import BROWSER, LIMITS_ONLY, NGINX_CONF, SHIELDED, free_port, pinned, stop, wait_for_port, wrk

SHIELDS = {"limits": LIMITS_ONLY, "waf": SHIELDED}      # make bench's shield without and with the WAF

HERE = Path(__file__).resolve().parent


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    args = sys.argv[1:]
    shield = None
    if "--shield" in args:
        at = args.index("--shield")
        shield = args[at + 1] if at + 1 < len(args) and args[at + 1] in SHIELDS else None
        if shield is None:
            raise SystemExit(__doc__)
        del args[at:at + 2]
    if not args:
        raise SystemExit(__doc__)
    trees = {"old": args[0], "new": args[1] if len(args) > 1 else str(HERE.parent)}
    work = Path(tempfile.mkdtemp(prefix="edge-bench-ab-"))
    work.chmod(0o755)
    (work / "www").mkdir()
    (work / "www" / "index.html").write_bytes(b"x" * 1024)
    origin, port2, port3 = free_port(), free_port(), free_port()
    (work / "nginx.conf").write_text(NGINX_CONF.format(dir=work, port=origin, port2=port2, port3=port3))
    procs = [subprocess.Popen(pinned(1, [shutil.which("nginx") or "/usr/sbin/nginx", "-c", work / "nginx.conf",
                                         "-p", work]))]
    ports = {}
    try:
        for name, tree in trees.items():
            ports[name] = free_port()
            if shield is None:
                target = ["--origin", f"http://127.0.0.1:{origin}", "--listen", f"127.0.0.1:{ports[name]}"]
            else:
                config = work / f"{name}.yaml"
                config.write_text(SHIELDS[shield].format(listen=ports[name], a=origin))
                target = ["-c", config]
            cmd = [sys.executable, "-O", "-m", "edgecli", "run", *target, "--confdir", work / f"conf-{name}"]
            procs.append(subprocess.Popen(pinned(1, cmd), env=dict(os.environ, PYTHONPATH=tree), cwd=work,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in ports.values():
            wait_for_port(port)
        cost: dict[str, list[float]] = {name: [] for name in trees}
        rate: dict[str, list[float]] = {name: [] for name in trees}
        for _ in range(4):
            for (name, port), proc in zip(ports.items(), procs[1:]):
                url = f"http://127.0.0.1:{port}/index.html"
                wrk(url, 10, 1, BROWSER)
                before = cpu_seconds(proc.pid)
                result = wrk(url, 10, 5, BROWSER)
                cost[name].append((cpu_seconds(proc.pid) - before) / (result.rps * 5) * 1e6)
                rate[name].append(result.rps)
    finally:
        stop(procs, work)
    for name, tree in trees.items():
        print(f"{name} ({tree}): {statistics.median(cost[name]):.1f} us of CPU per request, "
              f"{statistics.median(rate[name]):.0f} requests/s (medians of 4 rounds)")


if __name__ == "__main__":
    main()
