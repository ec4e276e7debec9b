"""TLS listeners and certificates chosen by SNI: real handshakes with Python's ssl against the
edge's TLS listener, certificates generated here with `cryptography`, file reload."""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from addons.config import ConfigError, parse_config
from addons.tls.certs import Certificates, CertificateFile, choose, covers, parse_pair
from tests.conftest import free_port, until, wait_for_port
from tests.test_proxy import curl

DAY = datetime.timedelta(days=1)
BIN = Path(sys.executable).parent


class CA:
    """A test CA issuing leaf certificates for the names asked."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tls test CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - DAY).not_valid_after(now + 30 * DAY)
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                     .sign(self.key, hashes.SHA256()))

    def issue(self, folder: Path, stem: str, *names: str, days: int = 30) -> tuple[Path, Path, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        leaf = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - 2 * DAY).not_valid_after(now + days * DAY)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
                .sign(self.key, hashes.SHA256()))
        cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
        pem = lambda c: c.public_bytes(serialization.Encoding.PEM)
        replace(cert_path, pem(leaf) + pem(self.cert))
        replace(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
        return cert_path, key_path, leaf


def replace(path: Path, data: bytes) -> None:
    """As an operator's deploy does: a new file renamed over the old one."""
    tmp = path.with_suffix(path.suffix + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def presented(port: int, sni: str | None, alpn: list[str] | None = None) -> tuple[bytes, str | None]:
    """The leaf certificate (DER) the edge presents for this SNI, and the ALPN it picked."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as tls_sock:
            return tls_sock.getpeercert(binary_form=True), tls_sock.selected_alpn_protocol()


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA()


def site_config(origin_url: str, plain: int, tls: int, pairs: list[tuple[Path, Path]]) -> str:
    certs = "\n".join(f"  - {{cert: {c}, key: {k}}}" for c, k in pairs)
    return f"""
listen:
  - 127.0.0.1:{plain}
  - {{address: 127.0.0.1:{tls}, tls: true}}
certificates:
{certs}
pools: {{web: {{origins: [{origin_url}]}}}}
"""


# -- pure: names and matching -------------------------------------------------------------------

def test_wildcard_covers_exactly_one_label():
    assert covers("*.example.com", "a.example.com")
    assert not covers("*.example.com", "example.com")
    assert not covers("*.example.com", "a.b.example.com")
    assert not covers("*.example.com", ".example.com")
    assert covers("shop.example", "shop.example") and not covers("shop.example", "x.shop.example")


def test_exact_name_wins_over_an_earlier_wildcard(ca, tmp_path):
    wild = CertificateFile(*[str(p) for p in ca.issue(tmp_path, "wild", "*.b.example")[:2]])
    exact = CertificateFile(*[str(p) for p in ca.issue(tmp_path, "exact", "x.b.example")[:2]])
    pairs = [wild.pair, exact.pair]
    assert choose(pairs, "x.b.example") is exact.pair
    assert choose(pairs, "X.B.Example.") is exact.pair          # case and a trailing dot
    assert choose(pairs, "y.b.example") is wild.pair
    assert choose(pairs, "b.example") is None and choose(pairs, None) is None
    assert Certificates([wild, exact]).pick("nothing.example") is wild.pair     # the default: first


def test_key_not_matching_the_certificate_is_refused(ca, tmp_path):
    cert_a, _, _ = ca.issue(tmp_path, "a", "a.example")
    _, key_b, _ = ca.issue(tmp_path, "b", "b.example")
    with pytest.raises(ValueError, match="does not match"):
        parse_pair(cert_a.read_bytes(), key_b.read_bytes())


def test_config_errors_name_file_line_and_key(ca, tmp_path):
    cert_a, key_a, _ = ca.issue(tmp_path, "a", "a.example")
    _, key_b, _ = ca.issue(tmp_path, "b", "b.example")
    base = "pools: {web: {origins: [http://127.0.0.1:9]}}\n"
    cases = {
        f"certificates:\n  - {{cert: {tmp_path}/missing.pem, key: {key_a}}}\n": "cert.yaml:2: certificates[0]: ",
        f"certificates:\n  - {{cert: {cert_a}, key: {key_b}}}\n": "does not match",
        "listen:\n  - {address: 127.0.0.1:8443, tls: true}\n": "cert.yaml:2: listen[0].tls: a TLS listener needs",
        "listen:\n  - 127.0.0.1:8080\n  - {address: 127.0.0.1:8080, tls: true}\n": "listed twice",
        f"certificates:\n  - {{cert: {cert_a}}}\n": "certificates[0].key",
        "listen: [{address: 1, tls: yes please}]\n": "listen[0].tls: expected true or false",
    }
    for text, expected in cases.items():
        with pytest.raises(ConfigError) as e:
            parse_config(text + base, "cert.yaml")
        assert expected in str(e.value), (text, str(e.value))


def test_relative_certificate_paths_are_relative_to_the_config_file(ca, tmp_path):
    ca.issue(tmp_path, "a", "a.example")
    (tmp_path / "edge.yaml").write_text("certificates: [{cert: a.pem, key: a.key}]\n"
                                        "pools: {web: {origins: [http://127.0.0.1:9]}}\n")
    from addons.config import load_config
    cfg = load_config(str(tmp_path / "edge.yaml"))
    assert cfg.certificates[0].cert == str(tmp_path / "a.pem")


def test_the_three_sites_example_is_a_valid_config(ca, tmp_path):
    """data/three-sites/edge.yaml, the README's side-by-side with nginx and Caddy, loads."""
    ca.issue(tmp_path, "shop", "shop.example", "*.shop.example")
    ca.issue(tmp_path, "blog", "blog.example")
    example = Path(__file__).resolve().parent.parent / "data" / "three-sites" / "edge.yaml"
    cfg = parse_config(example.read_text().replace("/etc/edge/certs/", f"{tmp_path}/"), str(example))
    assert set(cfg.sites) == {"shop", "blog"} and [listener.tls for listener in cfg.all_listeners] == [False, True]
    assert [route.path for route in cfg.sites["shop"].routes] == ["/api/", "/static/", "/"]
    assert cfg.https_port == 443 and cfg.sites["blog"].routes[0].origin_path == "/blog"


# -- real handshakes against the edge -----------------------------------------------------------

def test_sni_picks_each_certificate_and_unknown_names_get_the_default(edge, origin, ca, tmp_path):
    o = origin("web")
    a = ca.issue(tmp_path, "a", "a.example", "www.a.example")
    wild = ca.issue(tmp_path, "wild", "*.b.example")
    exact = ca.issue(tmp_path, "exact", "x.b.example")
    plain, tls = free_port(), free_port()
    edge(site_config(o.url, plain, tls, [a[:2], wild[:2], exact[:2]]))
    assert presented(tls, "a.example")[0] == der(a[2])
    assert presented(tls, "www.a.example")[0] == der(a[2])
    assert presented(tls, "y.b.example")[0] == der(wild[2])
    assert presented(tls, "x.b.example")[0] == der(exact[2])        # exact before the wildcard listed first
    for unknown in (None, "b.example", "deep.x.b.example", "attacker.example"):
        assert presented(tls, unknown)[0] == der(a[2]), unknown     # the default, never a minted one
    # a verifying client (the test CA, hostname checked) gets its page over HTTP/1.1
    verify = ssl.create_default_context()
    verify.load_verify_locations(cadata=ca.cert.public_bytes(serialization.Encoding.PEM).decode())
    with httpx.Client(verify=verify) as client:
        r = client.get(f"https://127.0.0.1:{tls}/", headers={"Host": "y.b.example"},
                       extensions={"sni_hostname": "y.b.example"})
    assert r.status_code == 200 and r.text == "hello from web\n" and r.http_version == "HTTP/1.1"


def test_http2_over_tls_by_alpn(edge, origin, ca, tmp_path):
    o = origin("web")
    a = ca.issue(tmp_path, "a", "a.example")
    plain, tls = free_port(), free_port()
    edge(site_config(o.url, plain, tls, [a[:2]]))
    assert presented(tls, "a.example", ["h2", "http/1.1"])[1] == "h2"
    assert presented(tls, "a.example", ["http/1.1"])[1] == "http/1.1"
    (tmp_path / "ca.pem").write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    status, headers, body = curl("--http2", "--cacert", str(tmp_path / "ca.pem"),
                                 "--resolve", f"a.example:{tls}:127.0.0.1", f"https://a.example:{tls}/echo")
    assert status == 200 and headers[":version"] == "HTTP/2"       # verified: SNI and name match
    assert json.loads(body)["headers"]["host"] == f"a.example:{tls}"


def test_plain_and_tls_listeners_at_once_each_keeps_its_kind(edge, origin, ca, tmp_path):
    o = origin("web")
    a = ca.issue(tmp_path, "a", "a.example")
    plain, tls = free_port(), free_port()
    edge(site_config(o.url, plain, tls, [a[:2]]))
    assert httpx.get(f"http://127.0.0.1:{plain}/").text == "hello from web\n"
    assert httpx.get(f"https://127.0.0.1:{tls}/", verify=False).text == "hello from web\n"
    # TLS on the plain listener: no certificate, the handshake fails (and nothing is minted)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        presented(plain, "a.example")
    # plain HTTP on the TLS listener: 400 from the edge, the origin never asked
    before = len(o.seen)
    r = httpx.get(f"http://127.0.0.1:{tls}/")
    assert r.status_code == 400 and "TLS" in r.text and r.headers["connection"] == "close"
    assert len(o.seen) == before
    # and everyone else is still served
    assert httpx.get(f"https://127.0.0.1:{tls}/", verify=False).status_code == 200


def test_replaced_files_are_presented_and_a_broken_replacement_keeps_the_old(edge, origin, ca, tmp_path):
    o = origin("web")
    first = ca.issue(tmp_path, "a", "a.example")
    plain, tls = free_port(), free_port()
    running = edge(site_config(o.url, plain, tls, [first[:2]]))
    assert presented(tls, "a.example")[0] == der(first[2])
    second = ca.issue(tmp_path, "a", "a.example")       # the same files, new contents
    until(lambda: presented(tls, "a.example")[0] == der(second[2]))
    # a broken chain file, then a key that is not the certificate's: the old pair stays
    files = running.master.addons.get("tlsconfig").tls.certificates.files[0]
    replace(first[0], b"-----BEGIN CERTIFICATE-----\nbroken\n")
    until(lambda: presented(tls, "a.example") and files.rejected is not None)     # checked on handshakes
    assert presented(tls, "a.example")[0] == der(second[2])
    other = ca.issue(tmp_path, "other", "a.example")
    replace(first[0], other[0].read_bytes())             # new cert, old key: mismatch
    rejected = files.rejected
    until(lambda: presented(tls, "a.example") and files.rejected not in (None, rejected))
    assert presented(tls, "a.example")[0] == der(second[2])
    assert httpx.get(f"https://127.0.0.1:{tls}/", verify=False).status_code == 200
    # a good pair afterwards is taken
    replace(first[1], other[1].read_bytes())
    until(lambda: presented(tls, "a.example")[0] == der(other[2]))


def test_the_single_listen_config_keeps_working(edge, origin):
    o = origin("web")
    running = edge(f"listen: 127.0.0.1:0\npools: {{web: {{origins: [{o.url}]}}}}\n")
    assert httpx.get(running.url + "/").text == "hello from web\n"


def test_edge_run_announces_each_listener_and_serves_both(origin, ca, tmp_path):
    o = origin("web")
    a = ca.issue(tmp_path, "a", "a.example")
    plain, tls = free_port(), free_port()
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(site_config(o.url, plain, tls, [a[:2]]))
    proc = subprocess.Popen([BIN / "edge", "run", "-c", str(cfg), "--confdir", str(tmp_path / "conf")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(tls, proc)
        assert presented(tls, "a.example")[0] == der(a[2])
        assert httpx.get(f"http://127.0.0.1:{plain}/").status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    assert f"listening on http://127.0.0.1:{plain}, https://127.0.0.1:{tls}," in err
    both = subprocess.run([BIN / "edge", "run", "-c", str(cfg), "--cert", str(a[0])], capture_output=True, text=True)
    assert both.returncode != 0 and "not both" in both.stderr


def test_an_expired_certificate_is_presented_with_a_warning(edge, origin, ca, tmp_path, caplog):
    """Refusing to start would take every other site down with it; clients refuse it anyway."""
    o = origin("web")
    old = ca.issue(tmp_path, "old", "old.example", days=-1)
    plain, tls = free_port(), free_port()
    edge(site_config(o.url, plain, tls, [old[:2]]))
    assert presented(tls, "old.example")[0] == der(old[2])
    assert any("expired" in r.getMessage() and "old.pem" in r.getMessage() for r in caplog.records)


def test_a_listener_that_cannot_bind_stops_the_start(edge, origin, ca, tmp_path):
    from edgecli.launch import LaunchError
    o = origin("web")
    a = ca.issue(tmp_path, "a", "a.example")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        plain, tls = free_port(), taken.getsockname()[1]
        with pytest.raises(LaunchError, match=f"cannot listen on 127.0.0.1:{plain}, 127.0.0.1:{tls}"):
            edge(site_config(o.url, plain, tls, [a[:2]]))
