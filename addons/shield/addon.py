"""The shield addon: cheap refusals first, before the cache or any origin work.

client_connected   deny/allow lists and deny_countries (peer IP), per-IP connection limit:
                   a refused connection is closed before TLS or HTTP
requestheaders     lists again for clients behind trusted proxies, head size (431), rate
                   limit (429), bots (the class's action: 403, a cookie challenge, 429 over the
                   class's budget; a search engine's first request from an address waits for
                   its reverse DNS check), then the WAF's phase 1 (connection, request line,
                   headers)
request            the WAF's phase 2 (body, anomaly score): for every request that will reach
                   an origin; a cache hit, answered from memory, reaches none and is not scored
request_prefix     (internals) the WAF's phase 2 on the first `waf.body_limit` bytes of a longer
                   body, before the rest streams to the origin
(timers)           slow clients: heads and bodies that do not complete in time are cut off

The resource limits (head and body size, slow-client deadlines, HTTP/2 floods: `config.limits`)
apply with or without a `shield:` section and always refuse: they protect the edge itself.
Every verdict is recorded in the trace (`shield`); `mode: detect` records the other parts'
verdicts without refusing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from mitmproxy import ctx, http
from mitmproxy.connection import Client

from addons import internals
from addons.client import client_of
from addons.config import DEFAULT_CRS, BotConfig, EdgeConfig, Limits, RateLimit, RouteShield, ShieldConfig, WafConfig
from addons.failsafe import edge_answer, fail_closed
from addons.geo.locate import Locator
from addons.net import in_networks, parse_ip
from addons.shield.botdata import crs_scanner_names
from addons.shield.bots import Behaviour, Challenge, Classifier
from addons.shield.verify import FAILED, VERIFIED, Verifier, operator_domains
from addons.shield.crs import tree_identity
from addons.shield.limits import ConnectionCounts, MemoryStore, RedisStore, Verdict, rate_key, retry_after_header
from addons.shield.limits import WorkerLimits, worker_limits
from addons.shield.slow import Deadlines
from addons.shield.waf import Finding, Waf, compile_filters
from addons.tasks import Throttle, every, report
from addons.trace import decisions
from addons.workers import runtime

logger = logging.getLogger("edge")
SWEEP = 0.25        # seconds between looks at the slow-client deadlines
PROFILE = "edge.shield.profile"     # flow metadata: the route's shield profile the request was judged by
UNVERIFIED = "unverified"           # a search engine whose reverse DNS check has no answer yet
UNVERIFIED_RETRY = 60               # seconds: Retry-After of the 503 it gets meanwhile


def _limiter(old: MemoryStore | RedisStore | None, rl: RateLimit | None,
             prefix: str = "edge:rl:") -> MemoryStore | RedisStore | None:
    """The store for `rl`, keeping what the old one counted: in memory its buckets (at the new
    rate), in Redis the same server's keys (a replaced client is closed)."""
    if rl is None:
        store = None
    elif rl.store == "memory":
        store = old.retuned(rl.rate, rl.burst) if isinstance(old, MemoryStore) else MemoryStore(rl.rate, rl.burst)
    elif isinstance(old, RedisStore) and (old.url, old.rate, old.burst, old.prefix) == (rl.store, rl.rate, rl.burst,
                                                                                        prefix):
        store = old
    else:
        store = RedisStore(rl.store, rl.rate, rl.burst, prefix)
    if isinstance(old, RedisStore) and store is not old:
        try:
            asyncio.get_running_loop().create_task(old.close())
        except RuntimeError:            # no loop: nothing was ever sent on it
            pass
    return store


def _bot_bucket(old: MemoryStore | None, bots: BotConfig, kind: str) -> MemoryStore:
    """The per-address buckets of a rate_limit class: its budget a second, ten seconds' worth
    of burst (at least 1)."""
    rate = bots.budget(kind)
    burst = max(1, round(rate * 10))
    return old.retuned(rate, burst) if old is not None else MemoryStore(rate, burst)


