"""Automatic certificates against Let's Encrypt's test CA, Pebble (Debian's `pebble`), on
loopback: issuance at start over HTTP-01 on the edge's plain listener, renewal ahead of expiry,
storage shared by several processes (one order for one name), the challenge responder."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from addons.config import AcmeConfig
from addons.tls.acme import AcmeManager, NameLock, challenge_token, renewal_at, write_atomic
from addons.tls.certs import CertificateFile, Certificates
from tests.conftest import free_port, until, wait_for_port
from tests.test_tls import CA, presented

PEBBLE = shutil.which("pebble")
needs_pebble = pytest.mark.skipif(PEBBLE is None, reason="Debian's pebble is not installed (make system installs it)")


@dataclass
class Pebble:
    directory: str
    ca_bundle: Path           # what signs Pebble's own HTTPS (its directory)
    management: int
    http_port: int            # where Pebble's validator fetches HTTP-01 challenges: the edge's plain listener

    def root(self) -> x509.Certificate:
        """The root of the certificates Pebble issues (made anew each run)."""
        r = httpx.get(f"https://localhost:{self.management}/roots/0", verify=ssl.create_default_context(cafile=str(self.ca_bundle)))
        return x509.load_pem_x509_certificate(r.content)


def start_pebble(folder: Path, validity: int | None = None):
    ca = CA()
    cert, key, _ = ca.issue(folder, "pebble", "localhost")
    (folder / "pebble-ca.pem").write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    listen, management, http_port, tls_port = (free_port() for _ in range(4))
    config = {"pebble": {"listenAddress": f"127.0.0.1:{listen}", "managementListenAddress": f"127.0.0.1:{management}",
                         "certificate": str(cert), "privateKey": str(key), "httpPort": http_port,
                         "tlsPort": tls_port, "ocspResponderURL": "", "externalAccountBindingRequired": False}}
    if validity is not None:
        config["pebble"]["certificateValidityPeriod"] = validity
    (folder / "pebble.json").write_text(json.dumps(config))
    env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}
    proc = subprocess.Popen([PEBBLE, "-config", str(folder / "pebble.json")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(listen, proc)
    return proc, Pebble(f"https://localhost:{listen}/dir", folder / "pebble-ca.pem", management, http_port)


@pytest.fixture
def pebble(tmp_path, request):
    """A Pebble of its own per test; `@pytest.mark.parametrize("pebble", [seconds], indirect=True)`
    sets the validity of the certificates it issues."""
    folder = tmp_path / "pebble"
    folder.mkdir()
    proc, running = start_pebble(folder, getattr(request, "param", None))
    yield running
    proc.terminate()
    proc.wait(10)


def acme_yaml(origin_url: str, pebble: Pebble, storage: Path, tls: int, renew_before: str = "30d") -> str:
    return f"""
listen:
  - 127.0.0.1:{pebble.http_port}
  - {{address: 127.0.0.1:{tls}, tls: true}}
acme:
  directory: {pebble.directory}
  email: ops@example.org
  storage: {storage}
  ca_bundle: {pebble.ca_bundle}
  names: [localhost]
  renew_before: {renew_before}
