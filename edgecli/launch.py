"""Building and running the mitmproxy master that carries the edge chain.

`edge run` uses a lean master: only the mitmproxy addons a reverse proxy needs receive events
(mitmproxy dispatches every event to every loaded addon; the lean set nearly doubles
throughput, see bench/). `--web` uses mitmweb's full master so flows can be inspected.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mitmproxy import certs, exceptions, master, options
from mitmproxy.addons import core, disable_h2c, next_layer, proxyserver, termlog, tlsconfig

from addons.chain import Edge
from addons.config import ConfigError, EdgeConfig
from addons.console import ListenerStatus
from addons.lifecycle.addon import install_signals
from addons.tasks import Throttle
from addons.tls.addon import Tls, listener_modes
from addons.tls.certs import Pair
from addons.workers import runtime
from edgecli.dispatch import IndexedAddonManager

logger = logging.getLogger("edge")


class LaunchError(Exception):
    """A problem starting the edge, said in one line for the user."""


class NoCertificate(Exception):
    """No certificate of the operator's is configured for the name a TLS client asked for."""


class EdgeTlsConfig(tlsconfig.TlsConfig):
    """mitmproxy's TLS addon for an edge. Without its `request` hook, which answers a magic
    path with the CRL of mitmproxy's interception CA (an interception feature an edge must not
    expose, and a check on every request). And presenting only the operator's certificates
    (`--cert`, the `certs` option): mitmproxy would mint one from its own CA for any name, so a
    client asking for a name no certificate covers (any name, without `--cert`) gets no TLS;
    the connection is closed. With the config's `certificates:`/`acme:` the edge's Tls addon
    chooses (by SNI, see addons/tls/certs.py) and the `certs` option is not used."""
    name = "tlsconfig"
    request = None

    def __init__(self) -> None:
        super().__init__()
        self.refused = Throttle()
        self.tls: Tls | None = None         # the edge's certificates (certificates:, acme:), set by serve
        self.entries: dict[Pair, certs.CertStoreEntry] = {}     # mitmproxy's form of each pair

    def get_cert(self, conn_context) -> certs.CertStoreEntry:
        if self.tls is not None and self.tls.configured:
            return self._configured(conn_context.client)
        name = conn_context.client.sni or conn_context.client.sockname[0]
        for key in (*certs.CertStore.asterisk_forms(name), "*"):     # minted entries have tuple keys
            entry = self.certstore.certs.get(key)
            if entry is not None:
                return entry
        raise NoCertificate(name)

    def _configured(self, client) -> certs.CertStoreEntry:
        """The certificate chosen by SNI among `certificates:` and ACME's; none on a plain
        listener of a `listen:` list (TLS is for the `tls: true` ones)."""
        if client.proxy_mode.full_spec in self.tls.plain_modes:
            raise NoCertificate(f"{client.sni or 'no SNI'} on a plain listener")
        pair = self.tls.pick(client.sni)
        if pair is None:            # ACME only, none issued yet
            raise NoCertificate(f"{client.sni or 'no SNI'} (no certificate issued yet)")
        entry = self.entries.get(pair)
        if entry is None:
            if len(self.entries) > 256:        # replaced pairs (reloads, renewals) are not kept
                self.entries.clear()
            chain = [certs.Cert(c) for c in pair.chain]
            entry = self.entries[pair] = certs.CertStoreEntry(chain[0], pair.key, None, chain)
        return entry

    def tls_start_client(self, tls_start) -> None:
        try:
            super().tls_start_client(tls_start)
        except NoCertificate as e:       # no ssl_conn: mitmproxy closes the connection
            if count := self.refused.occurred(time.monotonic()):
                logger.warning("edge: TLS refused (%d since the last report; last %s asking for %s): "
                               "no certificate is configured for that name (--cert, certificates:)",
                               count, tls_start.conn.peername[0], e)


