"""Cost of the protocol addon on every request: its rules on a browser-like request head, and
its four hooks, in process (no proxy, no network).

    .venv/bin/python bench/protocol.py [--number 50000]

The figures are microseconds per request; compare them with the edge's time per forwarded
request in `make bench` (about 1.4 ms at 700 req/s on the 2-core machine).
"""

from __future__ import annotations

import argparse
import os
import sys
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mitmproxy.test import tflow  # noqa: E402

from addons.protocol import Protocol, rules  # noqa: E402

BROWSER = [("Host", "shop.example"),
           ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"),
           ("Accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
           ("Accept-Language", "en-US,en;q=0.5"), ("Accept-Encoding", "gzip, deflate, br"),
           ("Cookie", "session=abcdef0123456789; theme=dark"), ("Connection", "keep-alive"),
           ("Upgrade-Insecure-Requests", "1"), ("Sec-Fetch-Dest", "document"), ("Sec-Fetch-Mode", "navigate")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--number", type=int, default=50000)
    n = ap.parse_args().number
    flow = tflow.tflow()
    flow.request.headers.clear()
    for name, value in BROWSER:
        flow.request.headers[name] = value
    data = flow.request.data
    answered = tflow.tflow(resp=True)
    protocol = Protocol()

    def request_side() -> None:
        flow.response = None
        flow.metadata.clear()
        protocol.requestheaders(flow)
        protocol.request(flow)

    figures = {
        f"rules.check_request ({len(BROWSER)} fields)": lambda: rules.check_request(
            data.method, data.path, data.authority, data.http_version, data.headers.fields, h2=False),
        "requestheaders + request hooks": request_side,
        "responseheaders + response hooks": lambda: (protocol.responseheaders(answered), protocol.response(answered)),
    }
    for name, call in figures.items():
        print(f"{name:40} {timeit.timeit(call, number=n) / n * 1e6:6.1f} us per request")


if __name__ == "__main__":
    main()
