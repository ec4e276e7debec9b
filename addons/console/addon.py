"""mitmweb as the edge's console (`edge run --web`): each finished flow shows the URL the
client asked, the edge's verdict as a marker and a comment with the decisions one per line,
and the status bar names the addresses the edge listens on."""

from __future__ import annotations

from mitmproxy import ctx, http
from mitmproxy.hooks import UpdateHook

from addons.client import public_base
from addons.config import EdgeConfig
from addons.console.verdict import comment, listen_address, public_parts, verdict
from addons.failsafe import made_by_edge
from addons.tasks import Throttle, report
from addons.trace import FACTS, cache_verdict, decisions

SENT = "edge.console.sent"      # flow metadata: the request's (path, Host) before the flow shows the public URL


class Console:
    """Runs after the trace (the access log has its line) and only under mitmweb. The flow's
    request is rewritten to the public URL (scheme, host, port, path: what mitmweb's flow list
    renders) only once the exchange is over, in `response` and `error`: nothing is sent from
    it any more. The origin's URL and the path it was sent stay in the comment."""

    def __init__(self) -> None:
        self.trusted: tuple = ()
        self.failures = Throttle()

    def apply(self, config: EdgeConfig) -> None:
        self.trusted = config.trusted_proxies

    def response(self, flow: http.HTTPFlow) -> None:
        self._show(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        # as the trace: a response an addon set in `error` gets its `response` hook next
        if flow.response is None or flow.response.stream:
            self._show(flow)

    def _show(self, flow: http.HTTPFlow) -> None:
        try:
            self.annotate(flow)
        except Exception as e:      # a display: it never fails the client's exchange
            report(self.failures, f"console (flow {flow.id})", e)

    def annotate(self, flow: http.HTTPFlow) -> None:
        rec = decisions(flow)
        req = flow.request
        public = rec.get("public_url")
        if public is None:          # answered before the request scrub: the request is still the client's
            public_base(flow, self.trusted)
            public = rec["public_url"]
        path_sent, host_field = flow.metadata.setdefault(SENT, (req.path, req.host_header))   # once: this may run twice
        resp = flow.response
        v = verdict(rec, resp.status_code if resp is not None else None, made_by_edge(resp),
                    flow.error.msg if flow.error else None, cache_verdict(rec))
        shown = {k: val for k, val in rec.items() if k not in FACTS}
        origin_url = f"{rec['origin']}{path_sent}" if rec.get("origin") else None
        parts = public_parts(public)
        if parts is not None:
            scheme, host, port, path, authority = parts
            data = req.data         # the destination only: the setters would rewrite the Host field
            data.scheme, data.host, data.port = scheme.encode(), host, port
            req.path = path
            if host_field is not None and host_field != authority:
                req.host_header = authority
            else:
                host_field = None
        flow.comment = comment(v, shown, origin_url, host_field)
        if v.mark:
            flow.marked = v.mark
        ctx.master.addons.trigger(UpdateHook([flow]))      # mitmweb's view sent the flow before this hook


class ListenerStatus:
    """mitmweb's status bar names the listen_host/listen_port options ("*:8080" unset); the
    edge gives each listener's address in its mode spec, so they are set to the first bound
    listener once the servers are up, and again whenever they change (a reload). The edge's
    modes all name their address, so these defaults bind nothing."""

    def running(self) -> None:
        proxyserver = ctx.master.addons.get("proxyserver")
        proxyserver.servers.changed.connect(self.show)
        self.show()

    def show(self) -> None:
        where = listen_address(ctx.master.addons.get("proxyserver").listen_addrs())
        if where is not None and (ctx.options.listen_host, ctx.options.listen_port) != where:
            ctx.options.update(listen_host=where[0], listen_port=where[1])
