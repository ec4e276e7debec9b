"""The cache addon: answers from memory in `requestheaders` (no origin connection for a hit),
revalidates stale entries with the origin, stores in `response`, serves stale when the origin
fails. The rules are in policy.py; this module only moves bytes between flows and the store.
The request it keys, looks up and stores with is the one the origin will see: the request-side
scrubbing (RequestScrub) and the compress addon (Accept-Encoding: identity) run before it.

Codings: the stored "base" is the origin's representation; each coding the compress addon made
from it is stored beside it as a variant of the same URL, selected by `Accept-Encoding: edge/CODING`
in place of the forwarded `identity` (the edge makes these, so the edge selects them) and the
base's values of every other Vary'd header. A variant carries the base's times, so one made from
an older base is never served; a 304 refreshes the variants with the base, a purge drops them all.

Streamed responses (addons/stream) are stored while they pass: the stream addon's relay hands
each chunk to a Fill (serve.py), committed in `response` when the body is complete, discarded
on `error` (truncated, failed). Requests for the object arriving meanwhile read the Fill as it
grows. A body that is not in memory (a large disk entry, a Fill) is served through the
StoreOrigin, so it streams like any origin's.

Caching is not a security decision, so these hooks are not `fail_closed`: should one raise,
mitmproxy logs it and the request simply goes to the origin, uncached."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import cachetools
import diskcache
from mitmproxy import command, connection, ctx, http
from mitmproxy.addons.clientplayback import ReplayHandler

from addons.cache import policy
from addons.cache.policy import CacheStatus, ResponseRules, Use
from addons.cache.disk import make_store
from addons.cache.serve import FROM_STORE, TICKET, Fill, StoreOrigin, Ticket, response_head
from addons.cache.store import Entry, FileBody, Store
from addons.client import client_of, public_base, split_host
from addons.compress.addon import ACCEPT, BASE, META as CODING
from addons.compress.variants import THREAD_MIN, VARIANT, encoded_fields, plan, represent
from addons.config import CacheConfig, ConfigError, EdgeConfig
from addons.failsafe import edge_answer, made_by_edge
from addons.protocol.rules import declared_length
from addons.net import in_networks, parse_ip
from addons.scrub.masking import OriginMask
from addons.trace import decisions

logger = logging.getLogger("edge")
META = "edge.cache"
REFRESH = "edge.cache.refresh"  # marks the cache's own background revalidation flows
REVALIDATES = "edge.cache.revalidates"  # ... whose outcome a request waits for (the entry, a Fill, False: failed)
CONTINUES = "edge.cache.continues"  # the cache's own range request finishing a Fill its fetcher left
# Set by addons/sites on a routed request: SITE, what keys it (key_prefix, key_path: the site
# and route, the client's path), carried to background refreshes; SETTINGS, the route's cache
# settings in place of the config's.
SITE = "edge.cache.site"
SETTINGS = "edge.cache.settings"
COALESCE_WAIT = 10.0            # seconds a follower waits for the leader's response
UNCACHEABLE_TTL = 120.0         # a URL found uncacheable is not coalesced for this long (Varnish: hit-for-miss)
REFRESH_TIMEOUT = 30.0
# Fields never stored nor served from the cache: per-connection, or added per response.
NOT_STORED = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
                        b"proxy-connection", b"age", b"cache-status"})
NOT_IN_304 = frozenset({b"content-length", b"content-type", b"content-encoding", b"content-range"})


def header_map(fields) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in fields:
        name, value = k.decode("latin-1").lower(), v.decode("utf-8", "surrogateescape")
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


@dataclass
class FlowState:
    """What the cache decided for one flow, between its request and its response or error."""
    key: str
    status: CacheStatus = field(default_factory=CacheStatus)
    entry: Entry | None = None          # stored response being revalidated
    added_validators: bool = False      # the conditional request is ours, not the client's
    invalidate: bool = False
    leader: bool = False                # other requests for this key wait on this one
    answered: bool = False              # the cache produced flow.response
    bypass: bool = False                # neither served from nor stored in the cache
    base: Entry | None = None           # answered with it for a coding it has no variant of yet
    fill: Fill | None = None            # the streamed response being stored
    variant: tuple | None = None        # (coding, writer): its encoded representation being stored
    ticket: str | None = None           # the StoreOrigin's ticket for this answer
    files: list = field(default_factory=list)   # FileBody of entries looked up, closed at the end
    header_sent: bool = False           # Cache-Status left with a streamed head
    tee: Tee | None = None              # what the relay feeds the fill through
    continues: Fill | None = None       # this flow is the cache's own, fetching the rest of this fill


class Tee:
    """The stream addon's relay hands a streamed response's chunks here: the origin's bytes
    to the Fill, the encoded ones (when the relay encodes) to the variant's writer."""

    def __init__(self, fill: Fill | None, variant_writer=None) -> None:
        self.fill, self.variant = fill, variant_writer

    def base(self, chunk: bytes) -> None:
        if self.fill is not None:
            self.fill.write(chunk)

    def coded(self, chunk: bytes) -> None:
        if self.variant is not None and chunk and not self.variant.write(chunk):
            self.variant = None

    def detach(self) -> None:
        """The fill is fed from elsewhere now: this relay only serves its own client."""
        self.fill = self.variant = None


