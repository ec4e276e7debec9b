"""Token buckets (nginx limit_req, HAProxy stick tables) and per-IP connection counts. Pure.

A bucket holds up to `burst` tokens and refills at `rate` per second; a request takes one.
A key idle for burst/rate seconds is back to a full bucket, so that is exactly how long a key
needs remembering: idle keys expire and memory stays bounded by the active keys.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from cachetools import TTLCache

logger = logging.getLogger("edge")
MAX_KEYS = 100_000          # in-process store: beyond this, the least recently used keys go


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after: float       # seconds until a token is there (0 when allowed)
    remaining: int           # whole tokens left


def take(tokens: float, stamp: float, now: float, rate: float, burst: int) -> tuple[Verdict, float]:
    """One request against a bucket last seen at `stamp` with `tokens`: the verdict and the
    bucket's new token count (as of `now`)."""
    tokens = min(float(burst), tokens + max(0.0, now - stamp) * rate)
    if tokens >= 1.0:
        return Verdict(True, 0.0, int(tokens - 1.0)), tokens - 1.0
    return Verdict(False, (1.0 - tokens) / rate, 0), tokens


class MemoryStore:
    """The default store: buckets in this process, bounded in count and forgotten when idle."""

    def __init__(self, rate: float, burst: int, max_keys: int = MAX_KEYS) -> None:
        self.rate, self.burst = rate, burst
        self.buckets: TTLCache[str, tuple[float, float]] = TTLCache(max_keys, ttl=burst / rate + 1.0)

    def retuned(self, rate: float, burst: int) -> MemoryStore:
        """This store at another rate or burst (a reload): the same buckets, each capped at the
        new burst when next taken from; itself when nothing changed."""
        if (rate, burst) == (self.rate, self.burst):
            return self
        store = MemoryStore(rate, burst, int(self.buckets.maxsize))
        for key, bucket in list(self.buckets.items()):
            store.buckets[key] = bucket
        return store

    def take(self, key: str, now: float) -> Verdict:
        tokens, stamp = self.buckets.get(key, (float(self.burst), now))
        verdict, tokens = take(tokens, stamp, now, self.rate, self.burst)
        self.buckets[key] = (tokens, now)
        return verdict


class ConnectionCounts:
    """Open connections per client IP (HAProxy's conn_cur). Counts only what it admitted, so a
    connection refused earlier is not undone twice."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: Counter[str] = Counter()
        self.admitted: dict[str, str] = {}        # connection id -> ip

    def admit(self, conn_id: str, ip: str) -> bool:
        if self.open[ip] >= self.limit:
            return False
        self.open[ip] += 1
        self.admitted[conn_id] = ip
        return True

    def release(self, conn_id: str) -> None:
        ip = self.admitted.pop(conn_id, None)
        if ip is not None:
            self.open[ip] -= 1
            if self.open[ip] <= 0:
                del self.open[ip]


def rate_key(key: str, ip: str, path: str, header: Callable[[str], str | None]) -> str:
    """What a request is counted against: `client_ip`, `path` (without the query), or
    `header:NAME` (a request without the header is counted as its client)."""
    if key == "path":
        return "path " + path.split("?", 1)[0]
    if key.startswith("header:"):
        value = header(key[7:])
        return f"header {value}" if value else ip
    return ip


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


# Redis: the same bucket, updated atomically on the server with the server's clock, so every edge
# process sharing the server shares the limit. Idle keys expire on their own (PEXPIRE).
TAKE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(b[1]) or burst
local stamp = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local allowed, retry = 0, 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  retry = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'stamp', tostring(now))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {allowed, tostring(retry), tostring(tokens)}
"""
REDIS_TIMEOUT = 0.25        # seconds; a slow store must not become the bottleneck
REDIS_BACKOFF = 5.0         # after a failure, limit in-process for this long before trying again


class RedisStore:
    """Buckets in a Redis server shared by several edge processes or machines. When Redis cannot
    be reached the limits are kept in-process meanwhile: neither open to a flood nor refusing
    everyone because the store is down. The fallback is logged when it starts and when it
    ends (the first success after it)."""

    def __init__(self, url: str, rate: float, burst: int, prefix: str = "edge:rl:") -> None:
        import redis.asyncio
        self.url, self.rate, self.burst, self.prefix = url, rate, burst, prefix
        self.client = redis.asyncio.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT,
                                                   socket_connect_timeout=REDIS_TIMEOUT)
        self.script = self.client.register_script(TAKE_SCRIPT)
        self.ttl_ms = int((burst / rate + 1.0) * 1000)
        self.fallback = MemoryStore(rate, burst)
        self.down_until = 0.0
        self.down_since: float | None = None       # in fallback since (monotonic), or None
        self.last_error = ""

    async def take(self, key: str, now: float) -> Verdict:
        if now < self.down_until:
            return self.fallback.take(key, now)
        try:
            allowed, retry, tokens = await self.script(keys=[self.prefix + key],
                                                       args=[self.rate, self.burst, self.ttl_ms])
        except Exception as e:          # any failure of the store: limit in-process meanwhile
            self.down_until, self.last_error = now + REDIS_BACKOFF, f"{type(e).__name__}: {e}"
            if self.down_since is None:
                self.down_since = now
                logger.warning("edge: rate limit store %s failed (%s); limiting in this process "
                               "until it answers again (tried every %.0f s)",
                               redacted(self.url), self.last_error, REDIS_BACKOFF)
            return self.fallback.take(key, now)
        if self.down_since is not None:
            logger.warning("edge: rate limit store %s answers again after %.0f s; limits are shared again",
                           redacted(self.url), now - self.down_since)
            self.down_since = None
        return Verdict(bool(int(allowed)), float(retry), int(float(tokens)))

    async def close(self) -> None:
        await self.client.aclose()


def redacted(url: str) -> str:
    """A store URL for the log: without a password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class WorkerLimits:
    """Where a `store: memory` rate limit is counted when the machine runs several workers."""
    store: str              # memory (each worker its own buckets) or the Redis URL they share
    prefix: str             # the keys' prefix in that Redis: this node's own
    note: str               # what worker 0 logs at start: how the limit holds under workers


def worker_limits(store: str, workers: int, node: str | None, cluster_redis: str | None) -> WorkerLimits | None:
    """How shield.rate_limit holds with `workers` processes, or None when it needs nothing (one
    process, or a Redis store already shared). Like nginx's limit_req zones (shared memory
    across its workers), the limit stays one per node: the workers count in the cluster's
    Redis under this node's own keys when cluster.redis is a plain server URL (the store's
    client takes no Sentinel or Cluster form). Otherwise each worker keeps its own buckets and
    says so: a client spreading connections over N workers gets up to N times the rate.
    Dividing the rate by N is not done: the kernel puts a connection in one worker, so a
    client on one keep-alive connection would get 1/N of its limit."""
    if workers <= 1 or store != "memory":
        return None
    if cluster_redis is not None and re.match(r"rediss?://", cluster_redis):
        return WorkerLimits(cluster_redis, f"edge:rl:node:{node}:",
                            f"shield.rate_limit: one limit for the {workers} workers, counted in cluster.redis "
                            f"{redacted(cluster_redis)} (in each worker while it cannot be reached)")
    return WorkerLimits("memory", "", f"shield.rate_limit (store: memory) is counted in each of the {workers} "
                        f"workers: a client spreading its connections over them gets up to {workers} times the "
                        f"rate; give shield.rate_limit.store (or cluster.redis) a redis:// URL for one limit")

