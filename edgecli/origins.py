"""Small HTTP/1.1 origins on loopback, each in its own thread: the demo's eu/us/ap servers and
the tests' origins. Each remembers what it received. Some pages leak on purpose.

`edge demo` runs each origin as its own process (OriginProcess; `python -m edgecli.origins`),
so that killing one shows the edge failing over."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
from collections import Counter
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Page = tuple[int, list[tuple[str, str]], bytes]
Handler = Callable[["Seen", "OriginServer"], Page]


class Hangup(Exception):
    """Raised by a page: the origin closes the connection without answering (a crash)."""


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]          # lower-case names; repeated headers joined with ", "
    body: bytes


def _text(status: int, text: str, *headers: tuple[str, str]) -> Page:
    return status, [("Content-Type", "text/plain; charset=utf-8"), *headers], text.encode()


def demo_pages() -> dict[str, Handler]:
    """What every demo origin serves: its name, and the leaks a real origin makes."""
    return {
        "/": lambda req, o: _text(200, f"hello from {o.name}\n", ("Cache-Control", "no-cache")),
        "/cacheable": lambda req, o: _text(200, f"cacheable page from {o.name}\n",
                                           ("Cache-Control", "public, max-age=60"), ("ETag", f'"{o.name}-v1"')),
        "/uncacheable": lambda req, o: _text(200, f"private page from {o.name}\n",
                                             ("Cache-Control", "private, no-store")),
        "/redirect": lambda req, o: _text(302, "moved\n", ("Location", f"{o.url}/")),
        "/login": lambda req, o: _text(200, "logged in\n",
                                       ("Set-Cookie", f"session={o.name}42; Domain={o.host}; Path=/; HttpOnly")),
        "/leaky": lambda req, o: _text(200, "look at the headers\n", ("X-Backend-Server", "10.0.3.7"),
                                       ("X-Debug", f"served-by={o.host}:{o.port}"), ("Via", "1.1 internal-lb"),
                                       ("Link", f"<{o.url}/style.css>; rel=preload")),
        "/echo": lambda req, o: (200, [("Content-Type", "application/json")],
                                 json.dumps({"origin": o.name, "method": req.method, "path": req.path,
                                             "headers": req.headers}).encode()),
        "/health": lambda req, o: _text(200, "ok\n"),
        "/seen": lambda req, o: (200, [("Content-Type", "application/json"), ("Cache-Control", "no-store")],
                                 json.dumps(Counter(s.headers.get("x-forwarded-for", "-") for s in o.seen)).encode()),
    }


class OriginServer:
    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0,
                 pages: dict[str, Handler] | None = None,
                 banner: str = "Apache/2.4.58 (Ubuntu)", powered_by: str | None = "PHP/8.3.1",
                 tls: ssl.SSLContext | None = None) -> None:
        self.name, self.host = name, host
        self.scheme = "https" if tls else "http"
        self.pages = demo_pages() if pages is None else pages
        self.seen: list[Seen] = []
        self.connections = 0            # TCP connections accepted
        origin = self

        class RequestHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # the head and the body are two writes: with Nagle the body waits for the ACK of the
            # head, which the client delays (40 ms a request on a kept-alive connection)
            disable_nagle_algorithm = True

            def version_string(self) -> str:
                return banner

            def log_message(self, *args) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                headers: dict[str, str] = {}
                for k, v in self.headers.items():
                    k = k.lower()
                    headers[k] = f"{headers[k]}, {v}" if k in headers else v
                seen = Seen(self.command, self.path, headers, self.rfile.read(length) if length else b"")
                origin.seen.append(seen)
                handler = origin.pages.get(self.path.split("?", 1)[0])
                try:
                    status, extra, body = handler(seen, origin) if handler else _text(404, "not found\n")
                except Hangup:
                    self.close_connection = True
                    return
                self.send_response(status)
                if powered_by:
                    self.send_header("X-Powered-By", powered_by)
                for k, v in extra:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _serve

        class Server(ThreadingHTTPServer):
            def verify_request(self, request, client_address) -> bool:
                origin.connections += 1
                return True

        self.httpd = Server((host, port), RequestHandler)
        self.httpd.daemon_threads = True
        if tls:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), name=f"origin-{name}", daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def start(self) -> OriginServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> OriginServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class OriginError(Exception):
    """An origin process that did not start, said in a few words (`address already in use`)."""


class OriginProcess:
    """A demo origin in a process of its own (the same Python), on `host:port`: `kill PID` of it
    is a crashed origin machine. In its own session, so that a terminal's Ctrl-C reaches only
    the edge, which stops its origins after its own shutdown; and it dies with the process
    that started it (Linux: the parent-death signal), so no origin outlives the demo."""

    START_TIMEOUT = 10.0

    def __init__(self, name: str, host: str, port: int) -> None:
        self.name, self.host, self.port = name, host, port
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self) -> OriginProcess:
        """Spawns it; `ready()` waits until it listens (several start side by side)."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edgecli.origins", self.name, self.host, str(self.port), str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, start_new_session=True)
        return self

    def ready(self) -> None:
        """Returns once the origin listens; OriginError (and the process stopped) if it cannot."""
        with selectors.DefaultSelector() as sel:
            sel.register(self.process.stdout, selectors.EVENT_READ)
            said = self.process.stdout.readline().strip() if sel.select(self.START_TIMEOUT) else ""
        if said != "listening":
            self.stop()
            raise OriginError(said.removeprefix("error: ") or "it did not start")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()


def _die_with(parent: int) -> None:
    """SIGTERM when the process that started this one dies (Linux's PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)      # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:            # it died before that was set
        sys.exit(0)


def main(argv: list[str]) -> None:
    """One origin as its own process: NAME HOST PORT PARENT_PID. Says `listening` (or
    `error: why`) on stdout; serves until SIGTERM, SIGINT or the parent's death."""
    name, host, port, parent = argv
    _die_with(int(parent))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server = OriginServer(name, host, int(port))
    except OSError as e:
        print(f"error: {(e.strerror or str(e)).lower()}", flush=True)
        sys.exit(1)
    server.httpd.block_on_close = False     # a stopped origin does not wait for the edge's open connections
    print("listening", flush=True)
    try:
        server.httpd.serve_forever(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()


if __name__ == "__main__":
    main(sys.argv[1:])