class Cache:
    def __init__(self) -> None:
        self.settings = CacheConfig(enabled=False)
        self.codings: tuple[str, ...] = ()                   # the compress addon's, for variants
        self.min_size = 0
        self.store = Store(1)
        self.tiers: tuple = ()                  # what the store was made from
        self.trusted: tuple = ()
        self.mask = OriginMask([])          # origin URLs in Location name this site
        self.pending: dict[str, asyncio.Future] = {}       # key -> the leader's outcome: its Fill or None
        self.filling: dict[str, Fill] = {}                   # key -> the streamed response being stored
        self.waiting: Counter[str] = Counter()               # key -> followers waiting on it
        self.refreshing: set[str] = set()                    # keys with a background refresh running
        self.revalidations: dict[str, asyncio.Future] = {}  # key -> the outcome of the cache's own conditional
        self.uncacheable: cachetools.TTLCache = cachetools.TTLCache(maxsize=65536, ttl=UNCACHEABLE_TTL)
        self.tasks: set[asyncio.Task] = set()
        self.origin = StoreOrigin()                          # serves bodies that are not in memory
        self.buffer_limit = 2**20                            # larger answers from a file go through it
        # addons/sites: (host, target) -> (key prefix, key path) of every route of its site
        self.site_keys: Callable[[str, str], list[tuple[str, str]] | None] = lambda host, target: None
        # told of every purge and invalidation here (the key, `*`: everything), after the store
        # dropped it: for what shares removals beyond this process (addons/cluster's fan-out)
        self.removal_listeners: list[Callable[[str], None]] = []
        self.purge_log: str | None = None       # the workers' shared PurgeLog (addons/workers), set by the chain

    async def running(self) -> None:
        await self.origin.start()

    async def done(self) -> None:
        await self.origin.stop()

    def apply(self, config: EdgeConfig) -> None:
        self.settings = config.cache
        self.codings, self.min_size = config.compress.encodings, config.compress.min_size
        self.buffer_limit = config.buffer_limit
        self.trusted = config.trusted_proxies
        self.mask = OriginMask((o.host, o.port) for o in config.origins)
        tiers = (config.cache.max_size, config.cache.max_object, config.cache.disk)
        if tiers != self.tiers:
            try:
                store = make_store(config.cache, self.purge_log)
            except (OSError, sqlite3.Error, diskcache.Timeout) as e:
                raise ConfigError(f"cannot open the disk cache: {e}", "cache.disk.path", config.source) from None
            self.store.close()
            self.store, self.tiers = store, tiers

    # -- commands ---------------------------------------------------------------------------------

    @command.command("edge.purge")
    def purge(self, url: str) -> str:
        """Drop a URL (all its variants) from the cache, memory and disk; `*` empties both."""
        if url == "*":
            return f"purged {self._remove('*')} URLs"
        removed = [self._remove(key) for key in self._purge_keys(url)]
        return "purged" if any(removed) else "not cached"

    def forget(self, key: str, disk: bool = False) -> None:
        """Drop `key` (`*`: everything) from the memory tier, without telling the removal
        listeners: a removal another process or node made and announced. `disk`: this
        process's disk tier too (a removal made on another machine, whose disk is its own)."""
        target = self.store if disk else getattr(self.store, "memory", self.store)
        if key == "*":
            target.clear()
        else:
            target.remove(key)

    def _remove(self, key: str) -> int:
        """A purge or invalidation of `key` (`*`: everything): here, then told to the listeners
        (whether or not this process held it: another may). What the store removed."""
        removed = self.store.clear() if key == "*" else self.store.remove(key)
        for listener in self.removal_listeners:
            try:
                listener(key)
            except Exception:           # the removal here is done; a listener never undoes it
                logger.exception("edge: a cache removal listener failed")
        return removed

    # -- hooks ------------------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow):
        if flow.response or not flow.metadata.get(SETTINGS, self.settings).enabled:
            return None
        req = flow.request
        state = FlowState(self._key(flow))
        flow.metadata[META] = state
        if CONTINUES in flow.metadata:
            state.continues, state.bypass = flow.metadata[CONTINUES], True
            state.status = CacheStatus(detail="fetching the rest of an object being stored")
            return None
        method = req.data.method.decode("latin-1")      # as sent: Request.method upper-cases ("purge")
        if method == "PURGE":
            self._purge_request(flow, state)
            return None
        if method not in ("GET", "HEAD"):
            state.invalidate = method not in policy.SAFE_METHODS
            state.status.fwd = "method"
            return None
        # the policy asks a dozen questions of the request's fields; mitmproxy's Headers answers
        # each by a scan of every field, a plain map (lower-case name -> values joined with
        # ", ", as Headers joins them) in one pass
        request = header_map(req.headers.fields)
        if policy.has_content(request):
            self._bypass(flow, state)
            return None
        entry, known = self._lookup(state, request)
        if flow.metadata.get(REFRESH):
            if entry is not None:
                self._revalidate(flow, state, entry, request)
            state.status.detail = "background refresh"
            return None
        if entry is None:
            state.status.fwd = "vary-miss" if known else "uri-miss"
            if self._only_if_cached(flow, state, request):
                return None
            if state.key in self.uncacheable or self._forces_origin(request):
                return None                 # nothing to wait for: waiting would only serialise
            fill = self.filling.get(state.key)
            if fill is not None and self._read_fill(flow, state, fill, request):
                return None
            if state.key in self.pending:
                return self._follow(flow, state, request)
            if method == "GET":
                self.pending[state.key] = asyncio.get_running_loop().create_future()
                state.leader = True
            return None
        return self._use(flow, state, entry, request)

    def request(self, flow: http.HTTPFlow) -> None:
        """A GET/HEAD whose content showed up without framing that announced it (HTTP/2 and 3
        need no Content-Length): no stored answer, no storing."""
        state: FlowState | None = flow.metadata.get(META)
        if state is None or state.bypass or not flow.request.raw_content or flow.request.method not in ("GET", "HEAD"):
            return
        if state.answered:
            # the shield skipped the body's WAF inspection for what it took for a cache hit:
            # forwarding it now would carry an uninspected body to the origin
            flow.response = edge_answer(flow, 400, "a GET or HEAD request with content is not served from the cache")
            state.status = CacheStatus(fwd="bypass", detail="request has content")
            return
        self._bypass(flow, state)

    def response(self, flow: http.HTTPFlow) -> None:
        state: FlowState | None = flow.metadata.get(META)
        if state is None:
            return
        try:
            if state.continues is not None:
                self._continued(flow, state, flow.response.raw_content)
            elif state.fill is not None:
                self._commit_fill(flow, state)
            elif not state.answered and made_by_edge(flow.response):     # a refusal or 503 of ours
                state.status = CacheStatus(detail="edge answer")        # nothing forwarded, nothing stored
            elif not state.answered and not state.bypass:
                self._from_origin(flow, state)
            elif state.variant is not None and state.base is not None:     # the relay made a coding of our base
                coding, writer = state.variant
                if not writer.commit(self._variant_entry(state.base, coding, writer.length)):
                    writer.abort()
                writer.release()
                state.variant = None
            elif state.base is not None and BASE in flow.metadata:    # compress made a coding of our base
                self._store_variant(state.key, state.base, flow.response.headers.get("content-encoding", "identity"),
                                    flow.response.raw_content)
            elif state.bypass and not state.answered:
                state.status.fwd_status = flow.response.status_code
        finally:
            self._release(state)
            self._close(state)
            member = self._record(flow, state)
            if not state.header_sent:
                flow.response.headers.add("Cache-Status", member)

    def streamed(self, flow: http.HTTPFlow, fields, coding: str | None) -> Tee | None:
        """The response is relayed as it arrives (addons/stream), its head about to leave with
        its Cache-Status. `fields`: the origin's head (before the relay's coding, if any:
        `coding`). A storable one is stored as it passes: the returned Tee is fed each chunk,
        and requests waiting for the object read it while it is written."""
        state: FlowState | None = flow.metadata.get(META)
        if state is None:
            return None
        tee = None
        if state.continues is not None:
            return self._continuing(flow, state)
        if not state.answered:
            if not state.bypass and not state.invalidate:
                state.status.fwd_status = flow.response.status_code
                if flow.request.method == "GET":
                    tee = self._start_fill(flow, state, fields, coding)
                    self._tell_revalidation(flow, state.fill)
            self._release(state, state.fill)
        elif FROM_STORE not in flow.metadata:
            return None
        elif coding is not None and state.base is not None and flow.response.status_code == 200:
            writer = self.store.writer(state.key)       # a coding made from a stored base: kept as its variant
            if writer is not None:
                state.variant = (coding, writer)
                tee = Tee(None, writer)
        flow.response.headers.add("Cache-Status", self._record(flow, state))
        state.header_sent = True
        return tee

    def error(self, flow: http.HTTPFlow) -> None:
        """The origin could not be reached: a stale entry answers if the origin allows it."""
        state: FlowState | None = flow.metadata.get(META)
        if state is None:
            return
        self._release(state)
        if state.continues is not None:
            self._end_continuation(state.continues, False)
        if state.fill is not None and not self._take_over(state):      # truncated or failed: never stored
            self._abort_fill(state)
            state.status.detail = "not stored: incomplete"
        self._close(state)
        entry = state.entry
        if entry is not None and flow.response is None:
            request = self._client_request(flow.request, state)
            age = self._age(entry)
            if policy.stale_on_error(entry.rules, entry.lifetime, age, request):
                state.status.detail = "origin unreachable"
                self._answer(flow, state, entry, age, request)
                return
        self._record(flow, state)

    @staticmethod
    def _record(flow: http.HTTPFlow, state: FlowState) -> str:
        """The verdict as a Cache-Status member, also put in the decision trace."""
        member = state.status.render()
        decisions(flow)["cache"] = member.removeprefix("edge; ")
        return member

    # -- decisions on a stored entry ------------------------------------------------------------------

    def _use(self, flow: http.HTTPFlow, state: FlowState, entry: Entry, request: Mapping[str, str]):
        """Answer from the entry, or revalidate it; an entry served from its file is
        revalidated before the answer (returns the coroutine that does it)."""
        age = self._age(entry)
        use = policy.usable(entry.rules, entry.lifetime, age, request)
        if use is not Use.REVALIDATE:
            if use is Use.STALE_WHILE_REVALIDATE:
                state.status.detail = "stale-while-revalidate"
                self._refresh_in_background(flow, state.key)
            self._answer(flow, state, entry, age, request)
            return None
        state.status.fwd = "stale" if age >= entry.lifetime else "request"
        if self._only_if_cached(flow, state, request):
            return None
        if self._streams_from_file(entry, entry.length):
            return self._revalidate_first(flow, state, entry, request)
        self._revalidate(flow, state, entry, request)
        return None

    async def _revalidate_first(self, flow: http.HTTPFlow, state: FlowState, entry: Entry,
                                request: Mapping[str, str]) -> None:
        """A stale entry whose body is in its file: its answer must be set up in
        `requestheaders` (through the StoreOrigin), so the conditional request is the cache's
        own (one per URL at a time) and this request waits for its outcome: a 304 answers from
        the file with the refreshed head; a new body is read while it is stored; an error may
        answer stale (stale-if-error); else this request goes on to the origin as a miss."""
        key = state.key
        outcome = self.revalidations.get(key)
        if outcome is None:
            outcome = self.revalidations[key] = asyncio.get_running_loop().create_future()
            probe = http.HTTPFlow(flow.client_conn, connection.Server(address=flow.server_conn.address))
            probe.request = flow.request.copy()
            probe.metadata[REFRESH] = probe.metadata[REVALIDATES] = outcome
            self._in_background(self._probe(probe, key, outcome))
        try:
            found = await asyncio.wait_for(asyncio.shield(outcome), REFRESH_TIMEOUT)
        except asyncio.TimeoutError:
            found = None
        if isinstance(found, Entry):
            state.status.detail = "revalidated"
            answer = dataclasses.replace(found, file=entry.file)    # the same body, in this flow's own file
            self._answer(flow, state, answer, self._age(answer), request, revalidated=True)
        elif isinstance(found, Fill) and self._read_fill(flow, state, found, request):
            state.status.detail = "changed: read while stored"
        elif found is False and policy.stale_on_error(entry.rules, entry.lifetime, self._age(entry), request):
            state.status.detail = "origin unreachable"
            self._answer(flow, state, entry, self._age(entry), request, revalidated=True)

    async def _probe(self, probe: http.HTTPFlow, key: str, outcome: asyncio.Future) -> None:
        try:
            await asyncio.wait_for(ReplayHandler(probe, ctx.options).replay(), REFRESH_TIMEOUT)
        except Exception as e:
            logger.warning("edge: revalidating %s failed: %s", key, e)
        finally:
            if not outcome.done():
                outcome.set_result(False if probe.error is not None or probe.response is None
                                   or probe.response.status_code >= 500 else None)
            if self.revalidations.get(key) is outcome:
                del self.revalidations[key]

    def _revalidate(self, flow: http.HTTPFlow, state: FlowState, entry: Entry, request: Mapping[str, str]) -> None:
        """Send the request on to the origin, made conditional on the stored validators."""
        state.entry = entry
        if "if-none-match" not in request and "if-modified-since" not in request:
            headers = flow.request.headers
            if "etag" in entry.headers:
                headers["If-None-Match"] = entry.headers["etag"]
                state.added_validators = True
            if "last-modified" in entry.headers:
                headers["If-Modified-Since"] = entry.headers["last-modified"]
                state.added_validators = True

    def _bypass(self, flow: http.HTTPFlow, state: FlowState) -> None:
        """This request goes to the origin as the client sent it and its answer is not stored:
        undo a conditional the cache added and let any requests waiting on it go."""
        if state.added_validators:
            flow.request.headers.pop("If-None-Match", None)
            flow.request.headers.pop("If-Modified-Since", None)
        state.entry, state.added_validators, state.bypass = None, False, True
        state.status = CacheStatus(fwd="bypass", detail="request has content")
        self._release(state)

    def _from_origin(self, flow: http.HTTPFlow, state: FlowState) -> None:
        resp, req = flow.response, flow.request
        status = resp.status_code
        if state.invalidate and 200 <= status < 400:
            self._invalidate(flow, state)
            return
        state.status.fwd_status = status
        entry = state.entry
        request = self._client_request(req, state)
        if entry is not None:
            if status == 304 and state.added_validators:
                cookies = resp.headers.get_all("set-cookie")
                entry = self._refresh(entry, flow, state.key)
                self._tell_revalidation(flow, entry)
                self._answer(flow, state, entry, self._age(entry), request, revalidated=True)
                for cookie in cookies:          # this client's own: never merged into the entry
                    flow.response.headers.add("Set-Cookie", cookie)
                return
            if status >= 500:
                age = self._age(entry)
                if policy.stale_on_error(entry.rules, entry.lifetime, age, request):
                    state.status.detail = f"origin answered {status}"
                    self._answer(flow, state, entry, age, request, revalidated=True)
                    return
        if status == 304 and entry is not None:     # the client's own conditional: keep our copy current
            self._refresh(entry, flow, state.key)
            return
        if req.method == "GET":
            self._store(flow, state, request)

    def _storable(self, flow: http.HTTPFlow, request: Mapping[str, str], fields, length: int | None,
                  response_time: float) -> Entry | str:
        """The entry (its body left empty) RFC 9111 and the safety rules let the cache store for
        this response head, or why not. `length`: the body's, None while unknown."""
        resp, req = flow.response, flow.request
        headers = header_map(fields)            # read a dozen times below: one pass
        rules = ResponseRules.read(headers)
        why_not = policy.storable("GET", resp.status_code, request, headers, rules) or \
            policy.unsafe_to_store(request, headers, rules, req.path)
        if why_not is not None:
            return why_not
        lifetime = policy.freshness_lifetime(resp.status_code, headers, rules, response_time,
                                             flow.metadata.get(SETTINGS, self.settings).default_ttl)
        if not policy.reusable(lifetime, headers, rules):
            return "no-freshness"
        if length is not None and length > self.store.max_object:
            return "too-large"
        selected = policy.vary_key(headers.get("vary"), request)
        omit = NOT_STORED | {n.encode() for n in policy.unstorable_fields(headers, rules)}
        kept = tuple((k, v) for k, v in fields if k.lower() not in omit)
        return Entry(resp.status_code, resp.data.reason, kept, headers, b"",
                     req.timestamp_start, response_time, rules, lifetime, selected)

    def _store(self, flow: http.HTTPFlow, state: FlowState, request: Mapping[str, str]) -> None:
        """Store the origin's response if RFC 9111 and the safety rules allow; `request` is the
        forwarded request (without validators the cache added)."""
        resp = flow.response
        if resp.stream or resp.raw_content is None:
            return
        base = flow.metadata.get(BASE)          # compress made this client's coding of it: store the origin's
        fields, body = base if base is not None else (resp.headers.fields, resp.raw_content)
        entry = self._storable(flow, request, fields, len(body), resp.timestamp_end or time.time())
        if isinstance(entry, str):
            state.status.detail = state.status.detail or f"not stored: {entry}"
            self.uncacheable[state.key] = True
            return
        entry.body = body
        if self.store.put(state.key, entry):
            self._stored(state, entry)
            if base is not None:
                self._store_variant(state.key, entry, resp.headers.get("content-encoding", "identity"),
                                    resp.raw_content)

    def _stored(self, state: FlowState, entry: Entry) -> None:
        self.uncacheable.pop(state.key, None)
        state.status.stored = True
        state.status.ttl = round(entry.lifetime - self._age(entry))

    # -- storing while streaming ----------------------------------------------------------------------

    def _start_fill(self, flow: http.HTTPFlow, state: FlowState, fields, coding: str | None) -> Tee | None:
        """A Fill for this streamed response if it may be stored; else the reason, in the status."""
        resp = flow.response
        length = declared_length(fields)
        framed = length is not None or "chunked" in resp.headers.get("transfer-encoding", "").lower() \
            or resp.is_http2 or resp.is_http3
        entry = self._storable(flow, self._client_request(flow.request, state), fields, length, time.time())
        if isinstance(entry, str) or not framed:
            why = entry if isinstance(entry, str) else "no framing"     # a cut could not be told from the end
            state.status.detail = f"not stored: {why}"
            self.uncacheable[state.key] = True
            return None
        writer = self.store.writer(state.key, length)
        if writer is None:
            state.status.detail = "not stored: no room to store it while streamed"
            return None
        fill = state.fill = Fill(writer, entry, length)
        fill.resume = self._resumable(flow, entry, length)
        fill.on_stall = lambda: self._take_over(state)
        self.filling[state.key] = fill
        state.status.detail = "storing while streamed"
        variant = self.store.writer(state.key) if coding is not None else None     # its size is unknown
        state.variant = (coding, variant) if variant is not None else None
        state.tee = Tee(fill, variant)
        return state.tee

    def _commit_fill(self, flow: http.HTTPFlow, state: FlowState) -> None:
        """The streamed body is complete: store it with the head it came with (its freshness
        from now), and the encoded representation the relay made as its variant."""
        fill = state.fill
        entry = self._finished_entry(fill, flow.response.timestamp_end or time.time())
        if entry is None or not fill.writer.commit(entry):
            state.status.detail = "not stored: incomplete or too large"
            self._abort_fill(state)
            return
        self._end_fill(state, True)
        self._stored(state, entry)
        state.status.detail = "stored while streamed"
        if state.variant is not None:
            coding, writer = state.variant
            variant = self._variant_entry(entry, coding, writer.length)
            if not writer.commit(variant):
                writer.abort()
            writer.release()
            state.variant = None

    def _finished_entry(self, fill: Fill, response_time: float) -> Entry | None:
        """The entry a complete fill is stored as (its freshness counted from its end), or None
        when the body is not the whole of it."""
        if fill.done or (fill.expected is not None and fill.length != fill.expected):
            return None
        t = fill.entry
        fields, headers = t.fields, t.headers
        if fill.expected is None:               # it came chunked: stored with its length
            fields = fields + ((b"Content-Length", str(fill.length).encode()),)
            headers = headers | {"content-length": str(fill.length)}
        lifetime = policy.freshness_lifetime(t.status, headers, t.rules, response_time, self.settings.default_ttl)
        return Entry(t.status, t.reason, fields, headers, b"", t.request_time, response_time, t.rules, lifetime,
                     t.selected_by)

    # -- a fill whose fetcher stopped feeding it ----------------------------------------------------

    @staticmethod
    def _resumable(flow: http.HTTPFlow, entry: Entry, length: int | None) -> tuple | None:
        """(the request, the If-Range validator) to fetch the rest of this body with a range
        request, when the origin allows it: byte ranges, a known length and a strong validator
        (If-Range: a changed object is sent whole, and is then not spliced)."""
        etag = entry.headers.get("etag", "")
        validator = etag if etag.startswith('"') else entry.headers.get("last-modified")
        if length is None or not validator or "bytes" not in entry.headers.get("accept-ranges", "").lower():
            return None
        return flow.request.copy(), validator, flow.client_conn

    def _take_over(self, state: FlowState) -> bool:
        """The request feeding this fill cannot go on at the readers' pace (its client left,
        or readers waited STALL): the cache fetches the rest itself and that request goes on
        for its own client only. True when the fill is now the continuation's."""
        fill = state.fill
        if fill is None or fill.done or fill.readers <= 0 or fill.resume is None:
            return False
        request, validator, client = fill.resume
        fill.resume = None                      # once per fill
        if state.tee is not None:
            state.tee.detach()
        self._drop_variant(state)
        state.fill = None
        state.status.detail = "stored while streamed, finished by the cache"
        for name in ("if-none-match", "if-modified-since", "if-match", "if-unmodified-since", "range", "if-range"):
            request.headers.pop(name, None)
        request.headers["Range"] = f"bytes={fill.length}-"
        request.headers["If-Range"] = validator
        request.timestamp_start = time.time()
        rest = http.HTTPFlow(client, connection.Server(address=(request.host, request.port)))
        rest.request, rest.is_replay = request, "request"
        rest.metadata[CONTINUES] = fill
        self._in_background(self._continue(rest, state.key, fill))
        return True

    async def _continue(self, rest: http.HTTPFlow, key: str, fill: Fill) -> None:
        try:
            await ReplayHandler(rest, ctx.options).replay()
        except Exception as e:
            logger.warning("edge: fetching the rest of %s failed: %s", key, e)
        finally:
            if not fill.done:
                self._end_continuation(fill, False)
            if self.filling.get(key) is fill:
                del self.filling[key]

    def _continuing(self, flow: http.HTTPFlow, state: FlowState) -> Tee | None:
        """The continuation's response head: the rest of this very body (206 from where the
        fill stopped, of the same total), fed to the fill as it arrives; anything else ends it."""
        fill = state.continues
        if not self._continues_fill(flow.response, fill):
            self._end_continuation(fill, False)
            return None
        return Tee(fill)

    def _continued(self, flow: http.HTTPFlow, state: FlowState, body: bytes | None) -> None:
        """The continuation is complete (its body here when it was small enough to be held)."""
        fill = state.continues
        if body is not None and not fill.done:
            if not self._continues_fill(flow.response, fill):
                self._end_continuation(fill, False)
                return
            fill.write(body)
        entry = self._finished_entry(fill, flow.response.timestamp_end or time.time())
        self._end_continuation(fill, entry is not None and fill.writer.commit(entry))

    @staticmethod
    def _continues_fill(resp: http.Response, fill: Fill) -> bool:
        span = policy.content_range(resp.headers.get("content-range", ""))
        return resp.status_code == 206 and span is not None and span[0] == fill.length and span[2] == fill.expected

    def _end_continuation(self, fill: Fill, ok: bool) -> None:
        fill.finish(ok)
        for key, filling in list(self.filling.items()):
            if filling is fill:
                del self.filling[key]

    def _abort_fill(self, state: FlowState) -> None:
        self._drop_variant(state)
        self._end_fill(state, False)

    def _end_fill(self, state: FlowState, ok: bool) -> None:
        fill, state.fill = state.fill, None
        fill.finish(ok)
        if self.filling.get(state.key) is fill:
            del self.filling[state.key]

    def _refresh(self, entry: Entry, flow: http.HTTPFlow, key: str) -> Entry:
        """RFC 9111 4.3.4: a 304 updates the stored headers (and freshness) of the entry; a
        Set-Cookie on it is for the client that revalidated, never for the stored copy."""
        resp = flow.response
        new = {k.lower() for k, _ in resp.headers.fields} - {n.encode() for n in policy.NOT_UPDATED_BY_304} - \
            {b"set-cookie"}
        fields = tuple(f for f in entry.fields if f[0].lower() not in new) + tuple(
            (k, v) for k, v in resp.headers.fields
            if k.lower() in new and k.lower() not in NOT_STORED)
        headers = header_map(fields)
        if "age" in resp.headers:
            headers["age"] = resp.headers["age"]
        rules = ResponseRules.read(headers)
        response_time = resp.timestamp_end or time.time()
        guess = policy.guess_refused(flow.request.headers, headers, flow.request.path) is None
        lifetime = policy.freshness_lifetime(entry.status, headers, rules, response_time,
                                             flow.metadata.get(SETTINGS, self.settings).default_ttl, guess)
        refreshed = Entry(entry.status, entry.reason, fields, headers, entry.body, flow.request.timestamp_start,
                          response_time, rules, lifetime, entry.selected_by)
        refreshed.file = entry.file
        if entry.file is not None:
            # the body is a large file: copied into the refreshed entry in a thread; its
            # variants are made again when next asked for (their times are the old base's)
            if "no-store" not in rules.cc:
                self._in_background(self._put_file(key, refreshed, entry.file.share()))
            return refreshed
        if "no-store" not in rules.cc and self.store.put(key, refreshed):
            for coding in (*self.codings, "identity"):     # same bodies, the refreshed headers and times
                variant = self._variant(key, entry, coding)
                if variant is not None:
                    self._store_variant(key, refreshed, coding, variant.body)
        return refreshed

    # -- codings made at the edge -------------------------------------------------------------------------

    def _representation(self, flow: http.HTTPFlow, state: FlowState, base: Entry,
                        request: Mapping[str, str], revalidated: bool) -> Entry:
        """The entry to answer with: the variant of the client's coding made from this base;
        else the base, which the compress addon then encodes and `response` stores. An answer
        made in `response` (after a revalidation) comes after the compress addon's turn: the
        variant is made here, when small enough for the event loop (else the base is sent,
        and the next hit makes it). A range is served from an identity base (RFC 9110 14.1.1:
        ranges of a coding made at the edge would depend on its encoder; nginx does not range
        what it gzips either)."""
        coding = flow.metadata.get(CODING)
        if coding is None or "accept-encoding" not in base.vary:
            return base
        varies, target = plan(base.status, base.headers, base.length, self.min_size, coding,
                              flow.metadata.get(ACCEPT))
        own = base.headers.get("content-encoding")
        if not varies or target is None:
            return base
        if own is None and flow.request.method == "GET" and "range" in request and self._if_range_ok(request, base):
            return base
        variant = self._variant(state.key, base, target, state)
        if variant is not None:
            flow.metadata.pop(CODING, None)     # settled: the compress addon must not make another coding of it
            decisions(flow)["compress"] = f"{target} stored"
            return variant
        if revalidated and target != "identity" and base.file is None and len(base.body) < THREAD_MIN:
            return self._store_variant(state.key, base, target, represent(base.body, own, target))
        state.base = base
        return base

    @staticmethod
    def _variant_selection(base: Entry, coding: str) -> tuple:
        return tuple((n, VARIANT + coding if n == "accept-encoding" else v) for n, v in base.selected_by)

    def _variant(self, key: str, base: Entry, coding: str, state: FlowState | None = None) -> Entry | None:
        """The stored `coding` variant made from this very base (same times), if any; one in a
        file only when there is a flow (`state`) to serve it to."""
        found, _ = self.store.lookup(key, dict(self._variant_selection(base, coding)))
        if found is not None and found.file is not None:
            if state is None:
                found.file.close()
                return None
            state.files.append(found.file)
        if (found is None or found is base or found.headers.get("content-encoding", "identity") != coding
                or (found.request_time, found.response_time) != (base.request_time, base.response_time)):
            return None
        return found

    def _variant_entry(self, base: Entry, coding: str, length: int, body: bytes = b"") -> Entry:
        fields = encoded_fields(base.fields, coding, length)
        replaced = ("etag", "content-encoding", "content-length")
        headers = {k: v for k, v in base.headers.items() if k not in replaced} | \
            header_map(f for f in fields if f[0].lower().decode() in replaced)
        variant = Entry(base.status, base.reason, fields, headers, body, base.request_time,
                        base.response_time, base.rules, base.lifetime, self._variant_selection(base, coding))
        variant.initial_age = base.initial_age      # a 304's Age the base kept
        return variant

    def _store_variant(self, key: str, base: Entry, coding: str, body: bytes) -> Entry:
        variant = self._variant_entry(base, coding, len(body), body)
        self.store.put(key, variant)
        return variant

    # -- answering from the store -------------------------------------------------------------------------

    def _answer(self, flow: http.HTTPFlow, state: FlowState, entry: Entry, age: float, request: Mapping[str, str],
                revalidated: bool = False) -> None:
        """Set flow.response from a stored entry: 304 for a matching client validator, HEAD
        without a body, one byte range as 206, else the whole stored response."""
        state.answered = True
        if not revalidated:
            state.status.hit = True
            state.status.fwd = None
        state.status.ttl = round(entry.lifetime - age)
        entry = self._representation(flow, state, entry, request, revalidated)
        status, reason, size = entry.status, entry.reason, entry.length
        first, length = 0, size                 # the span of the stored body this answer carries
        fields = entry.fields + ((b"Age", str(int(age)).encode()),)
        method = flow.request.method
        if status == 200 and policy.not_modified(request, entry.headers):
            status, reason, length = 304, b"Not Modified", 0
            fields = tuple(f for f in fields if f[0].lower() not in NOT_IN_304)
        elif status == 200 and method == "GET" and "range" in request and self._if_range_ok(request, entry):
            span = policy.byte_range(request["range"], size)
            if span is not None:
                fields = tuple(f for f in fields if f[0].lower() != b"content-length")
                if span[0] >= size:
                    status, reason, length = 416, b"Range Not Satisfiable", 0
                    fields += ((b"Content-Range", f"bytes */{size}".encode()),)
                else:
                    first, length = span[0], span[1] - span[0] + 1
                    status, reason = 206, b"Partial Content"
                    fields += ((b"Content-Range", f"bytes {first}-{span[1]}/{size}".encode()),)
                fields += ((b"Content-Length", str(length).encode()),)
        if method == "HEAD":
            length = 0
        if self._streams_from_file(entry, length):
            self._from_store(flow, state, response_head(status, reason, fields, length), entry.file.share(),
                             first, length, entry.file.close)
            return
        if entry.file is not None:
            body = entry.file.read(first, length)
        else:
            body = entry.body if (first, length) == (0, size) else entry.body[first:first + length]
        now = time.time()
        flow.response = http.Response(b"HTTP/1.1", status, reason, http.Headers(fields), body, None, now, now)

    def _streams_from_file(self, entry: Entry, length: int) -> bool:
        """An answer of `length` bytes of this entry streams from its file through the
        StoreOrigin; one of at most buffer_limit bytes is read and sent whole (the buffered
        fast path, as for origin bodies: a loopback hop costs more than the read)."""
        return entry.file is not None and length > self.buffer_limit and self.origin.address is not None

    def _from_store(self, flow: http.HTTPFlow, state: FlowState, head: bytes, source, offset: int,
                    length: int | None, close) -> None:
        """Answer through the StoreOrigin (serve.py): the request goes there instead of to an
        origin (routing leaves it alone), and its answer streams like an origin's."""
        state.ticket = self.origin.issue(Ticket(head, source, offset, length, close))
        host, port = self.origin.address
        data = flow.request.data
        data.scheme, data.host, data.port = b"http", host, port
        flow.request.headers[TICKET.decode()] = state.ticket
        flow.metadata[FROM_STORE] = True

    @staticmethod
    def _if_range_ok(request: Mapping[str, str], entry: Entry) -> bool:
        cond = request.get("if-range")
        if cond is None:
            return True
        if cond.startswith('"'):
            return entry.headers.get("etag") == cond         # strong comparison only
        return cond == entry.headers.get("last-modified")

    # -- invalidation, purge, coalescing -----------------------------------------------------------------

    def _invalidate(self, flow: http.HTTPFlow, state: FlowState) -> None:
        """RFC 9111 4.4: a successful unsafe request invalidates its URI and, on the same
        origin, the URIs in Location and Content-Location."""
        self._remove(state.key)
        base = public_base(flow, self.trusted)
        public_host = split_host(base.split("://", 1)[1])
        for name in ("location", "content-location"):
            target = flow.response.headers.get(name)
            if target:
                url = self.mask.rewrite_url(urljoin(base + flow.request.path, target), base, public_host)
                if urlsplit(url).netloc == urlsplit(base).netloc:
                    for key in self._purge_keys(url):
                        self._remove(key)
        state.status.detail = "invalidated"

    @staticmethod
    def _only_if_cached(flow: http.HTTPFlow, state: FlowState, request: Mapping[str, str]) -> bool:
        """RFC 9111 5.2.1.7: a client that wants nothing from the origin gets 504 on a miss."""
        if "only-if-cached" not in policy.parse_directives(request.get("cache-control")):
            return False
        flow.response = edge_answer(flow, 504, "not in the cache (only-if-cached)")
        state.answered = True
        return True

    def _purge_request(self, flow: http.HTTPFlow, state: FlowState) -> None:
        client = parse_ip(client_of(flow, self.trusted))
        if not in_networks(client, self.settings.purge_from):
            flow.response = edge_answer(flow, 403, "purge is not allowed from this address")
        elif any([self._remove(key) for key in self._request_purge_keys(flow, state)]):
            flow.response = edge_answer(flow, 200, "purged")
        else:
            flow.response = edge_answer(flow, 404, "not in cache")
        state.answered = True
        state.status.detail = "purge"

    @staticmethod
    def _tell_revalidation(flow: http.HTTPFlow, outcome) -> None:
        waiting = flow.metadata.get(REVALIDATES)
        if waiting is not None and not waiting.done():
            waiting.set_result(outcome)

    def _refresh_in_background(self, flow: http.HTTPFlow, key: str) -> None:
        """stale-while-revalidate: once per URL at a time, a copy of this request goes through
        the whole chain to the origin (routing, compression, storing), answering nobody."""
        if key in self.refreshing:
            return
        self.refreshing.add(key)
        refresh = http.HTTPFlow(flow.client_conn, connection.Server(address=flow.server_conn.address))
        refresh.request = flow.request.copy()
        refresh.metadata[REFRESH] = True
        if SITE in flow.metadata:           # its request has the origin's path: keep the site's key
            refresh.metadata[SITE] = flow.metadata[SITE]
        self._in_background(self._replay(refresh, key))

    def _in_background(self, job) -> None:
        task = asyncio.get_running_loop().create_task(job)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _put_file(self, key: str, entry: Entry, body: FileBody) -> None:
        try:
            await self.store.put_in_thread(key, entry)
        except Exception as e:          # the old entry stays (stale); the next request refreshes again
            logger.warning("edge: refreshing the stored %s failed: %s", key, e)
        finally:
            body.close()

    async def _replay(self, refresh: http.HTTPFlow, key: str) -> None:
        try:
            await asyncio.wait_for(ReplayHandler(refresh, ctx.options).replay(), REFRESH_TIMEOUT)
        except Exception as e:
            logger.warning("edge: background refresh of %s failed: %s", key, e)
        finally:
            self.refreshing.discard(key)

    async def _follow(self, flow: http.HTTPFlow, state: FlowState, request: Mapping[str, str]) -> None:
        """Another request for this URL is on its way to the origin: wait for it, then answer
        from the cache if it stored something usable, else go to the origin too."""
        self.waiting[state.key] += 1
        fill = None
        try:
            fill = await asyncio.wait_for(asyncio.shield(self.pending[state.key]), COALESCE_WAIT)
            if fill is not None and not self._read_fill(flow, state, fill, request):
                await asyncio.wait_for(asyncio.shield(fill.finished), COALESCE_WAIT)
        except (asyncio.TimeoutError, KeyError):
            pass
        finally:
            self.waiting[state.key] -= 1
            if not self.waiting[state.key]:
                del self.waiting[state.key]
        if state.answered:
            return
        entry, _ = self._lookup(state, request)
        if entry is not None:
            revalidating = self._use(flow, state, entry, request)
            if revalidating is not None:
                await revalidating
            if state.answered:
                state.status.detail = "coalesced"

    def _read_fill(self, flow: http.HTTPFlow, state: FlowState, fill: Fill, request: Mapping[str, str]) -> bool:
        """Answer from the object while it is being stored (read-while-writer): a plain GET
        the stored response would be selected for. A range, or a fill that failed, waits for
        the outcome instead."""
        stored = fill.entry
        if (fill.done or flow.request.method != "GET" or "range" in request or stored.status != 200
                or (stored.vary and policy.selection(stored.vary, request) != stored.selected_by)):
            return False
        state.answered, state.status = True, CacheStatus(hit=True, detail="read while stored")
        fill.add_reader()
        fields = stored.fields + ((b"Age", b"0"),)
        self._from_store(flow, state, response_head(stored.status, stored.reason, fields, fill.expected), fill, 0,
                         fill.expected, fill.drop_reader)
        return True

    def _release(self, state: FlowState, fill: Fill | None = None) -> None:
        """Let the requests waiting for this one go on: with the Fill they may read."""
        if state.leader:
            state.leader = False
            fut = self.pending.pop(state.key, None)
            if fut is not None and not fut.done():
                fut.set_result(fill)

    def _lookup(self, state: FlowState, request: Mapping[str, str]) -> tuple[Entry | None, bool]:
        """The store's entry for this flow; a body left in its file is closed when the flow ends."""
        entry, known = self.store.lookup(state.key, request)
        if entry is not None and entry.file is not None:
            state.files.append(entry.file)
        return entry, known

    @staticmethod
    def _drop_variant(state: FlowState) -> None:
        if state.variant is not None:
            state.variant[1].abort()
            state.variant[1].release()
            state.variant = None

    def _close(self, state: FlowState) -> None:
        """The flow is over: its unused ticket, a coding it did not finish storing, and the
        files of the entries it looked up."""
        self._drop_variant(state)
        if state.ticket is not None:
            self.origin.cancel(state.ticket)
            state.ticket = None
        for body in state.files:
            body.close()
        state.files.clear()

    # -- keys and ages ---------------------------------------------------------------------------------

    def _key(self, flow: http.HTTPFlow) -> str:
        """The public URL, with a default port left out (as `_url_key` does); behind a site,
        its site and route first and the client's path (addons/sites)."""
        base = public_base(flow, self.trusted).lower()
        if base.endswith((":80", ":443")) and base.endswith(":80") == base.startswith("http:"):
            base = base.rsplit(":", 1)[0]
        site = flow.metadata.get(SITE)
        if site is not None:
            return f"{site.key_prefix} {base}{site.key_path}"
        return base + flow.request.path

    def _purge_keys(self, url: str) -> list[str]:
        """The keys a public URL is stored under: its own, or one per route of its site."""
        key = self._url_key(url)
        base_end = key.find("/", key.find("://") + 3)
        base, target = key[:base_end], key[base_end:]
        routes = self.site_keys(urlsplit(url).netloc, target)
        return [key] if routes is None else [f"{prefix} {base}{path}" for prefix, path in routes]

    def _request_purge_keys(self, flow: http.HTTPFlow, state: FlowState) -> list[str]:
        """A PURGE request drops its own key, and behind a site the URL on every route."""
        if SITE not in flow.metadata:
            return [state.key]
        return [state.key, *self._purge_keys(decisions(flow)["public_url"])]

    @staticmethod
    def _url_key(url: str) -> str:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        default = (parts.scheme, port) in (("http", 80), ("https", 443))
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        authority = host if default else f"{host}:{port}"
        path = parts.path or "/"
        return f"{parts.scheme}://{authority}{path}" + (f"?{parts.query}" if parts.query else "")

    @staticmethod
    def _age(entry: Entry) -> float:
        return entry.age(time.time())

    @staticmethod
    def _client_request(req: http.Request, state: FlowState) -> Mapping[str, str]:
        """The request's headers as forwarded, without validators the cache added: the same the
        lookup read, so a stored Vary selection is the one lookups compute."""
        request = header_map(req.headers.fields)        # a plain map: the policy reads it often
        if not state.added_validators:
            return request
        request.pop("if-none-match", None)
        request.pop("if-modified-since", None)
        return request

    @staticmethod
    def _forces_origin(request: Mapping[str, str]) -> bool:
        cc = policy.parse_directives(request.get("cache-control"))
        return "no-cache" in cc or "no-store" in cc or "if-none-match" in request or "if-modified-since" in request
