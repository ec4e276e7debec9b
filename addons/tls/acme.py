"""Automatic certificates (Caddy's automatic HTTPS) with certbot's `acme` library: HTTP-01
on the plain listener, issued at start in the background, renewed ahead of expiry.

No mitmproxy import: addons/tls/addon.py answers the challenges from the chain and runs
`AcmeManager.run` as a background task. The library is synchronous (requests), so each round
runs in a worker thread; the event loop keeps serving (with the default certificate until the
ACME one is there).

Storage (`acme.storage`, made 0700), shared by every edge process on the machine:
  account.key              the account's RSA key (0600)
  account.json             the account URL
  certificates/NAME.pem    the certificate's private key then its chain (0600), one file so a
                           reader never sees a key of one issuance with a chain of another
  challenges/TOKEN         the key authorization of an open HTTP-01 challenge: any process on
                           the port answers the CA's validator, not only the one that ordered
  locks/NAME.lock          flock'd while NAME is checked and ordered: several processes do not
                           order the same certificate twice (the second one finds it stored)
Every file is written to a temporary name in its directory and renamed into place.
"""

from __future__ import annotations

import asyncio
import datetime
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from addons.config import AcmeConfig
from addons.tasks import Throttle, report
from addons.tls.certs import Certificates, Pair, parse_pair

logger = logging.getLogger("edge")
TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")          # RFC 8555 8.3: base64url
CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
ORDER_DEADLINE = 90.0        # seconds for the CA to validate and issue one order
LOCK_WAIT = 180.0            # seconds to wait for another process ordering the same name
RETRY_FIRST, RETRY_MAX = 30.0, 3600.0        # after a failed order: then doubling, up to an hour
CHECK_MAX = 12 * 3600.0      # look at the stored certificates at least twice a day
NETWORK_TIMEOUT = 15         # seconds per request to the CA
_KEY_RE = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.+?-----END [A-Z ]*PRIVATE KEY-----\s*", re.S)


def challenge_token(path: str) -> str | None:
    """The token of an ACME HTTP-01 request path, or None. The sites' https_redirect uses it
    to leave these requests on plain HTTP (RFC 8555 8.3: the CA asks over port 80)."""
    if not path.startswith(CHALLENGE_PREFIX):
        return None
    token = path[len(CHALLENGE_PREFIX):].split("?", 1)[0]
    return token if TOKEN.fullmatch(token) else None


