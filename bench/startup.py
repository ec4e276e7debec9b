"""How fast the `edge` command starts: the one-shot commands, and `edge run` to its first answer.

    .venv/bin/python bench/startup.py                         # this checkout's edge
    .venv/bin/python bench/startup.py --edge /work/main/.venv/bin/edge    # another install's
    .venv/bin/python bench/startup.py --imports check         # what `edge check` imports, slowest first

Each one-shot command runs --runs times (median and fastest printed); `edge run` is started
--runs times per config and timed from the spawn to the first 200 answer through it (polled
every 10 ms): in front of one origin (`--origin URL`), the demo's config without its WAF, and
the demo's config as shipped (with the WAF); then the WAF's rule loading alone. Prints figures; asserts
nothing. hyperfine, where installed, gives the same one-shot figures with more rigour:
`hyperfine -w 2 '.venv/bin/edge --help'`.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import BIN, free_port  # noqa: E402

from edgecli.origins import OriginServer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "data" / "edge.example.yaml"
BROWSER = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
           "Accept": "text/html", "Accept-Language": "en"}      # the demo config's bot filter lets it pass


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    return time.perf_counter() - start


def first_answer(args: list[str], port: int, timeout: float = 30.0) -> float:
    """Seconds from spawning `args` to the first 200 through 127.0.0.1:port."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < timeout:
            try:
                with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/", headers=BROWSER),
                                            timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - start
            except OSError:
                pass
            if proc.poll() is not None:
                raise SystemExit(f"bench: {' '.join(args)} exited with {proc.returncode}")
            time.sleep(0.01)
        raise SystemExit(f"bench: no answer within {timeout} s from {' '.join(args)}")
    finally:
        proc.terminate()
        proc.wait(15)


def report(what: str, figures: list[float]) -> None:
    print(f"  {what:<58} median {statistics.median(figures):6.3f} s   fastest {min(figures):6.3f} s"
          f"   ({len(figures)} runs)")


def demo_config(work: Path, origin_port: int, waf: bool) -> tuple[Path, int]:
    """The shipped example with every pool's origin on `origin_port`, the edge on a free port,
    no admin endpoint and no access log; without the WAF unless `waf`."""
    port = free_port()
    text = EXAMPLE.read_text()
    text = re.sub(r"127\.0\.0\.1:900[123]", f"127.0.0.1:{origin_port}", text)
    text = text.replace("listen: 127.0.0.1:8080", f"listen: 127.0.0.1:{port}")
    text = text.replace("admin: 127.0.0.1:9090", "admin: null").replace('access_log: "-"', "access_log: null")
    if not waf:
        text = re.sub(r"(?m)^  waf: .*\n", "", text)
    path = work / f"edge-{'waf' if waf else 'nowaf'}.yaml"
    path.write_text(text)
    return path, port


def imports(edge: str, command: str) -> None:
    """The 15 slowest imports (cumulative) of one command, from python -X importtime."""
    args = {"help": ["--help"], "version": ["--version"], "check": ["check", "-c", str(EXAMPLE)],
            "status": ["status", "--admin", f"http://127.0.0.1:{free_port()}"]}[command]
    python = Path(edge).parent / "python"
    err = subprocess.run([python, "-X", "importtime", "-c", "import sys; from edgecli.main import main; "
                          "sys.argv = ['edge', *sys.argv[1:]]; main()", *args],
                         capture_output=True, text=True).stderr
    rows = []
    for line in err.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m:
            rows.append((int(m[2]), len(m[3]), m[4]))
    print(f"edge {command}: {sum(r[0] for r in rows if r[1] == 1) / 1e6:.3f} s of imports; slowest (cumulative):")
    for cumulative, depth, name in sorted(rows, reverse=True)[:15]:
        print(f"  {cumulative / 1e6:6.3f} s  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edge", default=str(BIN / "edge"), help="the edge program [%(default)s]")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--imports", choices=["help", "version", "check", "status"],
                        help="print what one command imports instead")
    args = parser.parse_args()
    if args.imports:
        imports(args.edge, args.imports)
        return
    edge = args.edge
    print(f"start-up of {edge}")
    closed = f"http://127.0.0.1:{free_port()}"
    for what, command in [("edge --help", [edge, "--help"]), ("edge --version", [edge, "--version"]),
                          ("edge check -c data/edge.example.yaml", [edge, "check", "-c", str(EXAMPLE)]),
                          ("edge status (nothing listening)", [edge, "status", "--admin", closed])]:
        timed(command)      # warm the page cache
        report(what, [timed(command) for _ in range(args.runs)])
    with OriginServer("eu") as origin, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = []
        port = free_port()
        cases.append(("edge run --origin URL: first answer",
                      [edge, "run", "--origin", origin.url, "--listen", f"127.0.0.1:{port}",
                       "--confdir", str(work / "conf")], port))
        for waf in (False, True):
            config, port = demo_config(work, origin.port, waf)
            cases.append((f"edge run -c (demo config, {'with' if waf else 'without'} the WAF): first answer",
                          [edge, "run", "-c", str(config), "--confdir", str(work / "conf")], port))
        for what, command, port in cases:
            first_answer(command, port)
            report(what, [first_answer(command, port) for _ in range(args.runs)])
    waf_loading(args.runs)


def waf_loading(runs: int) -> None:
    """The WAF's share: the engine and the CRS rules loaded as the demo config asks (in this
    process, once the module is imported)."""
    from addons.config import load_config
    from addons.shield.waf import Waf
    waf = load_config(str(EXAMPLE)).shield.waf
    Waf(waf)
    figures = []
    for _ in range(runs):
        start = time.perf_counter()
        Waf(waf)
        figures.append(time.perf_counter() - start)
    report("WAF: ModSecurity and the CRS rules loaded (in-process)", figures)


if __name__ == "__main__":
    main()
