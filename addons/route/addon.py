"""The route addon: picks the pool and origin for each request before any upstream connection
exists (mitmproxy decides the destination from request.host/port), keeping the client's Host.
Only available origins are picked: active checks run in the background, a quiet or doubtful
origin gets a connect probe first, consecutive origin failures eject an origin for a cool-down
(addons/route/health.py: what counts), and a pool with nothing available hands over to its
fallback pool. With nothing available anywhere, ejected origins are used anyway (panic mode);
only when checks or probes show nothing is reachable does the client get an origin-free 503."""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections import Counter
from pathlib import Path

from mitmproxy import command, ctx, exceptions, http
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from addons import internals
from addons.cache.serve import FROM_STORE
from addons.admin import format_status
from addons.client import client_of
from addons.config import EdgeConfig, HealthCheck, Origin, PassiveHealth, Pool
from addons.failsafe import edge_answer, fail_closed
from addons.geo.locate import Locator, embedded_database
from addons.geo.steer import Steering, steer
from addons.route.balance import SmoothWeighted, least_loaded, rendezvous
from addons.route.health import CONNECT_TIMEOUT, READ_TIMEOUT, Failure, Health, classify, ejection_allowed
from addons.tasks import Throttle, report
from addons.trace import decisions
from addons.workers.checks import checks_here, origin_key, stale_after, to_adopt

logger = logging.getLogger("edge")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})")
IN_FLIGHT = "edge.route.origin"   # the origin a flow counts against until it ends
TRIED = "edge.route.tried"        # origins a flow already failed on: failover tries each once
POOL = "edge.route.pool"          # the pool a site's route names (addons/sites), before geo steering
ELSEWHERE = "edge.route.elsewhere"  # another addon chose this flow's destination (the tiered cache's peer)
# RFC 9110 9.2.2: safe to send again after bytes may have reached an origin (nginx's rule too)
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
QUIET = 5.0             # an origin not heard from for this long is probed before use
PROBE_TIMEOUT = 0.3     # a TCP connect on a LAN takes well under a millisecond