def _verified(outcome: str) -> tuple[str, str]:
    """(class, trace label) of a search engine's reverse DNS outcome."""
    if outcome == VERIFIED:
        return "search_engine", "search_engine: verified by reverse DNS"
    if outcome == FAILED:
        return "bad", "bad: claims a search engine; reverse DNS says otherwise"
    return UNVERIFIED, "search_engine: not verified (no DNS answer in time)"


def _waf_key(waf: WafConfig) -> tuple:
    """What a built WAF depends on: its settings, the exclusions file's last change and the
    rules tree (`edge waf update` swaps it: a reload then loads the new rules)."""
    try:
        changed = os.stat(waf.exclusions).st_mtime_ns if waf.exclusions else None
    except OSError:
        changed = None
    return waf, changed, tree_identity(waf.crs)


def head_bytes(request: http.Request) -> int:
    """The size of a request head as sent (request line and fields)."""
    return (len(request.data.method) + len(request.data.path) + len(request.data.http_version) + 4
            + sum(len(k) + len(v) + 4 for k, v in request.data.headers.fields) + 2)


class Shield:
    def __init__(self, locator: Callable[[], Locator | None], log: Callable[[dict], None],
                 route_profile: Callable[[http.HTTPFlow], RouteShield] = lambda flow: RouteShield()) -> None:
        self.locator = locator             # the route addon's geo database, for deny_countries
        self.log = log                     # the access log, for connections refused before any request
        self.route_profile = route_profile  # the sites addon's: which parts run for the request's route
        self.config: ShieldConfig | None = None
        self.limits = Limits()
        self.trusted: tuple = ()
        self.counts: ConnectionCounts | None = None
        self.limiter: MemoryStore | RedisStore | None = None
        self.deadlines: Deadlines | None = None
        self.sweeper: asyncio.Task | None = None
        self.clients: dict[str, Client] = {}        # connections with a deadline, by id
        self.allowed: set[str] = set()              # connections from allow-listed peers
        self.noted: dict[str, str] = {}             # detect mode: connection id -> what would have refused it
        self.refused: Counter[str] = Counter()      # why -> count (connection-level; requests are in the log)
        self.waf: Waf | None = None
        self.waf_key: tuple | None = None           # what the WAF was built from (kept while unchanged)
        self.waf_skip: list = []
        self.inspecting: dict[str, object] = {}     # flow id -> WAF transaction between the phases
        self.behaviour: Behaviour | None = None
        self.challenge: Challenge | None = None
        self.closed: dict[str, str] = {}            # connections the shield closed -> why
        self.classifier: Classifier | None = None
        self.classifier_crs: str | None = None      # the CRS tree its scanner names came from
        self.verifier: Verifier | None = None
        self.bot_limits: dict[str, MemoryStore] = {}    # rate_limit class -> its per-address buckets
        self.shared_secret: Callable[[], bytes] | None = None    # the workers' key (addons/workers), set by the chain
        # the cluster's challenge key (addons/cluster), None until Redis gave one: used when no
        # bots.secret_file is set, so a cookie earned on one node passes on every node
        self.shared_key: Callable[[], bytes | None] = lambda: None
        self.worker_note: str | None = None     # what worker 0 said of the rate limit under workers

    def apply(self, config: EdgeConfig) -> None:
        shield = self.config = config.shield
        limits = self.limits = config.limits
        self.trusted = config.trusted_proxies
        internals.max_head = limits.max_header_bytes
        internals.max_request_body = limits.max_body
        internals.h2_limits = limits.http2
        internals.on_flood = self._flooded
        self._keep_state(shield, limits, self._under_workers(config))
        if shield and shield.bots and (shield.bots.challenge or "challenge" in dict(shield.bots.actions).values()):
            if shield.bots.secret_file:                         # shared by every edge that reads it
                with open(shield.bots.secret_file, "rb") as f:
                    self.challenge = Challenge(f.read().strip())
            elif self.shared_secret is not None:               # shared by the workers of this machine
                self.challenge = Challenge(self.shared_secret())
            else:
                self.challenge = self.challenge or Challenge()  # per process; kept across reloads
        else:
            self.challenge = None
        self.waf_skip = compile_filters(shield.waf.skip) if shield and shield.waf else []

    def _under_workers(self, config: EdgeConfig) -> WorkerLimits | None:
        """How shield.rate_limit holds with several workers (limits.worker_limits); worker 0
        says it once."""
        rt = runtime.current()
        rl = config.shield.rate_limit if config.shield else None
        if rt is None or rl is None:
            return None
        cluster = config.cluster
        plan = worker_limits(rl.store, rt.count, cluster.node if cluster else None, cluster.redis if cluster else None)
        if plan is not None and rt.index == 0 and plan.note != self.worker_note:
            logger.warning("edge: %s", plan.note)
        self.worker_note = plan.note if plan is not None else None
        return plan

    def _keep_state(self, shield: ShieldConfig | None, limits: Limits, workers: WorkerLimits | None = None) -> None:
        """What the shield has learnt outlives a reload: connections counted per IP, token
        buckets (carried over to a new rate), deadlines of open connections, what each client
        did; the WAF's rules are compiled again only when its settings (or its exclusions
        file) changed."""
        limit = shield.connections_per_ip if shield else None
        if not limit:
            self.counts = None
        else:
            self.counts = self.counts or ConnectionCounts(limit)
            self.counts.limit = limit
        rl = shield.rate_limit if shield else None
        if workers is not None:         # several workers: the node's one limit, in the cluster's Redis
            self.limiter = _limiter(self.limiter, replace(rl, store=workers.store), workers.prefix)
        else:
            self.limiter = _limiter(self.limiter, rl)
        t = limits.timeouts
        if self.deadlines is None:
            self.deadlines = Deadlines(t.request_headers, t.request_body, t.idle)
        else:
            self.deadlines.request_headers, self.deadlines.request_body, self.deadlines.idle = \
                t.request_headers, t.request_body, t.idle
        waf = shield.waf if shield else None
        if waf is None:
            self.waf, self.waf_key = None, None
        elif self.waf is None or self.waf_key != _waf_key(waf):
            self.waf, self.waf_key = Waf(waf), _waf_key(waf)
        self._keep_bots(shield)
        traps = shield.bots.trap_paths if shield and shield.bots else None
        if traps is None:
            self.behaviour = None
        elif self.behaviour is None:
            self.behaviour = Behaviour(traps)
        else:
            self.behaviour.set_traps(traps)

    def _keep_bots(self, shield: ShieldConfig | None) -> None:
        """The classifier (built again only for another CRS tree), the reverse DNS cache (kept
        while the resolver is the same) and the rate_limit classes' buckets (retuned)."""
        bots = shield.bots if shield else None
        if bots is None:
            self.classifier, self.classifier_crs, self.bot_limits = None, None, {}
            self._set_verifier(None)
            return
        crs = shield.waf.crs if shield.waf else DEFAULT_CRS
        if self.classifier is None or self.classifier_crs != crs:
            self.classifier, self.classifier_crs = Classifier(crs_scanner_names(crs)), crs
        if not bots.verify:
            self._set_verifier(None)
        elif self.verifier is None or self.verifier.address != bots.resolver:
            self._set_verifier(Verifier(bots.resolver))
        self.bot_limits = {kind: _bot_bucket(self.bot_limits.get(kind), bots, kind)
                           for kind, action in bots.actions if action == "rate_limit"}

    def _set_verifier(self, verifier: Verifier | None) -> None:
        if self.verifier is not None and self.verifier is not verifier:
            self.verifier.close()
        self.verifier = verifier

    # -- connections ----------------------------------------------------------------------------

    def client_connected(self, client: Client) -> None:
        if client.error:
            return
        if self.deadlines is not None:
            self.clients[client.id] = client
            self.deadlines.connected(client.id, time.monotonic())
        if self.config is None:
            return
        try:
            self._admit(client)
        except Exception:               # fail closed: a connection we could not judge is not served
            logger.exception("edge shield: could not judge a connection from %s; refusing it", client.peername[0])
            client.error = "edge shield: internal error"

    def _admit(self, client: Client) -> None:
        ip = parse_ip(client.peername[0])
        if in_networks(ip, self.trusted):
            return                          # a proxy carries many clients: judged per request
        if in_networks(ip, self.config.allow):
            self.allowed.add(client.id)
            return
        why = self._listed(str(ip))
        if why is None and self.counts is not None and not self.counts.admit(client.id, str(ip)):
            why = f"more than {self.counts.limit} connections from this address"
        if why is not None:
            if self.config.mode == "detect":
                self.noted[client.id] = why
            else:
                self.refused["connection: " + why.split(":")[0]] += 1
                client.error = f"edge shield: {why}"        # closed before TLS or HTTP
                self.log({"client": str(ip), "status": None, "edge": {"shield": f"connection refused: {why}"}})

    def client_disconnected(self, client: Client) -> None:
        if self.counts is not None:
            self.counts.release(client.id)
        if self.deadlines is not None:
            self.deadlines.forget(client.id)
            self.clients.pop(client.id, None)
        self.allowed.discard(client.id)
        self.noted.pop(client.id, None)
        self.closed.pop(client.id, None)

    def _listed(self, ip: str) -> str | None:
        """Why an address is refused by the lists, or None."""
        if in_networks(parse_ip(ip), self.config.deny):
            return "address denied"
        if self.config.deny_countries and (locator := self.locator()) is not None:
            place = locator.locate(ip)
            if place is not None and place.country in self.config.deny_countries:
                return f"country denied: {place.country}"
        return None

    # -- requests ---------------------------------------------------------------------------------

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow):
        if flow.response:
            return None
        conn = flow.client_conn
        if self.deadlines is not None and not flow.is_replay:      # a background refresh is ours, not the client's
            self._head_received(flow)
        # an HTTP/1 head over the cap never gets here (internals refuse it before parsing)
        if conn.alpn == b"h2" and head_bytes(flow.request) > self.limits.max_header_bytes:
            self._refuse(flow, "size", "block", 431, "request header fields too large")
            return None
        if self.config is None:
            return None
        rec = decisions(flow)
        if conn.id in self.allowed:
            rec["shield"] = "allow-listed"
            return None
        ip = client_of(flow, self.trusted)
        noted = self.noted.get(conn.id)
        if noted is not None:
            rec["shield"] = f"detect: {noted}"
        if in_networks(parse_ip(conn.peername[0]), self.trusted) and ip != conn.peername[0]:
            if (why := self._listed(ip)) is not None and self._refuse(flow, "lists", self.config.mode, 403, why):
                return None
        if isinstance(self.limiter, RedisStore):
            return self._limited_by_redis(flow, ip)         # async only with a shared store
        if self.limiter is None or self._rate_verdict(flow, self.limiter.take(self._rate_key(flow, ip),
                                                                              time.monotonic())):
            return self._after_rate_limit(flow, ip)     # awaitable while a search engine is verified
        return None

    def _head_received(self, flow: http.HTTPFlow) -> None:
        """The head deadline is met; a body, if one comes, has its own. (An HTTP/2 stream's body
        deadline is always set: `request` clears it, at once for a stream that ended with its head.)"""
        conn, now = flow.client_conn, time.monotonic()
        if conn.alpn == b"h2":
            self.deadlines.stream_opened(conn.id, flow.id, now, True)
        else:
            body = any(k.lower() == b"transfer-encoding" or k.lower() == b"content-length" and v.strip() != b"0"
                       for k, v in flow.request.data.headers.fields)       # one pass, not two scans
            self.deadlines.head_received(conn.id, now, body)

    def _after_rate_limit(self, flow: http.HTTPFlow, ip: str):
        """Bots, then the WAF's phase 1, for a request the rate limit let through, as the
        route's shield profile says. Awaitable when a search engine's reverse DNS check is
        not in the cache yet: the request waits for it (at most bots.verify_timeout)."""
        profile = flow.metadata[PROFILE] = self.route_profile(flow)
        bots = self.config.bots
        if bots is None or profile.bots == "off":
            if bots is not None:
                decisions(flow)["bot"] = "not judged on this route"
            self._inspect_head(flow, ip, profile.waf)
            return None
        user_agent = flow.request.headers.get("user-agent", "")
        kind = self.classifier.classify(user_agent)
        why = self.behaviour.requested(ip, flow.request.path, time.monotonic())
        label = f"bad: {why}" if why else kind
        if why is not None:
            kind = "bad"
        elif kind == "search_engine" and self.verifier is not None and bots.action(kind) != "block" \
                and (domains := operator_domains(user_agent)) is not None:
            outcome = self.verifier.cached(ip, domains)
            if outcome is None:
                return self._verify_then_judge(flow, ip, profile, domains)
            kind, label = _verified(outcome)
        if self._bot_verdict(flow, ip, profile.bots, kind, label):
            self._inspect_head(flow, ip, profile.waf)
        return None

    def _challenge_key(self) -> None:
        if not self.config.bots.secret_file:
            key = self.shared_key()
            if key is not None and key != self.challenge.secret:
                self.challenge.secret = key

    async def _verify_then_judge(self, flow: http.HTTPFlow, ip: str, profile: RouteShield,
                                 domains: tuple[str, ...]) -> None:
        outcome = await self.verifier.verify(ip, domains, self.config.bots.verify_timeout)
        if self._bot_verdict(flow, ip, profile.bots, *_verified(outcome)):
            self._inspect_head(flow, ip, profile.waf)

    def _bot_verdict(self, flow: http.HTTPFlow, ip: str, part: str, kind: str, label: str) -> bool:
        """True if the request may go on, as the class's action says (with the challenge on,
        a busy browser must bring a valid cookie too). `part`: the route's say."""
        bots = self.config.bots
        mode = "detect" if part == "detect" else bots.mode
        rec = decisions(flow)
        rec["bot"] = label
        if kind == UNVERIFIED:
            # fail closed without a 403: a crawler reads 503 as "come back later" and keeps
            # the site's pages in its index, where a 4xx would tell it they are gone
            return not self._refuse(flow, "bots", mode, 503, "search engine not verified yet",
                                    {"Retry-After": str(UNVERIFIED_RETRY)})
        action = bots.action(kind)
        if action == "block":
            return not self._refuse(flow, "bots", mode, 403, "automated clients of this kind are not served")
        if action == "rate_limit":
            verdict = self.bot_limits[kind].take(ip, time.monotonic())
            return verdict.allowed or not self._refuse(flow, "bots", mode, 429, f"too many requests ({kind})",
                                                       {"Retry-After": retry_after_header(verdict.retry_after)})
        if action != "challenge" and not (kind == "browser" and bots.challenge_busy and self.behaviour.busy(ip)):
            return True
        self._challenge_key()
        cookies = flow.request.cookies
        if self.challenge.valid(cookies.get(Challenge.COOKIE), ip):
            del cookies[Challenge.COOKIE]               # ours: the origin never sees it
            flow.request.cookies = cookies
            rec["bot"] = f"{kind}: challenge passed"
            return True
        if mode == "detect":
            rec["shield"] = "detect: bots: challenge (403)"
            return True
        rec["shield"] = "bots: challenge (403)"
        self.refused["bots challenge (403)"] += 1
        flow.response = http.Response.make(403, self.challenge.page(flow.request.path), {
            "Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store",
            "Set-Cookie": f"{Challenge.COOKIE}={self.challenge.issue(ip)}; Path=/; "
                          f"Max-Age={int(self.challenge.ttl)}; HttpOnly; SameSite=Lax"})
        return False

    async def _limited_by_redis(self, flow: http.HTTPFlow, ip: str) -> None:
        verdict = await self.limiter.take(self._rate_key(flow, ip), time.monotonic())
        if self._rate_verdict(flow, verdict) and (judging := self._after_rate_limit(flow, ip)) is not None:
            await judging

    def _rate_verdict(self, flow: http.HTTPFlow, verdict: Verdict) -> bool:
        """True if the request may go on."""
        if verdict.allowed:
            return True
        rl = self.config.rate_limit
        return not self._refuse(flow, "rate", rl.mode, 429, "too many requests",
                                {"Retry-After": retry_after_header(verdict.retry_after)})

    def _inspect_head(self, flow: http.HTTPFlow, ip: str, part: str = "on") -> None:
        rec = decisions(flow)
        if self.waf is not None:
            if part == "off" or any(f(flow) for f in self.waf_skip):
                rec["waf"] = "skipped" if part != "off" else "skipped on this route"
                return
            conn, req = flow.client_conn, flow.request
            txn, finding = self._engine(flow, lambda: self.waf.begin(
                (ip, conn.peername[1]), conn.sockname[:2], req.data.method, req.data.path,
                req.http_version, req.data.headers.fields, req.data.authority), passed=(None, None))
            if finding is not None:
                self._waf_verdict(flow, finding)
            elif txn is not None:
                self.inspecting[flow.id] = txn

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if self.deadlines is not None and not flow.is_replay:
            if flow.client_conn.alpn == b"h2":
                self.deadlines.stream_body_received(flow.client_conn.id, flow.id)
            else:
                self.deadlines.body_received(flow.client_conn.id)
        self._inspect_body(flow, flow.request.raw_content or b"")

    @fail_closed
    def request_prefix(self, flow: http.HTTPFlow) -> None:
        """internals: a body longer than the WAF's limit is about to stream; what is held of it
        is judged first (ModSecurity's ProcessPartial), before the origin gets any of it."""
        self._inspect_body(flow, flow.metadata[internals.PREFIX])

    def _inspect_body(self, flow: http.HTTPFlow, body: bytes) -> None:
        """The WAF's phase 2, once per request: on the whole body, or on a prefix of it."""
        txn = self.inspecting.pop(flow.id, None)
        if txn is None or flow.response is not None:        # not inspected, refused, or a cache hit
            return
        finding = self._engine(flow, lambda: self.waf.finish(txn, body))
        if finding is not None:
            self._waf_verdict(flow, finding)

    def _engine(self, flow: http.HTTPFlow, step, passed=None):
        """Run a WAF step. An engine failure blocks (fail closed: @fail_closed answers 500 and
        logs it) unless on_error is pass; then it is logged, and `passed` lets the request on."""
        try:
            return step()
        except Exception:
            if self.config.waf.on_error != "pass":
                raise
            logger.exception("edge shield: WAF engine failed on flow %s; passing it (on_error: pass)", flow.id)
            decisions(flow)["waf"] = "engine error: passed"
            return passed

    def inspected_body(self, flow: http.HTTPFlow) -> int | None:
        """How many bytes of this request's body the WAF will read (they are held until it
        has: all of a body within the limit, else that much); None if it reads none."""
        return self.waf.body_limit if flow.id in self.inspecting else None

    def _waf_verdict(self, flow: http.HTTPFlow, finding: Finding) -> None:
        rec = decisions(flow)
        rec["waf"] = finding.summary()
        if finding.status is not None:
            # no detail for the attacker: the rule ids and score are in the trace
            profile = flow.metadata.get(PROFILE)
            mode = "detect" if profile is not None and profile.waf == "detect" else self.config.waf.mode
            self._refuse(flow, "waf", mode, finding.status, "request blocked")

    def _rate_key(self, flow: http.HTTPFlow, ip: str) -> str:
        return rate_key(self.config.rate_limit.key, ip, flow.request.path, flow.request.headers.get)

    def _refuse(self, flow: http.HTTPFlow, part: str, mode: str, status: int, why: str,
                headers: dict | None = None, close: bool = False) -> bool:
        """Answer with `status` (block) or only record it (detect). True if answered."""
        rec = decisions(flow)
        if mode == "detect":
            rec["shield"] = f"detect: {part}: {why} ({status})"
            return False
        rec["shield"] = f"{part}: {why} ({status})"
        self.refused[f"{part} ({status})"] += 1
        if close:
            headers = {**(headers or {}), "Connection": "close"}
        flow.response = edge_answer(flow, status, why, headers)
        return True

    def response(self, flow: http.HTTPFlow) -> None:
        self.inspecting.pop(flow.id, None)
        if self.behaviour is not None and "shield" not in decisions(flow):
            self.behaviour.answered(client_of(flow, self.trusted), flow.response.status_code, time.monotonic())
        self._stream_done(flow)

    def _stream_done(self, flow: http.HTTPFlow) -> None:
        """Keep-alive from here: the next head (HTTP/1) or stream (HTTP/2) has the idle deadline."""
        conn = flow.client_conn
        if self.deadlines is None or flow.is_replay or conn.id not in self.clients:
            return
        if conn.alpn == b"h2":
            self.deadlines.stream_closed(conn.id, flow.id, time.monotonic())
        elif flow.websocket is not None:
            self.deadlines.forget(conn.id)          # a WebSocket: mitmproxy's tcp_timeout, not ours
        elif flow.response is not None:
            self.deadlines.answered(conn.id, time.monotonic())

    def error(self, flow: http.HTTPFlow) -> None:
        self.inspecting.pop(flow.id, None)
        if flow.client_conn.alpn == b"h2":
            self._stream_done(flow)
        if flow.error is None:
            return
        if flow.error.msg == internals.BODY_TOO_LARGE:
            decisions(flow)["shield"] = "size: request body too large (413)"
            self.refused["size (413)"] += 1
        elif (why := self.closed.get(flow.client_conn.id)) is not None:
            decisions(flow)["shield"] = f"connection closed: {why}"

    def _flooded(self, client: Client, why: str) -> None:
        """internals: an HTTP/2 client connection was ended with GOAWAY ENHANCE_YOUR_CALM."""
        self.refused["connection: http2 flood"] += 1
        self.closed[client.id] = f"http2 flood: {why}"
        self.log({"client": client.peername[0], "status": None, "edge": {"shield": f"connection closed: http2 flood: {why}"}})

    # -- slow clients -------------------------------------------------------------------------------

    def running(self) -> None:
        if self.sweeper is None:
            self.sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def done(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        if isinstance(self.limiter, RedisStore):
            await self.limiter.close()
        self._set_verifier(None)

    async def _sweep(self) -> None:
        """Every SWEEP seconds, close the connections that missed their deadlines. Nothing in
        a round stops the next (a dead sweeper would leave slow clients connected for good),
        and a failure on one connection does not spare the others."""
        failures = Throttle()

        def close_expired() -> None:
            if self.deadlines is None:
                return
            now = time.monotonic()
            for conn, why in self.deadlines.expired(now):
                try:
                    client = self.clients.pop(conn, None)
                    if client is None:
                        continue
                    if why == "idle timeout" and internals.sending(ctx.master, client):
                        self.clients[conn] = client                # still downloading a response
                        self.deadlines.answered(conn, now)
                        continue
                    if internals.close_client(ctx.master, client):
                        self.refused[f"connection: {why}"] += 1
                        self.closed[conn] = why         # a flow cut short says so in its own log line
                        if why != "request body timeout":
                            self.log({"client": client.peername[0], "status": None,
                                      "edge": {"shield": f"connection closed: {why}"}})
                except Exception as e:
                    report(failures, "shield: closing a slow connection", e)

        await every(SWEEP, close_expired, "shield: slow-client sweep")
