"""The Cluster addon (`edge.cluster`): this node in a Redis-backed cluster of edges. The Redis
glue only: what the records mean, who is live, what to do on reconnecting are in members.py
and fanout.py.

Three background tasks, each surviving any exception (Redis down, a damaged record) with a
back-off, all reporting to one Link so an outage is one log line, not one per request or task:
- heartbeat every ttl/3: this process's member record (expiring after ttl), the others' records
  read back in the same script, and the shared secret (SET NX of a random key, then GET);
- publisher: removals the cache announced (`removed`, a Cache.removal_listener) go to the
  stream and channel; while Redis is away they wait, bounded (fanout.Outbox);
- listener: the channel's removals from other nodes are applied with the cache's `forget`
  (never announced again); on every (re)connection the stream is read from the last applied id,
  or the memory tier emptied when that id is gone (fanout.resync_plan).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable

from addons.cluster import fanout
from addons.cluster.fanout import EVERYTHING, Link, Outbox, resync_plan, stream_id
from addons.cluster.members import KEY_PREFIX, Member, View, collisions, describe, expiry, live, member_key, processes
from addons.cluster.urls import connect, parse_redis_url, redacted
from addons.config import ClusterConfig, EdgeConfig
from addons.workers import runtime

logger = logging.getLogger("edge")
INDEX = KEY_PREFIX + "members"
SECRET = KEY_PREFIX + "secret"
STREAM = KEY_PREFIX + "purges"
CHANNEL = KEY_PREFIX + "purge"
STREAM_MAX = 100_000        # removals kept for nodes that were away (about 100 bytes each)
BACKOFF = (0.1, 2.0)        # seconds: first and longest wait before trying Redis again
READ_BATCH = 1000

BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rec = cjson.decode(ARGV[1])
rec['beat'] = now
redis.call('SET', KEYS[1], cjson.encode(rec), 'PX', ARGV[2])
redis.call('SADD', KEYS[2], KEYS[1])
redis.call('SET', KEYS[3], ARGV[3], 'NX')
local out = {tostring(now), redis.call('GET', KEYS[3])}
for _, k in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local v = redis.call('GET', k)
  if v then table.insert(out, v) else redis.call('SREM', KEYS[2], k) end
end
return out
"""
LEAVE = """
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], KEYS[1])
return 1
"""
# one script: the channel's order is the stream's, and a message always has its stream id
PUBLISH = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'from', ARGV[2], 'key', ARGV[3])
redis.call('PUBLISH', KEYS[2], id .. ' ' .. ARGV[2] .. ' ' .. ARGV[3])
return id
"""


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("edge")
    except Exception:
        return "unknown"


def _identity() -> str:
    """Which process (or, with workers, which machine's supervisor) a record comes from."""
    rt = runtime.current()
    return f"{socket.gethostname()}:{rt.dir if rt is not None else os.getpid()}"


class Cluster:
    def __init__(self, forget: Callable[..., None], listen_addrs: Callable[[], list] = lambda: []) -> None:
        """`forget(key, disk=False)`: the cache's, dropping a removal another node made without
        announcing it again (`*`: everything in memory). `listen_addrs`: the bound client listeners (the default
        advertised address)."""
        self.forget, self.listen_addrs = forget, listen_addrs
        self.config: ClusterConfig | None = None
        self.me: Member | None = None
        self.view = View()
        self.link: Link | None = None
        self.client = None
        self.tasks: list[asyncio.Task] = []
        self.outbox = Outbox()
        self.lost = False                   # the listener lost its connection: resync when back
        self.wake: asyncio.Event | None = None
        self.last_id: str | None = None     # the last stream entry applied (or seen at start)
        self.missed = False                 # removals may have been missed before the first connection
        self.shared: bytes | None = None    # the key shared through Redis
        self.file_secret: bytes | None = None
        self.bot_key: tuple[bytes | None, bytes] = (None, b"")
        self.instance = secrets.token_hex(8)    # this process, in messages: its own are not applied
        self.counts: Counter[str] = Counter()
        self.first_beat: float | None = None
        self.collided: dict[str, str] = {}
        self.cached_live: list[Member] = []
        self.live_until = 0.0
        self.started = False

    # -- what other addons read --------------------------------------------------------------------

    def live(self) -> list[Member]:
        """The live members, this node first; without a cluster, empty."""
        if self.me is None:
            return []
        now = time.monotonic()
        if now >= self.live_until or not self.cached_live:
            self.cached_live = live(self.me, self.view, self.config.ttl, now)
            self.live_until = expiry(self.me, self.view, self.config.ttl)
        return self.cached_live

    def secret(self) -> bytes | None:
        """The cluster's key (peer-request signing): cluster.secret_file's, else the one shared
        through Redis; None while Redis was never reached."""
        return self.file_secret or self.shared

    def bot_secret(self) -> bytes | None:
        """The bot challenge's key, derived from secret() (one key never serves two purposes)."""
        key = self.secret()
        if key is None:
            return None
        if self.bot_key[0] != key:          # asked on every challenged request: derived once a key
            self.bot_key = (key, hmac.new(key, b"edge bot challenge", hashlib.sha256).digest())
        return self.bot_key[1]

    def removed(self, key: str) -> None:
        """A Cache.removal_listener: this node removed `key` (`*`: everything); tell the others."""
        if self.config is None:
            return
        self.outbox.add(key)
        if self.wake is not None:
            self.wake.set()

    def snapshot(self) -> dict:
        """The `cluster` part of /status."""
        if self.me is None:
            return {}
        mono = time.monotonic()
        members = self.live()
        return {"cluster": {
            "node": self.me.name, "redis": redacted(self.config.redis), "instance": self.instance,
            "connected": self.link is not None and self.link.ever_up and self.link.down_since is None,
            "down_for": round(self.link.down_for(mono), 1) if self.link else 0.0,
            "members": describe(members, members[0], self.view.now(mono), processes(self.view, self.config.ttl, mono)),
            "collisions": list(self.collided.values()),
            "purges": {"sent": self.counts["sent"], "applied": self.counts["applied"], "pending": len(self.outbox),
                       "resyncs": self.counts["resyncs"], "emptied": self.counts["emptied"]}}}

    # -- lifecycle ---------------------------------------------------------------------------------

    def apply(self, config: EdgeConfig) -> None:
        old, self.config = self.config, config.cluster
        if self.config is not None and self.config.secret_file:
            with open(self.config.secret_file, "rb") as f:
                self.file_secret = f.read().strip()
        else:
            self.file_secret = None
        if self.started and old != self.config:        # a reload changed it: start over with the new one
            asyncio.get_running_loop().create_task(self._restart())

    async def running(self) -> None:
        self.started = True         # the listeners are bound: the advertised address is known
        if self.config is not None and not self.tasks:
            self._start()

    async def done(self) -> None:
        await self._stop(leave=True)

    def _start(self) -> None:
        cfg = self.config
        host, port = cfg.advertise or self._bound()
        self.me = Member(cfg.node, host, port, _version(), time.time(), 0.0, _identity(),
                         rt.index if (rt := runtime.current()) is not None else 0)
        self.view, self.cached_live, self.first_beat, self.collided = View(), [], None, {}
        self.link = Link(redacted(cfg.redis))
        self.client = connect(parse_redis_url(cfg.redis))
        self.wake = asyncio.Event()
        if self.outbox:
            self.wake.set()
        self.tasks = [asyncio.get_running_loop().create_task(job(), name=f"cluster {job.__name__}")
                      for job in (self._beating, self._publishing, self._listening)]

    def _bound(self) -> tuple[str, int]:
        addrs = self.listen_addrs()
        host, port = addrs[0][:2] if addrs else ("127.0.0.1", 0)
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        return host, port

    async def _stop(self, leave: bool) -> None:
        tasks, self.tasks = self.tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.client is None:
            return
        client, self.client = self.client, None
        if leave and self.me is not None and self.link.down_since is None:
            try:        # a graceful stop: gone from the members at once, not after ttl (Redis down: after ttl)
                await asyncio.wait_for(self._flush(client), 1.0)
                await asyncio.wait_for(client.eval(LEAVE, 2, member_key(self.me), INDEX), 1.0)
            except Exception as e:
                logger.warning("edge: cluster: could not leave the member list (%s); peers drop this node "
                               "after %.0f s", e, self.config.ttl if self.config else 0)
        try:
            await client.aclose()
        except Exception:
            pass

    async def _restart(self) -> None:
        await self._stop(leave=True)
        self.me = None
        if self.config is not None:
            self._start()

    # -- the background tasks ----------------------------------------------------------------------

    async def _forever(self, round_, wait: Callable[[], float], what: str) -> None:
        """Run `round_` again and again; a failure is the Link's (one line an outage), then a
        back-off doubling up to its ceiling; success waits `wait()` seconds."""
        backoff = BACKOFF[0]
        while True:
            try:
                await round_()
                self.link.up(time.monotonic())
                backoff = BACKOFF[0]
                delay = wait()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.link.failed(e, time.monotonic(), what)
                delay, backoff = backoff, min(BACKOFF[1], backoff * 2)
            if delay:
                await asyncio.sleep(delay)

    async def _beating(self) -> None:
        await self._forever(self._beat, lambda: self.config.ttl / 3, "heartbeat")

    async def _beat(self) -> None:
        me = self.me
        out = await self.client.eval(BEAT, 3, member_key(me), INDEX, SECRET, me.record(),
                                     int(self.config.ttl * 1000), self.shared or os.urandom(32))
        now, shared, *records = out
        redis_time = float(now)
        if self.first_beat is None:
            self.first_beat = redis_time
        if shared and shared != self.shared:
            if self.shared is not None:
                logger.warning("edge: cluster: the shared secret changed in redis (challenge cookies issued "
                               "before are refused)")
            self.shared = shared
        members = tuple(m for m in map(Member.from_record, records) if m is not None)
        self.view = View(members, redis_time, time.monotonic())
        self.live_until = 0.0
        for other in collisions(me, members, self.first_beat):
            if other.identity not in self.collided:
                self.collided[other.identity] = (f"{other.identity} at {other.host}:{other.port} also calls "
                                                 f"itself {me.name!r}")
                logger.error("edge: cluster: NAME COLLISION: another edge (%s, advertised %s:%s) uses this "
                             "node's name %r: give each node its own cluster.node; members and purges of the "
                             "two are confused until then", other.identity, other.host, other.port, me.name)

    async def _publishing(self) -> None:
        async def round_() -> None:
            if not self.outbox:
                await self.wake.wait()
            self.wake.clear()
            await self._flush(self.client)
        await self._forever(round_, lambda: 0, "publishing purges")

    async def _flush(self, client) -> None:
        """Send what the outbox holds, in order; a key leaves it only once Redis has it."""
        while self.outbox:
            number, key = self.outbox.first()
            await client.eval(PUBLISH, 2, STREAM, CHANNEL, STREAM_MAX, self.instance, key)
            self.counts["sent"] += 1
            self.outbox.sent(number)

    async def _listening(self) -> None:
        async def round_() -> None:
            try:
                await self._listen()
            except Exception:
                self.lost = True
                if self.last_id is None:
                    self.missed = True      # serving (and caching) before any removal could reach us
                raise
        await self._forever(round_, lambda: 0, "listening for purges")

    async def _listen(self) -> None:
        pubsub = self.client.pubsub()
        interval = self.config.ttl / 3
        try:
            await pubsub.subscribe(CHANNEL)
            await self._resync()
            self.link.up(time.monotonic())
            heard = pinged = time.monotonic()
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=interval)
                now = time.monotonic()
                if message is not None:
                    heard = now
                    if message["type"] == "message":
                        self._message(message["data"])
                if now - heard > 3 * interval:          # a silent cut: no pong came back
                    raise ConnectionError(f"no answer from redis for {now - heard:.1f} s")
                if now - pinged >= interval:
                    pinged = now
                    await pubsub.ping()
        finally:
            try:
                await pubsub.aclose()
            except Exception:
                pass

    def _message(self, data: bytes) -> None:
        try:
            entry_id, sender, key = data.decode("utf-8", "surrogateescape").split(" ", 2)
            self._apply(entry_id, sender, key)
        except ValueError:
            logger.warning("edge: cluster: ignored a malformed purge message %r", data[:200])

    def _apply(self, entry_id: str, sender: str, key: str) -> None:
        """One stream entry, once: this node's own and those already applied are skipped."""
        if self.last_id is not None and stream_id(entry_id) <= stream_id(self.last_id):
            return
        self.last_id = entry_id
        if sender == self.instance or not key:
            return
        self.forget(key, disk=True)      # another machine removed it: its disk is not ours
        self.counts["applied"] += 1

    async def _resync(self) -> None:
        """After (re)subscribing: what the channel brought while this node was not listening."""
        last = self.last_id
        entries = await self.client.xrange(STREAM, min=last, max="+", count=READ_BATCH) if last else []
        still_there = bool(entries) and entries[0][0].decode() == last
        plan = resync_plan(last, still_there, self.missed)
        if plan == "read":
            applied = self.counts["applied"]
            while entries:
                for entry_id, fields in entries:
                    self._apply(entry_id.decode(), fields.get(b"from", b"").decode(),
                                fields.get(b"key", b"").decode("utf-8", "surrogateescape"))
                if len(entries) < READ_BATCH:
                    break
                entries = await self.client.xrange(STREAM, min="(" + self.last_id, max="+", count=READ_BATCH)
            if self.lost:
                self.lost = False
                self.counts["resyncs"] += 1
                logger.warning("edge: cluster: resynchronised from the purge stream: %d removals made while "
                               "away applied", self.counts["applied"] - applied)
            return
        if plan == "empty":
            self.forget(EVERYTHING)
            self.counts["emptied"] += 1
            logger.warning("edge: cluster: the purge stream no longer reaches back to what this node last applied "
                           "(%s: trimmed, or redis lost it): removals may have been missed, memory tier emptied",
                           last or "nothing yet, served before redis answered")
        self.last_id = await self._tail()
        self.missed = self.lost = False

    async def _tail(self) -> str:
        """The stream's last id; an empty stream gets a marker entry, so there is always one."""
        newest = await self.client.xrevrange(STREAM, max="+", min="-", count=1)
        if newest:
            return newest[0][0].decode()
        marker = await self.client.xadd(STREAM, {"from": self.instance, "key": ""}, maxlen=STREAM_MAX,
                                        approximate=True)
        return marker.decode()