pools: {{web: {{origins: [{origin_url}]}}}}
"""


def leaf_of(port: int) -> x509.Certificate | None:
    """The certificate presented for `localhost`, or None while the handshake fails."""
    try:
        return x509.load_der_x509_certificate(presented(port, "localhost")[0])
    except (ssl.SSLError, OSError):
        return None


def issuer(cert: x509.Certificate | None) -> str:
    return cert.issuer.rfc4514_string() if cert is not None else ""


# -- pure ----------------------------------------------------------------------------------------

def test_challenge_paths():
    assert challenge_token("/.well-known/acme-challenge/abc_DEF-123") == "abc_DEF-123"
    assert challenge_token("/.well-known/acme-challenge/abc?x=1") == "abc"
    for path in ("/.well-known/acme-challenge/", "/.well-known/acme-challenge/../../etc/passwd",
                 "/.well-known/acme-challenge/a/b", "/other", "/.well-known/acme-challenge/a%2F"):
        assert challenge_token(path) is None, path


# -- against Pebble --------------------------------------------------------------------------------

@needs_pebble
@pytest.mark.parametrize("pebble", [15], indirect=True)
def test_issued_at_start_over_http01_then_renewed_before_expiry(edge, origin, pebble, tmp_path):
    o = origin("web")
    storage, tls = tmp_path / "acme", free_port()
    running = edge(acme_yaml(o.url, pebble, storage, tls))
    assert httpx.get(f"http://127.0.0.1:{pebble.http_port}/").text == "hello from web\n"   # served meanwhile
    until(lambda: "Pebble Intermediate" in issuer(leaf_of(tls)), timeout=60)
    first = leaf_of(tls)
    # a verifying client: Pebble's root, the name checked
    verify = ssl.create_default_context(cadata=pebble.root().public_bytes(serialization.Encoding.PEM).decode())
    with socket.create_connection(("127.0.0.1", tls), timeout=5) as raw, \
            verify.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello from web\n")
    # stored: the account key and the certificate (key inside) readable by the edge's user alone
    for path in (storage / "account.key", storage / "certificates" / "localhost.pem"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(storage.stat().st_mode) == 0o700
    assert list((storage / "challenges").iterdir()) == []         # answered challenges are removed
    # a 15 s certificate is renewed with a third of its life left: a new one, from the same account
    manager = running.master.addons.get("tlsconfig").tls.acme
    until(lambda: (leaf := leaf_of(tls)) is not None and leaf.serial_number != first.serial_number, timeout=60)
    renewed = leaf_of(tls)
    assert "Pebble Intermediate" in issuer(renewed) and renewed.not_valid_after_utc > first.not_valid_after_utc
    assert manager.orders >= 2
    assert renewal_at(manager.certificates.acme["localhost"], 30 * 86400) < renewed.not_valid_after_utc


@needs_pebble
def test_processes_sharing_storage_order_a_name_once(edge, origin, pebble, tmp_path):
    """The edge and two other managers (as other edge processes would) start together on one
    empty storage: one order in all. Whoever orders, the edge answers the CA's validator (the
    challenge is in storage). A restart finds the stored certificate and orders nothing."""
    o = origin("web")
    storage, tls = tmp_path / "acme", free_port()
    config = AcmeConfig(pebble.directory, str(storage), "ops@example.org", str(pebble.ca_bundle), ("localhost",))
    others = [AcmeManager(config, Certificates(), lambda: ("localhost",)) for _ in range(2)]
    held: list = []
    threads = [threading.Thread(target=lambda m=m: held.append(m.hold("localhost"))) for m in others]
    running = edge(acme_yaml(o.url, pebble, storage, tls))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    until(lambda: "Pebble Intermediate" in issuer(leaf_of(tls)), timeout=60)
    mine = running.master.addons.get("tlsconfig").tls.acme
    assert mine.orders + sum(m.orders for m in others) == 1
    assert len({p.leaf.serial_number for p in held} | {leaf_of(tls).serial_number}) == 1
    restarted = AcmeManager(config, Certificates(), lambda: ("localhost",))
    assert restarted.hold("localhost").leaf == held[0].leaf and restarted.orders == 0
    # another process finding none stored orders one; the edge answers its challenge from storage
    (storage / "certificates" / "localhost.pem").unlink()
    assert restarted.hold("localhost").leaf != held[0].leaf and restarted.orders == 1


@needs_pebble
def test_acme_only_before_issuance_refuses_tls_and_never_mints(edge, origin, pebble, tmp_path):
    """Pebble's validator cannot reach the edge (the plain listener is elsewhere): no certificate
    is issued, TLS clients are refused (nothing minted), plain HTTP is served, unknown
    challenge tokens get 404, and the failed order is retried later, not in a loop."""
    o = origin("web")
    storage, tls, plain = tmp_path / "acme", free_port(), free_port()
    text = acme_yaml(o.url, pebble, storage, tls).replace(f"127.0.0.1:{pebble.http_port}", f"127.0.0.1:{plain}")
    running = edge(text)
    manager = running.master.addons.get("tlsconfig").tls.acme
    until(lambda: "localhost" in manager.failed, timeout=60)
    assert leaf_of(tls) is None
    assert httpx.get(f"http://127.0.0.1:{plain}/").status_code == 200
    r = httpx.get(f"http://127.0.0.1:{plain}/.well-known/acme-challenge/unknowntoken")
    assert r.status_code == 404 and len(o.seen) == 1           # answered by the edge, not the origin
    assert manager.failed["localhost"][1] >= 30


def test_renewal_time_is_renew_before_or_a_third_of_a_short_life(tmp_path):
    ca = CA()
    long_cert = CertificateFile(*[str(p) for p in ca.issue(tmp_path, "long", "a.example", days=88)[:2]]).pair
    short = CertificateFile(*[str(p) for p in ca.issue(tmp_path, "short", "b.example", days=4)[:2]]).pair
    day = datetime.timedelta(days=1)
    assert renewal_at(long_cert, 30 * 86400) == long_cert.not_after - 30 * day      # lifetime 90 days
    assert renewal_at(short, 30 * 86400) == short.not_after - 2 * day               # lifetime 6 days: a third


def test_a_name_lock_held_elsewhere_is_waited_for_then_given_up(tmp_path):
    path = str(tmp_path / "name.lock")
    with NameLock(path):
        with pytest.raises(TimeoutError, match="held by another process"):
            with NameLock(path, wait=0.3):
                pass
    with NameLock(path, wait=0.3):          # released: taken at once
        pass


def test_storage_writes_are_atomic_and_private(tmp_path):
    target = tmp_path / "f"
    write_atomic(str(target), b"one")
    write_atomic(str(target), b"two")
    assert target.read_bytes() == b"two" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["f"]          # no temporary left behind


def test_challenges_are_answered_before_the_shield_and_only_challenges(edge, origin, tmp_path):
    """A rate-limited client (the CA's validator is one) still gets the key authorization, from
    storage (another process's order); other paths of the shield are unchanged, and with no
    such token the edge answers 404 itself. The CA's directory is unreachable here: the
    failed orders are retried in the background while the edge serves."""
    o = origin("web")
    storage, plain = tmp_path / "acme", free_port()
    running = edge(f"""
listen: [127.0.0.1:{plain}]
acme: {{directory: "https://127.0.0.1:{free_port()}/dir", storage: {storage}, names: [localhost]}}
shield: {{rate_limit: {{rate: 1/m, burst: 1}}}}
pools: {{web: {{origins: [{o.url}]}}}}
""")
    (storage / "challenges").mkdir(parents=True, exist_ok=True)
    (storage / "challenges" / "tok_123").write_text("tok_123.thumbprint")
    base = f"http://127.0.0.1:{plain}"
    assert httpx.get(base + "/").status_code == 200
    assert httpx.get(base + "/").status_code == 429                  # the burst is spent
    for _ in range(3):
        r = httpx.get(base + "/.well-known/acme-challenge/tok_123")
        assert r.status_code == 200 and r.text == "tok_123.thumbprint"
        assert r.headers["cache-control"] == "no-store"
    assert httpx.get(base + "/.well-known/acme-challenge/other").status_code == 404
    assert httpx.post(base + "/.well-known/acme-challenge/tok_123").status_code == 429   # GET/HEAD only
    assert len(o.seen) == 1
    manager = running.master.addons.get("tlsconfig").tls.acme
    until(lambda: "localhost" in manager.failed, timeout=15)


def test_names_a_configured_certificate_covers_are_not_ordered(tmp_path):
    ca = CA()
    wild = CertificateFile(*[str(p) for p in ca.issue(tmp_path, "wild", "*.shop.example")[:2]])
    config = AcmeConfig("https://127.0.0.1:9/dir", str(tmp_path / "acme"))
    names = ("a.shop.example", "shop.example", "blog.example", "shop.example")
    manager = AcmeManager(config, Certificates([wild]), lambda: names)
    assert manager.wanted() == ["shop.example", "blog.example"]      # once each, in order