class QuietTlsRefusals(logging.Filter):
    """mitmproxy logs an error for every TLS client it was given no context for; EdgeTlsConfig
    reports those refusals itself, throttled (scanners trying TLS on a plain port would
    otherwise fill the log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "No TLS context was provided, failing connection."


QUIET_TLS_REFUSALS = QuietTlsRefusals()


def without_mitmproxy_apps(m: master.Master) -> None:
    """mitmweb's full master, minus what would answer clients as mitmproxy or change what they
    get: the onboarding app (`Host: mitm.it` would get mitmproxy's page and its CA
    certificate), the Alt-Svc rewriter (not in the lean master: flows would differ from
    production), and the stock TLS addon (the CRL path, minted certificates), replaced by the
    edge's."""
    for name in ("onboarding", "updatealtsvc", "tlsconfig"):
        m.addons.remove(m.addons.get(name))
    m.addons.add(EdgeTlsConfig())


# mitmweb's default flow list columns, and the comment: the edge's verdict (addons/console)
CONSOLE_COLUMNS = ["tls", "icon", "path", "method", "status", "size", "time", "comment"]


def as_console(m: master.Master) -> None:
    """mitmweb as the edge's console: its status bar names the edge's listeners, its flow list
    shows the verdicts (`--set web_columns=...` still chooses)."""
    m.addons.add(ListenerStatus())
    m.options.update(web_columns=CONSOLE_COLUMNS)


class LeanMaster(master.Master):
    """A master with only the mitmproxy addons that reverse proxying over HTTP/1, HTTP/2 and
    TLS needs; edge's own chain is added after them."""

    def __init__(self, opts: options.Options) -> None:
        super().__init__(opts, with_termlog=False)
        self.addons = IndexedAddonManager(self)
        self._termlog_addon = termlog.TermLog()
        self.addons.add(self._termlog_addon, core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(),
                        EdgeTlsConfig(), disable_h2c.DisableH2C())


@dataclass
class Launch:
    """Everything `edge run` decides before the event loop starts."""
    config: EdgeConfig
    confdir: str
    web: bool = False
    web_port: int = 8081
    cert: str | None = None
    settings: Sequence[str] = ()
    extra_addons: Sequence[object] = ()      # the embedder's own (see Edge)
    on_ready: Callable[[master.Master, tuple[str, int]], None] | None = None
    handle_signals: bool = True
    reread: Callable[[], EdgeConfig] | None = None     # what a reload reads (edge run -c: the file again)
    failure: list[str] = field(default_factory=list)


class _Ready:
    """Reports the bound address once mitmproxy's servers are up, or stops on a bind failure."""

    def __init__(self, launch: Launch, m: master.Master) -> None:
        self.launch, self.master = launch, m

    def running(self) -> None:
        m = self.master
        addrs = m.addons.get("proxyserver").listen_addrs()
        if len(addrs) < len(self.launch.config.all_listeners):      # one did not bind
            wanted = ", ".join(f"{h}:{p}" for h, p in (lst.address for lst in self.launch.config.all_listeners))
            self.launch.failure.append(f"cannot listen on {wanted}")
            m.shutdown()
            return
        m.addons.get("edge").lifecycle.ready()      # a worker tells its supervisor
        if self.launch.on_ready:
            self.launch.on_ready(m, addrs[0][:2])


def share_listeners() -> None:
    """A worker (EDGE_WORKERS > 1) binds every listening socket with SO_REUSEPORT: the workers
    of one edge listen on the same ports and the kernel spreads the connections over them.
    mitmproxy has no option for it (its issue 3409) and binds with asyncio.start_server, so
    that is wrapped, in this process only, before mitmproxy binds."""
    if getattr(asyncio.start_server, "reuse_port", False):
        return
    plain = asyncio.start_server

    async def start_server(*args, **kwargs):
        kwargs.setdefault("reuse_port", True)
        return await plain(*args, **kwargs)
    start_server.reuse_port = True
    asyncio.start_server = start_server


