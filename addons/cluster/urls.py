"""The Redis URL forms `cluster.redis` takes, parsed (pure), and the redis-py client each one
makes (`connect`, the only part that imports redis).

- `redis://[USER:PASSWORD@]HOST:PORT/DB`, `rediss://...` (TLS), `unix:///PATH?db=DB`: one server.
- `redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER[/DB]` (and `rediss+sentinel://`):
  the master Sentinel names MASTER, followed through a failover (redis-py's Sentinel).
- `redis+cluster://[USER:PASSWORD@]HOST:PORT[,...]` (and `rediss+cluster://`): a Redis Cluster
  (redis-py's RedisCluster); the edge's keys share one hash slot (`{edge}`), as its scripts need.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

TIMEOUT = 2.0           # seconds: connect and each command (a stuck server must not hold a task)
HOSTPORT = re.compile(r"(\[[0-9a-fA-F:.]+\]|[^\s:/,\[\]]+):(\d{1,5})")


@dataclass(frozen=True)
class RedisTarget:
    kind: str                           # server | sentinel | cluster
    url: str                            # what redis-py's from_url takes (server, cluster)
    hosts: tuple[tuple[str, int], ...] = ()     # sentinels (or cluster seeds)
    master: str = ""                    # sentinel: the master's service name
    db: int = 0
    password: str | None = None
    username: str | None = None
    tls: bool = False


def parse_redis_url(text: str) -> RedisTarget:
    """The target a `cluster.redis` URL names; ValueError saying which forms exist."""
    if not isinstance(text, str) or not text or any(c.isspace() for c in text):
        raise ValueError("expected a Redis URL: redis://HOST:PORT/DB, rediss://, unix://, "
                         "redis+sentinel://HOST:PORT/MASTER or redis+cluster://HOST:PORT")
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise ValueError(f"{text!r}: expected SCHEME://... (redis, rediss, unix, redis+sentinel, redis+cluster)")
    scheme = scheme.lower()
    if scheme in ("redis", "rediss"):
        parts = urlsplit(text)
        if not parts.hostname:
            raise ValueError(f"{text!r}: no host")
        try:
            parts.port
        except ValueError:
            raise ValueError(f"{text!r}: the port must be a number from 0 to 65535") from None
        return RedisTarget("server", text, db=_db(parts.path.strip("/") or "0", text), tls=scheme == "rediss")
    if scheme == "unix":
        if not urlsplit(text).path:
            raise ValueError(f"{text!r}: expected unix:///PATH/TO/redis.sock")
        return RedisTarget("server", text)
    base, _, kind = scheme.partition("+")
    if base not in ("redis", "rediss") or kind not in ("sentinel", "cluster"):
        raise ValueError(f"{text!r}: unknown scheme {scheme!r} (redis, rediss, unix, redis+sentinel, redis+cluster)")
    userinfo, at, tail = rest.rpartition("@") if "@" in rest.split("/", 1)[0] else ("", "", rest)
    username, _, password = userinfo.partition(":") if at else ("", "", "")
    netloc, _, path = tail.partition("/")
    hosts = []
    for item in netloc.split(","):
        m = HOSTPORT.fullmatch(item)
        if m is None or not 0 < int(m[2]) <= 65535:
            raise ValueError(f"{text!r}: {item!r}: expected HOST:PORT")
        hosts.append((m[1].strip("[]"), int(m[2])))
    creds = dict(username=unquote(username) or None, password=unquote(password) or None)
    if kind == "cluster":
        if path.strip("/"):
            raise ValueError(f"{text!r}: a Redis Cluster has no databases (nothing after the hosts)")
        first = userinfo + at + netloc.split(",")[0]
        return RedisTarget("cluster", urlunsplit((base, first, "", "", "")), tuple(hosts), tls=base == "rediss",
                           **creds)
    names = [p for p in path.split("/") if p]
    if not names or len(names) > 2:
        raise ValueError(f"{text!r}: expected redis+sentinel://HOST:PORT[,HOST:PORT]/MASTER[/DB]")
    return RedisTarget("sentinel", text, tuple(hosts), names[0], _db(names[1] if len(names) > 1 else "0", text),
                       tls=base == "rediss", **creds)


def _db(text: str, url: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{url!r}: the database must be a number, not {text!r}")
    return int(text)


def redacted(url: str) -> str:
    """A URL for the log and /status: without its password."""
    return re.sub(r"(://[^/@]*?:)[^/@]*@", r"\1***@", url)


def connect(target: RedisTarget, timeout: float = TIMEOUT):
    """A redis-py asyncio client for the target (no connection is made yet)."""
    import redis.asyncio
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    # one retry at once (a pooled connection left from before a Redis restart), then the
    # caller's own back-off: a command never hangs in redis-py's retries while Redis is down
    opts = dict(socket_timeout=timeout, socket_connect_timeout=timeout, socket_keepalive=True,
                retry=Retry(NoBackoff(), 1))
    if target.kind == "server":
        return redis.asyncio.Redis.from_url(target.url, **opts)
    if target.kind == "cluster":
        from redis.asyncio.cluster import ClusterNode, RedisCluster
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in target.hosts], ssl=target.tls,
                            username=target.username, password=target.password, **opts)
    from redis.asyncio.sentinel import Sentinel
    sentinel = Sentinel(list(target.hosts), sentinel_kwargs=dict(opts, password=target.password, ssl=target.tls),
                        ssl=target.tls, username=target.username, password=target.password, **opts)
    return sentinel.master_for(target.master, db=target.db)
