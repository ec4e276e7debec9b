"""Time from `edge run` with an empty ACME storage to the first HTTPS answer with a Pebble
certificate (issue 11), on loopback:

    .venv/bin/python bench/acme_start.py            # 3 rounds, each with a fresh storage
    .venv/bin/python bench/acme_start.py --rounds 5

Each round: Debian's Pebble (PEBBLE_VA_NOSLEEP=1, its HTTP-01 validator pointed at the edge's
plain listener), then `edge run -c CONFIG` as a process with a plain and a TLS listener and
`acme.names: [localhost]`; the clock starts just before the process is spawned and stops at the
first `GET /` over TLS that verifies against Pebble's root with the name checked and answers
200. Also printed: when the plain listener first answered (the edge's own start-up). Every
process started is stopped at the end.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cryptography.hazmat.primitives import serialization      # noqa: E402

from tests.conftest import free_port                          # noqa: E402
from tests.test_acme import acme_yaml, start_pebble           # noqa: E402
from edgecli.origins import OriginServer                      # noqa: E402


def answers(port: int, context: ssl.SSLContext | None) -> bool:
    """One GET / (over TLS when a context is given): True on a 200."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
            sock = context.wrap_socket(raw, server_hostname="localhost") if context else raw
            with sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                return sock.recv(12).startswith(b"HTTP/1.1 200")
    except (OSError, ssl.SSLError):
        return False


def one_round(folder: Path, origin: OriginServer) -> tuple[float, float]:
    pebble_proc, pebble = start_pebble(folder)
    edge_proc = None
    try:
        tls = free_port()
        config = folder / "edge.yaml"
        config.write_text(acme_yaml(origin.url, pebble, folder / "acme", tls))
        verify = ssl.create_default_context(cadata=pebble.root().public_bytes(serialization.Encoding.PEM).decode())
        started = time.monotonic()
        edge_proc = subprocess.Popen([str(REPO / ".venv/bin/edge"), "run", "-c", str(config),
                                      "--confdir", str(folder / "confdir")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        plain_at = None
        deadline = started + 120
        while time.monotonic() < deadline:
            if edge_proc.poll() is not None:
                raise SystemExit("edge exited early")
            if plain_at is None and answers(pebble.http_port, None):
                plain_at = time.monotonic() - started
            if plain_at is not None and answers(tls, verify):
                return plain_at, time.monotonic() - started
            time.sleep(0.02)
        raise SystemExit("no HTTPS answer with a Pebble certificate within 120 s")
    finally:
        for proc in (edge_proc, pebble_proc):
            if proc is not None:
                proc.terminate()
                proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    origin = OriginServer("web").start()
    plains, firsts = [], []
    try:
        for i in range(args.rounds):
            with tempfile.TemporaryDirectory(prefix="edge-acme-bench-") as tmp:
                plain, first = one_round(Path(tmp), origin)
            plains.append(plain)
            firsts.append(first)
            print(f"round {i + 1}: plain listener answered after {plain:.2f}s, "
                  f"first HTTPS answer with a Pebble certificate after {first:.2f}s")
    finally:
        origin.stop()
    print(f"median of {args.rounds}: plain {statistics.median(plains):.2f}s, "
          f"first HTTPS with a Pebble certificate {statistics.median(firsts):.2f}s")


if __name__ == "__main__":
    main()