def check_listen(host: str, port: int) -> None:
    """Bind once before starting so that 'port in use' is one clear line, not a log dump."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise LaunchError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise LaunchError(f"cannot listen on {host}:{port}: {e.strerror.lower()}") from None


def check_cert(path: str) -> None:
    """A PEM with the certificate chain (leaf first) and its private key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    try:
        data = open(path, "rb").read()
    except OSError as e:
        raise LaunchError(f"cannot read --cert {path}: {e.strerror}") from None
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise LaunchError(f"--cert {path}: no PEM certificate in the file") from None
    key = re.search(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.+?-----END [A-Z ]*PRIVATE KEY-----", data, re.S)
    if key is None:
        raise LaunchError(f"--cert {path}: no private key in the file (append it after the chain)")
    try:
        serialization.load_pem_private_key(key[0], password=None)
    except (ValueError, TypeError) as e:
        raise LaunchError(f"--cert {path}: the private key cannot be read ({e})") from None


async def serve(launch: Launch) -> None:
    """Run the edge until shutdown. Raises LaunchError for problems the user can fix."""
    logging.getLogger().setLevel(logging.WARNING)      # mitmproxy's per-connection info logs cost time
    logger.setLevel(logging.INFO)
    logging.getLogger("mitmproxy.proxy.server").addFilter(QUIET_TLS_REFUSALS)     # once: same instance
    cfg = launch.config
    opts = options.Options(mode=[spec for spec, _ in listener_modes(cfg)], confdir=launch.confdir)
    if launch.web:
        from mitmproxy.tools.web.master import WebMaster
        m: master.Master = WebMaster(opts, with_termlog=True)
        without_mitmproxy_apps(m)
        as_console(m)
    else:
        m = LeanMaster(opts)
    ready = _Ready(launch, m)
    try:
        edge = Edge(cfg, annotate=launch.web, extra=launch.extra_addons)
        edge.lifecycle.reader = launch.reread
        m.addons.add(edge, ready)
        m.addons.get("tlsconfig").tls = edge.tls
        updates = {"http3": False, "termlog_verbosity": "warn"}
        if launch.cert:
            updates["certs"] = [f"*={launch.cert}"]
        if launch.web:
            updates.update(web_host="127.0.0.1", web_port=launch.web_port, web_open_browser=False)
        opts.update(**updates)
        for setting in launch.settings:
            opts.set(setting)
    except exceptions.OptionsError as e:
        raise LaunchError(str(e)) from None
    except OSError as e:
        raise LaunchError(f"cannot open {e.filename}: {e.strerror}") from None
    if launch.handle_signals and threading.current_thread() is threading.main_thread():
        install_signals(asyncio.get_running_loop(), edge.lifecycle)
    if runtime.shares_listeners():
        share_listeners()
    await m.run()
    if launch.failure:
        raise LaunchError(launch.failure[0])


def run(launch: Launch) -> None:
    """Blocking: run the edge on a fresh event loop (uvloop where installed)."""
    on_fresh_loop(launch.confdir, lambda: serve(launch))


def on_fresh_loop(confdir: str, main: Callable) -> None:
    os.makedirs(confdir, exist_ok=True)
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    asyncio.run(main(), loop_factory=factory)


# --- forward proxy (`edge forward`) -------------------------------------------------------------

@dataclass
class ForwardLaunch:
    """Everything `edge forward` decides before the event loop starts."""
    config: object                          # addons.forward.config.ForwardConfig
    confdir: str
    settings: Sequence[str] = ()
    on_ready: Callable[[master.Master, tuple[str, int]], None] | None = None
    handle_signals: bool = True
    extra_addons: Sequence[object] = ()      # after the forward chain (tests: a stand-in for DNS)
    failure: list[str] = field(default_factory=list)


def forward_confdir(confdir: str, ca: str | None) -> str:
    """mitmproxy signs with `<confdir>/mitmproxy-ca.pem`: for the forward config's CA, a
    directory of its own holding a link to it (mitmproxy's own CA, generated there otherwise,
    is never used: without intercept.ca nothing is decrypted)."""
    import hashlib
    if ca is None:
        return os.path.join(confdir, "forward")
    folder = os.path.join(confdir, "forward-" + hashlib.sha256(os.path.abspath(ca).encode()).hexdigest()[:12])
    os.makedirs(folder, mode=0o700, exist_ok=True)
    link = os.path.join(folder, "mitmproxy-ca.pem")
    if not os.path.islink(link) or os.readlink(link) != os.path.abspath(ca):
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.abspath(ca), link)
    return folder


