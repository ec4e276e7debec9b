"""The test harness: real origins on 127.0.0.1, a real edge master (the same code `edge run`
uses) on an ephemeral loopback port in a background thread, and real HTTP clients."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from addons.config import EdgeConfig, config_from_origins, parse_config
from edgecli import launch as launcher
from edgecli.origins import OriginServer

REPO = Path(__file__).resolve().parent.parent


@dataclass
class RunningEdge:
    master: object
    host: str
    port: int
    config: EdgeConfig

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until(condition, timeout: float = 10.0, what: str = "the condition"):
    """Poll `condition` until it answers something true (that answer), within `timeout` seconds:
    for state with no event to wait on (another process's files, health tables on their clock)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    """Poll until the port accepts (the process gives no other readiness signal)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited early: {proc.communicate()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"port {port} never opened")


@pytest.fixture
def origin() -> Iterator[Callable[..., OriginServer]]:
    """Factory: origin(name, pages=None, **kw) -> a started OriginServer, stopped afterwards."""
    started: list[OriginServer] = []

    def make(name: str = "origin", **kw) -> OriginServer:
        server = OriginServer(name, **kw).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def confdir(tmp_path_factory) -> str:
    """mitmproxy's CA is made once per session (it costs a key generation)."""
    return str(tmp_path_factory.mktemp("confdir"))


@pytest.fixture
def edge(confdir) -> Iterator[Callable[..., RunningEdge]]:
    """Factory: edge(config | yaml text | [origin urls], **launch kw) -> a running edge."""
    running: list[tuple[object, threading.Thread]] = []

    def start(config, access_log: str | None = None, **kw) -> RunningEdge:
        # mitmproxy's connection handlers dispatch hooks to the process-wide ctx.master, so a
        # second master in this process would take over the first one's flows: one per test.
        assert not running, "one edge per test (mitmproxy's ctx.master is process-wide)"
        if isinstance(config, str):
            config = parse_config(config, "test.yaml")
        elif isinstance(config, list):
            config = config_from_origins(config)
        config = replace(config, listen=("127.0.0.1", 0), access_log=access_log or config.access_log)
        ready = threading.Event()
        box: dict = {}

        def on_ready(master, addr) -> None:
            box["edge"] = RunningEdge(master, addr[0], addr[1], config)
            ready.set()

        launch = launcher.Launch(config=config, confdir=confdir, on_ready=on_ready,
                                 handle_signals=False, **kw)

        def main() -> None:
            try:
                launcher.run(launch)
            except BaseException as e:      # surfaced to the test below
                box["error"] = e
                ready.set()

        thread = threading.Thread(target=main, name="edge", daemon=True)
        thread.start()
        assert ready.wait(20), "edge did not start"
        if "error" in box:
            raise box["error"]
        running.append((box["edge"].master, thread))
        return box["edge"]

    yield start
    for master, thread in running:
        try:
            master.shutdown()
        except RuntimeError:            # its loop is closed: the test stopped it (a graceful shutdown)
            pass
        thread.join(10)
        assert not thread.is_alive(), "edge did not shut down"


@dataclass
class TLSFiles:
    pem: Path        # leaf certificate + key, what `edge run --cert` takes
    ca: Path         # the CA that signed it, what clients verify against

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.pem)
        return ctx


def _cert(subject: str, key, issuer: x509.Name, issuer_key, ca: bool):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="session")
def tls(tmp_path_factory) -> TLSFiles:
    """A test CA and a leaf certificate for localhost/127.0.0.1 signed by it."""
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = _cert("edge test CA", ca_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge test CA")]),
                    ca_key, ca=True)
    leaf = _cert("localhost", leaf_key, ca_cert.subject, ca_key, ca=False)
    folder = tmp_path_factory.mktemp("tls")
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)
    (folder / "ca.pem").write_bytes(pem(ca_cert))
    (folder / "edge.pem").write_bytes(pem(leaf) + pem(ca_cert) + leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return TLSFiles(folder / "edge.pem", folder / "ca.pem")


@pytest.fixture
def redis_url(redis_server) -> str:
    """A real redis-server on an ephemeral loopback port, for this test only."""
    return redis_server.url


class RedisServer:
    """A redis-server on a fixed ephemeral loopback port that a test can stop and start again."""

    def __init__(self, binary: str, folder: Path) -> None:
        self.binary, self.folder, self.port = binary, folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                                      "--appendonly", "no", "--dir", str(self.folder)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    """Like redis_url, with stop() and start() for outages in the middle of a test."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (make test installs Debian's redis-server)")
    server = RedisServer(binary, tmp_path)
    server.start()
    yield server
    server.stop()