class PoolBalancer:
    """A pool's primaries, then its backups, by the pool's method: smooth weighted round robin,
    weighted least connections, or weighted rendezvous hashing of a request key."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        primaries = [(o, o.weight) for o in pool.origins if not o.backup]
        backups = [(o, o.weight) for o in pool.origins if o.backup]
        self.primaries = SmoothWeighted(primaries)
        self.backups = SmoothWeighted(backups) if backups else None
        self.turn = 0               # least_conn: where ties start, moved on every pick

    def pick(self, usable, key: str, load, share=None) -> Origin | None:
        """`share` scales weights during slow start (not for hash: keys must stay put)."""
        for group in (self.primaries, self.backups):
            if group is None:
                continue
            balance = self.pool.balance
            if balance == "weighted_round_robin":
                origin = group.pick(usable, share)
            elif balance == "hash":
                origin = rendezvous(key, list(zip(group.items, group.weights)), lambda o: o.url, usable)
            else:
                self.turn += 1
                weighted = [(o, w * share(o) if share else w) for o, w in zip(group.items, group.weights)]
                origin = least_loaded(weighted, load, usable, self.turn)
            if origin is not None:
                return origin
        return None


class Route:
    def __init__(self) -> None:
        self.balancers: dict[str, PoolBalancer] = {}
        self.default_pool = ""
        self.health: dict[tuple[str, int], Health] = {}
        self.checker: asyncio.Task | None = None
        self.check_errors = Throttle()      # a failing check is reported once a minute, not every round
        self.probes: dict[tuple[str, int], asyncio.Task] = {}
        self.in_flight: Counter[tuple[str, int]] = Counter()
        self.trusted: tuple = ()
        self.locator: Locator | None = None
        self.connect_timeouts: dict[tuple[str, int], float] = {}
        self.passive: dict[tuple[str, int], PassiveHealth] = {}
        self.pools_of: dict[tuple[str, int], list[Pool]] = {}
        self.steering: Steering | None = None
        self.shared = None      # addons/workers/checks.SharedChecks: checks once per machine (a worker's)

    def apply(self, config: EdgeConfig) -> None:
        # a pool that a reload left as it was keeps its balancer (its turn, weights set at run time)
        kept = {name: b for name, b in self.balancers.items() if config.pools.get(name) == b.pool}
        self.balancers = {name: kept.get(name) or PoolBalancer(pool) for name, pool in config.pools.items()}
        self.default_pool = config.default_pool
        self.trusted = config.trusted_proxies
        self.steering = Steering.from_config(config) if config.geo else None
        self.connect_timeouts = {(o.host, o.port): p.connect_timeout for p in config.pools.values() for o in p.origins}
        self.passive = {(o.host, o.port): p.passive for p in config.pools.values() for o in p.origins}
        internals.read_timeouts = {(o.host, o.port): p.read_timeout for p in config.pools.values() for o in p.origins}
        self.pools_of = {}
        for pool in config.pools.values():
            for o in pool.origins:
                self.pools_of.setdefault((o.host, o.port), []).append(pool)
        database = None if config.geo is None else Path(config.geo.database or embedded_database())
        if database is None:
            self.locator = None
        elif self.locator is None or self.locator.path != database:     # same file: keep its cache
            self.locator = Locator(database)
        old = self.health
        self.health = {}
        for pool in config.pools.values():
            check = pool.health or HealthCheck()
            for o in pool.origins:
                kept = old.get((o.host, o.port))          # an origin a reload kept keeps its health
                if kept is not None:
                    kept.rise, kept.fall = check.rise, check.fall
                self.health[(o.host, o.port)] = kept or Health(check.rise, check.fall)

    # -- choosing ---------------------------------------------------------------------------------

    def choose(self, pool_name: str, now: float, flow: http.HTTPFlow | None = None,
               tried: frozenset | set = frozenset()) -> tuple[str, Origin] | None:
        """The first pool along the fallback chain with an available origin, and that origin.
        Panic mode (Envoy's panic threshold, nginx's rule for a lone server): with none
        available anywhere, the first pool with an origin that is only ejected, not shown
        unreachable, gets the request anyway. `tried`: origins this request already failed on."""
        chain = []
        while pool_name and pool_name not in chain:
            chain.append(pool_name)
            pool_name = self.balancers[pool_name].pool.fallback or ""
        load = lambda o: self.in_flight[(o.host, o.port)]
        for panic in (False, True):
            state = Health.reachable if panic else Health.available
            usable = lambda o: (o.host, o.port) not in tried and state(self._health(o), now)
            for name in chain:
                balancer = self.balancers[name]
                pool = balancer.pool
                key = self._hash_key(flow, pool) if flow is not None and pool.balance == "hash" else ""
                share = (lambda o: self._health(o).share(now, pool.slow_start)) if pool.slow_start else None
                origin = balancer.pick(usable, key, load, share)
                if origin is not None:
                    if panic and flow is not None:
                        decisions(flow)["panic"] = f"nothing available from pool {chain[0]}: an ejected origin serves"
                    return name, origin
        return None

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow):
        if flow.response or not self.balancers or FROM_STORE in flow.metadata or ELSEWHERE in flow.metadata:
            return None                     # the cache serves it, or a peer node does
        now = time.monotonic()
        wanted = self._wanted(flow, now)
        chosen = self.choose(wanted, now, flow)
        if chosen is not None and self._health(chosen[1]).suspect(now, QUIET):
            return self._probe_then_route(flow, wanted, chosen)     # async only on this rare path
        self._route(flow, wanted, chosen)
        return None

    def _wanted(self, flow: http.HTTPFlow, now: float) -> str:
        """The pool a request asks for: its site route's, else geo steering's, else the default."""
        pool = flow.metadata.get(POOL)
        if pool in self.balancers:      # a pool a reload removed meanwhile: steered as if none was named
            return pool
        return self._steer(flow, now) if self.steering is not None else self.default_pool

    def _steer(self, flow: http.HTTPFlow, now: float) -> str:
        """Geo steering: the pool for where the client is, recorded in the trace."""
        place = self.locator.locate(client_of(flow, self.trusted))
        pool, why = steer(self.steering.options(place), lambda name: self._pool_available(name, now),
                         self.default_pool)
        decisions(flow)["geo"] = {"country": place and place.country, "continent": place and place.continent,
                                  "pool": pool, "why": why}
        return pool

    def _pool_available(self, name: str, now: float) -> bool:
        return any(self._health(o).available(now) for o in self.balancers[name].pool.origins)

    async def _probe_then_route(self, flow: http.HTTPFlow, wanted: str, chosen: tuple[str, Origin]) -> None:
        """Learn that a quiet origin died before a client pays for it: a short TCP connect, and
        on failure the origin is marked and the next choice is probed (each origin at most once)."""
        for _ in range(len(self.health)):
            origin = chosen[1]
            if not self._health(origin).suspect(time.monotonic(), QUIET) or await self._probe(origin):
                break
            chosen = self.choose(wanted, time.monotonic(), flow)
            if chosen is None:
                break
        self._route(flow, wanted, chosen)

    async def _probe(self, origin: Origin) -> bool:
        """One connect probe per origin at a time: a burst of requests after a quiet spell
        shares it."""
        key = (origin.host, origin.port)
        task = self.probes.get(key)
        if task is None:
            task = self.probes[key] = asyncio.get_running_loop().create_task(self._connect(origin))
            task.add_done_callback(lambda _: self.probes.pop(key, None))
        return await asyncio.shield(task)

    async def _connect(self, origin: Origin) -> bool:
        """A failed probe is the edge's own evidence that the origin cannot be reached (no
        client's request is involved): unreachable for the cool-down, no panic mode."""
        health = self._health(origin)
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(origin.host, origin.port), PROBE_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as e:
            if classify(str(e), connecting=True, client_gone=False) is Failure.LOCAL:
                return True                 # the edge is out of descriptors: says nothing of the origin
            cooldown = self.passive[(origin.host, origin.port)].cooldown
            if health.probe_failed(f"connect probe: {type(e).__name__}", time.monotonic(), cooldown):
                logger.warning("edge: origin %s unreachable: connect probe failed", origin.url)
            return False
        writer.close()
        health.probe_passed(time.monotonic())
        return True

    def failover(self, flow: http.HTTPFlow, error: str, sent: bool) -> bool:
        """The origin failed before answering: count it if the failure is the origin's, and
        point the flow at the next available origin it has not failed on (this pool, then its
        fallbacks). Called by the internals patch, which then connects again; `sent`: bytes
        may have reached the failed origin."""
        key = flow.metadata.get(IN_FLIGHT)
        health = self.health.get(key) if key is not None else None
        if health is None:
            return False
        failure = classify(error, connecting=not sent, client_gone=flow.client_conn.timestamp_end is not None)
        rec = decisions(flow)
        if not failure.counts:
            rec["upstream"] = f"{failure.value}: {error}"
            return False
        self._origin_failed(key, health, error)
        if sent and flow.request.method not in IDEMPOTENT:
            return False
        rec.setdefault("failover", []).append(f"{key[0]}:{key[1]} {error}")
        tried = flow.metadata.setdefault(TRIED, set())
        tried.add(key)
        self._finished(flow)
        if rec["pool"] not in self.balancers:       # its pool was removed by a reload: no failover
            return False
        chosen = self.choose(rec["pool"], time.monotonic(), flow, tried)
        if chosen is None:
            return False
        wanted = flow.metadata.get(POOL) or (rec["geo"]["pool"] if "geo" in rec else self.default_pool)
        self._route(flow, wanted, chosen)
        return True

    def to_origin(self, flow: http.HTTPFlow) -> bool:
        """Route now, without a probe, a flow another addon had sent elsewhere (a tiered-cache
        peer that failed before answering); False when no origin is available."""
        flow.metadata.pop(ELSEWHERE, None)
        now = time.monotonic()
        wanted = self._wanted(flow, now)
        chosen = self.choose(wanted, now, flow)
        if chosen is None:
            return False
        self._route(flow, wanted, chosen)
        return True

    def _origin_failed(self, key: tuple[str, int], health: Health, why: str) -> None:
        now = time.monotonic()
        passive = self.passive[key]
        if health.origin_failed(why, now, passive.failures, passive.cooldown, self._may_eject(key, now)):
            logger.warning("edge: origin %s:%s ejected for %.0fs: %d failures in a row, the last: %s",
                           key[0], key[1], passive.cooldown, passive.failures, why)

    def _may_eject(self, key: tuple[str, int], now: float) -> bool:
        """max_ejected has room in every pool the origin is in."""
        return all(ejection_allowed(sum(self._health(o).ejected(now) for o in pool.origins),
                                    len(pool.origins), pool.passive.max_ejected)
                   for pool in self.pools_of.get(key, ()))

    def server_connect(self, data: ServerConnectionHookData) -> None:
        """mitmproxy has no upstream connect timeout (a blackholed origin holds a request for
        the OS's ~2 min SYN retries). This hook runs in the task that is about to connect:
        cancelling it after the pool's connect_timeout fails the connect, and failover takes
        the request to the next origin."""
        timeout = self.connect_timeouts.get(data.server.address)
        if timeout is not None:
            asyncio.get_running_loop().call_later(timeout, _cancel_if_connecting, asyncio.current_task(), data.server)

    def _route(self, flow: http.HTTPFlow, wanted: str, chosen: tuple[str, Origin] | None) -> None:
        rec = decisions(flow)
        if chosen is None:
            _note_route(rec, "no origin available")
            flow.response = edge_answer(flow, 503, "no origin is available to serve this request",
                                        {"Retry-After": "5"})
            return
        pool, origin = chosen
        # The destination only: the Request.host/port setters would also rewrite the Host
        # header, and the origin must see the client's Host.
        data = flow.request.data
        data.scheme, data.host, data.port = origin.scheme_bytes, origin.host, origin.port
        rec["pool"] = pool
        rec["origin"] = origin.url
        key = (origin.host, origin.port)
        self.in_flight[key] += 1
        flow.metadata[IN_FLIGHT] = key
        if pool != wanted:
            _note_route(rec, f"fallback from {wanted}")

    def _hash_key(self, flow: http.HTTPFlow, pool: Pool) -> str:
        kind, _, name = pool.hash_key.partition(":")
        value = None
        if kind == "cookie":
            value = flow.request.cookies.get(name)
        elif kind == "header":
            value = flow.request.headers.get(name)
        return value or client_of(flow, self.trusted)     # no cookie yet: stick to the client

    def _health(self, origin: Origin) -> Health:
        return self.health[(origin.host, origin.port)]

    @command.command("edge.weight")
    def weight(self, pool: str, origin: str, weight: int) -> str:
        """Set an origin's weight at run time (0 drains it): edge.weight POOL ORIGIN_URL N."""
        balancer = self.balancers.get(pool)
        if balancer is None:
            raise exceptions.CommandError(f"no pool named {pool!r}")
        match = [o for o in balancer.pool.origins if o.url == origin or o.authority == origin]
        if not match or not 0 <= weight <= 1000:
            raise exceptions.CommandError(f"no origin {origin!r} in pool {pool!r}, or weight not 0..1000")
        target = match[0]
        (balancer.backups if target.backup else balancer.primaries).set_weight(target, weight)
        return f"{pool} {target.url} weight {weight}"

    # -- passive health -----------------------------------------------------------------------------

    def _finished(self, flow: http.HTTPFlow) -> None:
        key = flow.metadata.pop(IN_FLIGHT, None)
        if key is not None:
            self.in_flight[key] -= 1

    def error(self, flow: http.HTTPFlow) -> None:
        """A read timeout (internals) is answered 504 by the edge, unless the cache answered
        with a stale copy already; it does not count against the origin (one slow URL is no
        outage: a wedged origin fails its active checks)."""
        self._finished(flow)
        if flow.response is None and flow.error is not None and flow.error.msg == READ_TIMEOUT:
            decisions(flow)["upstream"] = f"{Failure.TIMEOUT.value}: {READ_TIMEOUT}"
            flow.response = edge_answer(flow, 504, "the origin did not answer in time")

    def response(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """The origin answered: passive health from that, before the cache may answer for it."""
        key = flow.metadata.get(IN_FLIGHT)            # set only for requests this addon routed
        health = self.health.get(key) if key is not None else None
        if health is None or flow.server_conn.timestamp_tcp_setup is None:
            return                                    # an addon answered: the origin said nothing
        now = time.monotonic()
        passive = self.passive[key]
        if health.answered(flow.response.status_code, now, passive.consecutive_5xx, passive.cooldown,
                           passive.consecutive_5xx > 0 and self._may_eject(key, now)):
            logger.warning("edge: origin %s:%s ejected for %.0fs: %s", key[0], key[1], passive.cooldown,
                           health.last_error)

    # -- active health --------------------------------------------------------------------------------

    def running(self) -> None:
        if self.checker is None:
            self.checker = asyncio.get_running_loop().create_task(self._check_forever())

    def done(self) -> None:
        if self.checker is not None:
            self.checker.cancel()
            self.checker = None
        if self.shared is not None:
            self.shared.close()         # another worker leads from its next round

    async def _check_forever(self) -> None:
        """Every pool with `health` in the current config (it may be reloaded). An exception
        is logged and the next round runs: a dead checker would keep a dead origin in."""
        while True:
            pools = [p for b in self.balancers.values() if (p := b.pool).health is not None]
            checks = [(o, p.health) for p in pools for o in p.origins]
            if self.shared is not None and checks:
                checks = self._machine_checks(checks)
            done = await asyncio.gather(*(self._check(o, check) for o, check in checks), return_exceptions=True)
            for error in done:
                if isinstance(error, Exception):
                    report(self.check_errors, "a health check", error)
            if self.shared is not None and self.shared.leads:
                self._publish_verdicts(checks, done)
            await asyncio.sleep(min((p.health.interval for p in pools), default=1.0))

    def _machine_checks(self, checks: list[tuple[Origin, HealthCheck]]) -> list[tuple[Origin, HealthCheck]]:
        """A worker of several (addons/workers/checks.py): all checks when it leads the
        machine's or the leader is stuck; else the leader's new verdicts adopted, and only the
        origins they do not name are checked here."""
        shared, now = self.shared, time.time()
        if shared.lead():
            return checks
        verdicts = shared.read()
        stale = stale_after(min(c.interval for _, c in checks), max(c.timeout for _, c in checks))
        if checks_here(False, verdicts, now, stale):
            return checks
        if to_adopt(verdicts, shared.adopted):
            shared.adopted = (verdicts["pid"], verdicts["round"])
            for o, _ in checks:
                verdict = verdicts["origins"].get(origin_key(o.host, o.port))
                health = self.health.get((o.host, o.port))
                if verdict is not None and health is not None:
                    health.adopt(verdict["up"], verdict["passed"], verdict["why"], time.monotonic())
        return [(o, c) for o, c in checks if origin_key(o.host, o.port) not in verdicts["origins"]]

    def _publish_verdicts(self, checks: list[tuple[Origin, HealthCheck]], done: list) -> None:
        origins = {}
        for (o, _), result in zip(checks, done):
            health = self.health.get((o.host, o.port))
            if health is not None and isinstance(result, tuple):
                origins[origin_key(o.host, o.port)] = {"up": health.up, "passed": result[0], "why": result[1]}
        try:
            self.shared.publish(origins, time.time())
        except OSError as e:
            report(self.check_errors, "publishing the health verdicts", e)

    async def _check(self, origin: Origin, check: HealthCheck) -> tuple[bool, str] | None:
        """One check; (passed, why), None for an origin a reload removed."""
        health = self.health.get((origin.host, origin.port))
        if health is None:
            return None                     # the config was reloaded without this origin
        try:
            status = await asyncio.wait_for(probe(origin, check.path), check.timeout)
            ok = check.expect[0] <= status <= check.expect[1]
            why = f"health check answered {status}"
        except (OSError, asyncio.TimeoutError, ValueError) as e:
            ok, why = False, f"health check failed: {type(e).__name__} {e}".strip()
        if ok:
            health.last_ok = time.monotonic()
        if ok and health.check_passed(time.monotonic()):
            logger.warning("edge: origin %s is up again", origin.url)
        elif not ok and health.check_failed(why):
            logger.warning("edge: origin %s is down: %s", origin.url, why)
        return ok, why

    def snapshot(self) -> dict:
        """Each pool's origins: current weight, role, health, requests in flight."""
        now = time.monotonic()
        pools = {}
        for name, balancer in self.balancers.items():
            pool = balancer.pool
            origins = []
            for o in pool.origins:
                group = balancer.backups if o.backup else balancer.primaries
                health = self._health(o)
                origins.append({"url": o.url, "weight": group.weights[group.items.index(o)], "backup": o.backup,
                                "available": health.available(now), "state": health.describe(now, pool.slow_start),
                                "in_flight": self.in_flight[(o.host, o.port)]})
            pools[name] = {"balance": pool.balance, "fallback": pool.fallback, "origins": origins}
        return {"default_pool": self.default_pool, "geo": str(self.locator.path) if self.locator else None,
                "pools": pools}

    @command.command("edge.status")
    def status(self) -> str:
        """Each pool's origins with their weight, health and requests in flight."""
        return format_status(self.snapshot())


def _note_route(rec: dict, what: str) -> None:
    """The trace's `route`: after the site's route (addons/sites), if there is one."""
    current = rec.get("route")
    if current is None:
        rec["route"] = what
    elif not current.endswith(what):        # failover routes again: said once
        rec["route"] = f"{current}; {what}"


def _cancel_if_connecting(task: asyncio.Task | None, server) -> None:
    if task is not None and not task.done() and server.timestamp_tcp_setup is None and server.error is None:
        task.cancel(CONNECT_TIMEOUT)


async def probe(origin: Origin, path: str) -> int:
    """GET the health path over a fresh connection; the status code."""
    context = None
    if origin.scheme == "https":
        context = ssl.create_default_context(cafile=ctx.options.ssl_verify_upstream_trusted_ca)
        if ctx.options.ssl_insecure:
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(origin.host, origin.port, ssl=context)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {origin.authority}\r\nUser-Agent: edge-health\r\n"
                     f"Connection: close\r\n\r\n".encode())
        await writer.drain()
        m = _STATUS_LINE.match(await reader.readline())
        if m is None:
            raise ValueError("not an HTTP response")
        return int(m[1])
    finally:
        writer.close()