class ForwardMaster(master.Master):
    """A lean master in regular (forward-proxy) mode: the forward chain's admission and policy
    addons come before mitmproxy's NextLayer, so that they choose a tunnel's layer first."""

    def __init__(self, opts: options.Options, chain) -> None:
        from addons.forward.addon import ForwardTlsConfig
        super().__init__(opts, with_termlog=False)
        self.addons = IndexedAddonManager(self)
        self._termlog_addon = termlog.TermLog()
        self.addons.add(self._termlog_addon, core.Core(), proxyserver.Proxyserver(), *chain.first,
                        next_layer.NextLayer(), ForwardTlsConfig(), disable_h2c.DisableH2C(), *chain.then)


async def serve_forward(launch: ForwardLaunch) -> None:
    """Run the forward proxy until shutdown. Raises LaunchError for problems the user can fix."""
    from addons.forward.addon import NEVER_MATCHES
    from addons.forward.chain import ForwardChain
    logging.getLogger().setLevel(logging.WARNING)
    logger.setLevel(logging.INFO)
    cfg = launch.config
    host, port = cfg.listen
    at = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    opts = options.Options(mode=[f"regular@{at}"], confdir=forward_confdir(launch.confdir, cfg.intercept.ca))
    try:
        chain = ForwardChain(cfg)
    except OSError as e:
        raise LaunchError(f"cannot open {e.filename}: {e.strerror}") from None
    except (ValueError, ConfigError) as e:      # the users' file or LDAP server, the disk cache
        raise LaunchError(str(e)) from None
    m = ForwardMaster(opts, chain)
    m.addons.add(*launch.extra_addons, _ForwardReady(launch, m, chain))
    try:
        opts.update(http3=False, termlog_verbosity="warn", connection_strategy="lazy",
                    ignore_hosts=[NEVER_MATCHES])
        for setting in launch.settings:
            opts.set(setting)
    except exceptions.OptionsError as e:
        raise LaunchError(str(e)) from None
    if launch.handle_signals and threading.current_thread() is threading.main_thread():
        import signal
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, m.shutdown)
        loop.add_signal_handler(signal.SIGHUP, chain.reload)
    await m.run()
    if launch.failure:
        raise LaunchError(launch.failure[0])


class _ForwardReady:
    """Tells the chain the port it got (port 0: never forwarding to itself needs the real one)."""

    def __init__(self, launch: ForwardLaunch, m: master.Master, chain) -> None:
        self.launch, self.master, self.chain = launch, m, chain

    def running(self) -> None:
        addrs = self.master.addons.get("proxyserver").listen_addrs()
        if not addrs:
            host, port = self.launch.config.listen
            self.launch.failure.append(f"cannot listen on {host}:{port}")
            self.master.shutdown()
            return
        self.chain.listening(addrs[0][:2])
        if self.launch.on_ready:
            self.launch.on_ready(self.master, addrs[0][:2])


def run_forward(launch: ForwardLaunch) -> None:
    """Blocking: run the forward proxy on a fresh event loop (uvloop where installed)."""
    on_fresh_loop(launch.confdir, lambda: serve_forward(launch))
