"""The TLS addon: the certificates the edge presents (chosen by SNI in launch.py's
EdgeTlsConfig through `pick`), the ACME manager's background task, and the requests that
belong to TLS rather than to a site, answered before any other addon (after protocol):

requestheaders   GET /.well-known/acme-challenge/TOKEN gets the key authorization of an open
                 order (the CA's validator, RFC 8555 8.3) before the shield, a redirect or a
                 route could refuse or move it; a plain-HTTP request on a TLS listener gets
                 400 and the connection is closed (nginx: "plain HTTP request was sent to
                 HTTPS port")
"""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import ctx, http

from addons.config import EdgeConfig, Listener
from addons.failsafe import edge_answer, fail_closed
from addons.tls.acme import AcmeManager, challenge_token
from addons.tls.certs import CertificateFile, Certificates, Pair
from addons.trace import decisions

logger = logging.getLogger("edge")


def listener_modes(config: EdgeConfig) -> list[tuple[str, Listener]]:
    """mitmproxy's `--mode` spec for each listener (reverse mode to the default origin; the
    route addon picks each request's origin), in the order of the config."""
    out = []
    for listener in config.all_listeners:
        host, port = listener.address
        at = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        out.append((f"reverse:{config.default_origin.url}@{at}", listener))
    return out


class Tls:
    def __init__(self) -> None:
        self.certificates = Certificates()
        self.acme: AcmeManager | None = None
        self.task: asyncio.Task | None = None
        self.tls_modes: frozenset[str] = frozenset()      # mode specs of `tls: true` listeners
        self.plain_modes: frozenset[str] = frozenset()    # of declared plain ones (a `listen:` list)
        self.configured = False                           # certificates: or acme: given

    def apply(self, config: EdgeConfig) -> None:
        files = [CertificateFile(c.cert, c.key) for c in config.certificates]
        for f in files:
            if f.pair.expired():
                logger.warning("edge: certificate %s expired on %s; it is presented until replaced",
                               f.cert_path, f.pair.not_after)
        issued = self.certificates.acme
        self.certificates = Certificates(files)         # the files are read anew
        same_acme = config.acme is not None and self.acme is not None and self.acme.config == config.acme
        if same_acme:       # a reload with the same ACME settings: the manager goes on, with what it issued
            self.certificates.acme = issued
            self.acme.certificates, self.acme.names = self.certificates, config.acme_names
        else:
            self.acme = AcmeManager(config.acme, self.certificates, config.acme_names) if config.acme else None
        modes = listener_modes(config) if config.listeners else []
        self.tls_modes = frozenset(spec for spec, lst in modes if lst.tls)
        self.plain_modes = frozenset(spec for spec, lst in modes if not lst.tls)
        self.configured = bool(files) or self.acme is not None
        if self.task is not None and not same_acme:     # new ACME settings: a new manager
            self.done()
            self.running()

    def pick(self, sni: str | None) -> Pair | None:
        """The pair to present for this SNI name (default when unknown); None: refuse."""
        return self.certificates.pick(sni)

    def running(self) -> None:
        if self.configured and not hasattr(ctx.master.addons.get("tlsconfig"), "tls"):
            logger.warning("edge: certificates: and acme: are presented only by `edge run` "
                           "(mitmproxy's own TLS addon is loaded here)")
        if self.acme is not None and self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.acme.run())

    def done(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        conn = flow.client_conn
        if not conn.tls_established and conn.proxy_mode.full_spec in self.tls_modes:
            decisions(flow)["tls"] = "refused: plain HTTP on a TLS listener"
            flow.response = edge_answer(flow, 400, "plain HTTP request on a TLS port: use https",
                                        {"Connection": "close"})
            return
        if self.acme is None or flow.request.method not in ("GET", "HEAD"):
            return
        token = challenge_token(flow.request.path)
        if token is None:
            return
        answer = self.acme.answer(token)
        decisions(flow)["tls"] = "acme challenge" if answer else "acme challenge: unknown token"
        if answer is None:
            flow.response = edge_answer(flow, 404, "no such ACME challenge")
            return
        flow.response = http.Response.make(200, answer.encode(), {"Content-Type": "application/octet-stream",
                                                                  "Cache-Control": "no-store"})
