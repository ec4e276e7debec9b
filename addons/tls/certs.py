"""The operator's certificates: loaded from PEM files, chosen by the name a TLS client asks for
(SNI), reloaded when their files change.

Pure (no mitmproxy import): launch.py's EdgeTlsConfig turns the chosen `Pair` into what
mitmproxy's TLS layer takes. A name is matched as nginx and Caddy do: an exact DNS name of a
certificate first, then a wildcard `*.example` covering exactly one more label; a client that
sends no SNI or a name nothing covers gets the default certificate (the first configured one, or
an ACME one when no file is configured), never one minted by mitmproxy's CA.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

logger = logging.getLogger("edge")
RELOAD_CHECK = 2.0          # seconds between two looks at the files' mtimes (a stat per file)


@dataclass(frozen=True, eq=False)       # identity: launch caches mitmproxy's form of each
class Pair:
    """A certificate chain (leaf first) and its private key, ready to present."""
    chain: tuple[x509.Certificate, ...]
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    names: tuple[str, ...]          # lower-case DNS names of the leaf (SAN; the CN if it has no SAN)

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_after(self) -> datetime.datetime:
        return self.leaf.not_valid_after_utc

    def expired(self, now: datetime.datetime | None = None) -> bool:
        return (now or datetime.datetime.now(datetime.timezone.utc)) > self.not_after


def leaf_names(cert: x509.Certificate) -> tuple[str, ...]:
    """The DNS names a certificate is for: its subjectAltName DNS entries (RFC 6125: the CN is
    looked at only when there is no SAN)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return tuple(n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        cns = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
        return tuple(str(a.value).lower().rstrip(".") for a in cns[:1])


def parse_pair(chain_pem: bytes, key_pem: bytes) -> Pair:
    """A Pair from PEM bytes. ValueError with a message for the user when the chain or the key
    cannot be read or the key is not the leaf's."""
    try:
        chain = tuple(x509.load_pem_x509_certificates(chain_pem))
    except ValueError:
        raise ValueError("no PEM certificate in the file") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"the private key cannot be read ({str(e).splitlines()[0] if str(e) else 'not PEM'})") from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
        raise ValueError("the private key is not RSA, EC or Ed25519")
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, raw) != \
            chain[0].public_key().public_bytes(serialization.Encoding.DER, raw):
        raise ValueError("the private key does not match the certificate (the first one in the chain file)")
    return Pair(chain, key, leaf_names(chain[0]))


def load_pair(cert_path: str, key_path: str) -> Pair:
    """A Pair from its two files; ValueError naming the file that is wrong."""
    blobs = []
    for path in (cert_path, key_path):
        try:
            with open(path, "rb") as f:
                blobs.append(f.read())
        except OSError as e:
            raise ValueError(f"{path}: cannot read: {e.strerror}") from None
    try:
        return parse_pair(*blobs)
    except ValueError as e:
        raise ValueError(f"{cert_path}: {e}") from None


def covers(pattern: str, name: str) -> bool:
    """Does a certificate name cover a host name: equal, or `*.rest` with exactly one label
    in place of the star (RFC 6125 6.4.3: `*.example.com` covers a.example.com, not
    example.com nor a.b.example.com)."""
    if pattern == name:
        return True
    if not pattern.startswith("*."):
        return False
    label, dot, rest = name.partition(".")
    return bool(label) and bool(dot) and rest == pattern[2:]


def choose(pairs: Iterable[Pair], name: str | None) -> Pair | None:
    """The pair for an SNI name: an exact name wins over a wildcard, earlier pairs over later
    ones; None when none covers it (the caller then uses its default)."""
    if not name:
        return None
    name = name.lower().rstrip(".")
    pairs = list(pairs)
    for pair in pairs:
        if name in pair.names:
            return pair
    for pair in pairs:
        if any(n.startswith("*.") and covers(n, name) for n in pair.names):
            return pair
    return None


class CertificateFile:
    """One configured `{cert, key}`: the pair last loaded, reloaded when either file's mtime
    or size changes. A replacement that does not load keeps the old pair and is reported once
    (per change of the files), so a half-written or wrong file never takes a site's TLS down."""

    def __init__(self, cert_path: str, key_path: str) -> None:
        self.cert_path, self.key_path = cert_path, key_path
        self.stamp = self._stamp()
        self.pair = load_pair(cert_path, key_path)      # at start, a bad file is a config error
        self.rejected: tuple | None = None

    def _stamp(self) -> tuple:
        out = []
        for path in (self.cert_path, self.key_path):
            try:
                st = os.stat(path)
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append(None)
        return tuple(out)

    def refresh(self) -> bool:
        """Reload if the files changed; True when a new pair is now in use."""
        stamp = self._stamp()
        if stamp == self.stamp or stamp == self.rejected:
            return False
        try:
            pair = load_pair(self.cert_path, self.key_path)
        except ValueError as e:
            self.rejected = stamp
            logger.error("edge: certificate %s not reloaded, the one loaded before stays in use: %s",
                         self.cert_path, e)
            return False
        self.pair, self.stamp, self.rejected = pair, stamp, None
        logger.info("edge: certificate %s reloaded (%s, valid until %s)", self.cert_path,
                    ", ".join(pair.names), pair.not_after.date())
        if pair.expired():
            logger.warning("edge: certificate %s has expired (%s)", self.cert_path, pair.not_after)
        return True


class Certificates:
    """Every certificate the edge may present: the configured files (first = default) and
    the ACME ones (set by the ACME manager, from another thread). `pick` is called on every
    TLS handshake: at most one stat per file every RELOAD_CHECK seconds."""

    def __init__(self, files: Iterable[CertificateFile] = (), check_every: float = RELOAD_CHECK) -> None:
        self.files = list(files)
        self.check_every = check_every
        self.checked = time.monotonic()
        self.acme: dict[str, Pair] = {}
        self.lock = threading.Lock()

    def set_acme(self, name: str, pair: Pair) -> None:
        with self.lock:
            self.acme = {**self.acme, name: pair}       # replaced whole: readers never lock

    def refresh(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now - self.checked < self.check_every:
            return
        self.checked = now
        for f in self.files:
            f.refresh()

    def pick(self, name: str | None) -> Pair | None:
        """The pair for this SNI name, else the default one; None when there is none at all."""
        self.refresh()
        configured, acme = [f.pair for f in self.files], self.acme
        found = choose([*configured, *acme.values()], name)     # exact names before wildcards
        if found is not None:
            return found
        if configured:
            return configured[0]
        return next(iter(acme.values()), None)

    def covered(self, name: str) -> bool:
        """Does a configured file cover this name (then ACME need not order one for it)?"""
        return choose([f.pair for f in self.files], name) is not None