def renewal_at(pair: Pair, renew_before: float) -> datetime.datetime:
    """When to renew: `renew_before` ahead of expiry, and never later than a third of the
    lifetime ahead (a 6-day certificate is renewed with 2 days left, as Caddy and Let's
    Encrypt advise for short-lived certificates)."""
    lifetime = pair.not_after - pair.leaf.not_valid_before_utc
    return pair.not_after - min(datetime.timedelta(seconds=renew_before), lifetime / 3)


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write a file so that readers see the old or the new content, never part of it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class NameLock:
    """An exclusive flock on `locks/NAME.lock`, waited for at most LOCK_WAIT seconds."""

    def __init__(self, path: str, wait: float = LOCK_WAIT) -> None:
        self.path, self.wait, self.fd = path, wait, -1

    def __enter__(self) -> NameLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise TimeoutError(f"{self.path}: held by another process for {self.wait:.0f}s") from None
                time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class AcmeStorage:
    """The files under `acme.storage` (see the module docstring)."""

    def __init__(self, root: str) -> None:
        self.root = root
        for sub in ("", "certificates", "challenges", "locks"):
            os.makedirs(os.path.join(root, sub), mode=0o700, exist_ok=True)
        os.chmod(root, 0o700)

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def load(self, name: str) -> Pair | None:
        try:
            with open(self.path("certificates", f"{name}.pem"), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        key = _KEY_RE.search(data)
        if key is None:
            raise ValueError(f"{self.path('certificates', name + '.pem')}: no private key")
        return parse_pair(data[:key.start()] + data[key.end():], key[0])

    def save(self, name: str, key_pem: bytes, chain_pem: bytes) -> Pair:
        pair = parse_pair(chain_pem, key_pem)            # never store what would not load
        write_atomic(self.path("certificates", f"{name}.pem"), key_pem + chain_pem.lstrip())
        return pair

    def challenge(self, token: str) -> str | None:
        try:
            with open(self.path("challenges", token), encoding="ascii") as f:
                return f.read()
        except (OSError, UnicodeDecodeError):
            return None

    def lock(self, name: str) -> NameLock:
        return NameLock(self.path("locks", f"{name}.lock"))


class AcmeManager:
    """Holds a certificate for each name in `names()` (those no configured file covers):
    loads it from storage, orders it when missing or due, and puts it in `certificates`."""

    def __init__(self, config: AcmeConfig, certificates: Certificates, names: Callable[[], tuple[str, ...]]) -> None:
        self.config, self.certificates, self.names = config, certificates, names
        self.storage = AcmeStorage(config.storage)
        self.challenges: dict[str, str] = {}         # token -> key authorization, ours in flight
        self.client = None                           # acme.client.ClientV2, made on first order
        self.account_key = None
        self.failed: dict[str, tuple[float, float]] = {}   # name -> (retry at, next delay)
        self.throttles: dict[str, Throttle] = {}
        self.orders = 0                              # certificates ordered by this process

    # -- the HTTP-01 responder ------------------------------------------------------------------

    def answer(self, token: str) -> str | None:
        """The key authorization for a challenge token, ours or another process's."""
        return self.challenges.get(token) or self.storage.challenge(token)

    # -- the background rounds ------------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled: a round in a worker thread, then sleep until the next is due."""
        while True:
            try:
                wait = await asyncio.to_thread(self.round)
            except asyncio.CancelledError:
                raise
            except Exception as e:          # a round never raises on purpose: keep the task alive
                report(self.throttles.setdefault("", Throttle()), "ACME round", e)
                wait = RETRY_FIRST
            await asyncio.sleep(wait)

    def wanted(self) -> list[str]:
        return [n for n in dict.fromkeys(self.names()) if not self.certificates.covered(n)]

    def round(self) -> float:
        """Load or order every wanted certificate that is due; seconds until the next round."""
        wait = CHECK_MAX
        for name in self.wanted():
            now = time.time()
            retry_at, _ = self.failed.get(name, (0.0, 0.0))
            if now < retry_at:
                wait = min(wait, retry_at - now)
                continue
            try:
                pair = self.hold(name)
            except Exception as e:
                delay = self.failed.get(name, (0.0, RETRY_FIRST / 2))[1] * 2
                delay = min(max(delay, RETRY_FIRST), RETRY_MAX)
                self.failed[name] = (now + delay, delay)
                report(self.throttles.setdefault(name, Throttle()), f"ACME certificate for {name}", e)
                wait = min(wait, delay)
                continue
            self.failed.pop(name, None)
            due = renewal_at(pair, self.config.renew_before).timestamp() - time.time()
            wait = min(wait, max(due, 1.0))
        return wait

    def hold(self, name: str) -> Pair:
        """The valid certificate for `name`: the stored one unless it is due, else a new one
        (under the name's lock, re-reading storage first: another process may have renewed)."""
        pair = self._stored(name)
        if pair is None or self._due(pair):
            with self.storage.lock(name):
                pair = self._stored(name)
                if pair is None or self._due(pair):
                    pair = self.order(name)
        if self.certificates.acme.get(name) is not pair:
            self.certificates.set_acme(name, pair)
        return pair

    def _stored(self, name: str) -> Pair | None:
        current = self.certificates.acme.get(name)
        try:
            pair = self.storage.load(name)
        except ValueError as e:
            logger.error("edge: ACME certificate for %s in storage cannot be read, ordering a new one: %s", name, e)
            return None
        if pair is not None and current is not None and pair.leaf == current.leaf:
            return current
        return pair

    def _due(self, pair: Pair) -> bool:
        at = renewal_at(pair, self.config.renew_before)
        ari = self._ari(pair)
        if ari is not None:
            at = min(at, ari)
        return datetime.datetime.now(datetime.timezone.utc) >= at

    def _ari(self, pair: Pair) -> datetime.datetime | None:
        """The CA's suggested renewal time (ACME Renewal Information, RFC 9773) where it offers one."""
        if self.client is None:
            return None
        try:
            self.client.directory["renewalInfo"]
        except KeyError:
            return None
        try:
            at, _ = self.client.renewal_time(pair.leaf.public_bytes(serialization.Encoding.PEM))
        except Exception as e:        # the CA's ARI failing must not stop renewal by date
            logger.warning("edge: ACME renewal information unavailable: %s", e)
            return None
        return at.astimezone(datetime.timezone.utc) if at is not None else None

    # -- ordering ---------------------------------------------------------------------------------

    def _connect(self):
        from acme import client, errors, messages
        import josepy
        if self.client is not None:
            return self.client
        key_path = self.storage.path("account.key")
        try:
            with open(key_path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
        except FileNotFoundError:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            with self.storage.lock("account"):
                if os.path.exists(key_path):        # another process made it meanwhile
                    with open(key_path, "rb") as f:
                        key = serialization.load_pem_private_key(f.read(), password=None)
                else:
                    write_atomic(key_path, key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
        self.account_key = josepy.JWKRSA(key=key)
        net = client.ClientNetwork(self.account_key, user_agent="edge", verify_ssl=self._verify(),
                                   timeout=NETWORK_TIMEOUT)
        directory = client.ClientV2.get_directory(self.config.directory, net)
        acme = client.ClientV2(directory, net)
        registration = messages.NewRegistration.from_data(email=self.config.email, terms_of_service_agreed=True)
        try:
            account = acme.new_account(registration)
        except errors.ConflictError as e:      # the key's account exists: use it
            account = messages.RegistrationResource(body=messages.Registration(), uri=e.location)
            net.account = account
        write_atomic(self.storage.path("account.json"), json.dumps({"url": account.uri}).encode() + b"\n")
        self.client = acme
        return acme

    def _verify(self) -> bool | str:
        """requests' `verify`: the system's CAs, plus `ca_bundle` when given (one file)."""
        if self.config.ca_bundle is None:
            return True
        import certifi
        with open(certifi.where(), "rb") as f, open(self.config.ca_bundle, "rb") as extra:
            bundle = f.read() + b"\n" + extra.read()
        path = self.storage.path("ca-bundle.pem")
        write_atomic(path, bundle, 0o644)
        return path

    def order(self, name: str) -> Pair:
        """Order, validate (HTTP-01) and store a new certificate for `name`."""
        from acme import challenges, crypto_util, messages
        acme = self._connect()
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        started = time.monotonic()
        order = acme.new_order(crypto_util.make_csr(key_pem, [name]))
        tokens = []
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:        # reused by the CA
                    continue
                chall = next((c for c in authz.body.challenges if isinstance(c.chall, challenges.HTTP01)), None)
                if chall is None:
                    raise RuntimeError(f"the CA offers no HTTP-01 challenge for {name}")
                response, validation = chall.response_and_validation(self.account_key)
                token = chall.chall.encode("token")
                self.challenges[token] = validation
                write_atomic(self.storage.path("challenges", token), validation.encode(), 0o644)
                tokens.append(token)
                acme.answer_challenge(chall, response)
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_DEADLINE)
            done = acme.poll_and_finalize(order, deadline)
        finally:
            for token in tokens:
                self.challenges.pop(token, None)
                try:
                    os.unlink(self.storage.path("challenges", token))
                except OSError:
                    pass
        pair = self.storage.save(name, key_pem, done.fullchain_pem.encode())
        self.orders += 1
        logger.info("edge: ACME certificate for %s issued in %.1fs (valid until %s)", name,
                    time.monotonic() - started, pair.not_after)
        return pair
