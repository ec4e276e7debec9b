"""Cluster membership, pure: the record each node keeps in Redis under a key that lives `ttl`
seconds (renewed every ttl/3), and what a node makes of the records it reads: the live
members, this node always first-class among them, and other nodes claiming its name.

Times in records are the Redis server's clock (its TIME, taken by the script that writes
them), so ages never depend on the nodes' clocks agreeing."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

KEY_PREFIX = "edge:{edge}:"         # one hash slot under Redis Cluster: the scripts touch several keys


@dataclass(frozen=True)
class Member:
    """A node of the cluster, as peers reach it (`host`:`port`, its client listener)."""
    name: str
    host: str
    port: int
    version: str = ""
    started: float = 0.0        # wall clock of its start (its own clock: for display only)
    beat: float = 0.0           # Redis time of its last heartbeat
    identity: str = ""          # host name and process (or the machine's runtime dir with workers)
    worker: int = 0

    def record(self) -> str:
        """The JSON stored in Redis (the heartbeat script sets `beat`)."""
        return json.dumps({"name": self.name, "host": self.host, "port": self.port, "version": self.version,
                           "started": self.started, "identity": self.identity, "worker": self.worker})

    @classmethod
    def from_record(cls, text: str | bytes) -> Member | None:
        """A stored record, or None for one that is not ours or is damaged (ignored, never fatal)."""
        try:
            d = json.loads(text)
            return cls(str(d["name"]), str(d["host"]), int(d["port"]), str(d.get("version", "")),
                       float(d.get("started", 0.0)), float(d.get("beat", 0.0)), str(d.get("identity", "")),
                       int(d.get("worker", 0)))
        except (ValueError, KeyError, TypeError):
            return None


def member_key(me: Member) -> str:
    """One key per process: workers of one node each keep their own, so one stopping (a rolling
    reload) never removes the node while its other workers serve."""
    return f"{KEY_PREFIX}member:{me.name}/{me.identity}/{me.worker}"


@dataclass
class View:
    """The members last read from Redis: their records, the Redis time of that read and the
    local monotonic time it was made at (to age them while Redis cannot be read)."""
    records: tuple[Member, ...] = ()
    redis_time: float = 0.0
    read_at: float = 0.0

    def now(self, mono: float) -> float:
        """The Redis clock now, estimated from the last read."""
        return self.redis_time + (mono - self.read_at)


def live(me: Member, view: View, ttl: float, mono: float) -> list[Member]:
    """This node, then every other node whose last heartbeat is younger than `ttl` (one entry a
    name: its freshest record), sorted by name. Redis unreachable: the last view ages on, so
    after `ttl` only this node is left."""
    now = view.now(mono)
    best: dict[str, Member] = {}
    for m in view.records:
        if m.name == me.name or now - m.beat >= ttl:
            continue
        if m.name not in best or m.beat > best[m.name].beat:
            best[m.name] = m
    return [me, *sorted(best.values(), key=lambda m: m.name)]


def expiry(me: Member, view: View, ttl: float) -> float:
    """The monotonic time the first of the other live members expires (when live() changes
    without a new read)."""
    times = [view.read_at + ttl - (view.redis_time - m.beat) for m in view.records
             if m.name != me.name and view.redis_time - m.beat < ttl]
    return min(times, default=float("inf"))


def collisions(me: Member, records: Iterable[Member], since: float) -> list[Member]:
    """Other processes (another identity) using this node's name that beat after `since` (this
    node's first heartbeat, Redis time): alive together with it, not a predecessor it replaced."""
    return [m for m in records if m.name == me.name and m.identity != me.identity and m.beat > since]


def describe(members: Iterable[Member], me: Member, now: float, processes: dict[str, int] | None = None) -> list[dict]:
    """The members for /status: address, version, age of the last heartbeat, and how many
    processes (workers) of each beat within the ttl (`processes`, by name; 1 when unknown)."""
    processes = processes or {}
    return [{"name": m.name, "address": f"{m.host}:{m.port}", "version": m.version, "self": m is me,
             "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(m.started)) if m.started else None,
             "last_beat_age": 0.0 if m is me else round(max(0.0, now - m.beat), 3),
             "processes": max(1, processes.get(m.name, 1))} for m in members]


def processes(view: View, ttl: float, mono: float) -> dict[str, int]:
    """Live member records by node name: a node of N workers keeps N (one member, N processes)."""
    now = view.now(mono)
    return dict(Counter(m.name for m in view.records if now - m.beat < ttl))


def format_cluster(part: dict) -> str:
    """What `edge status --cluster` prints: the node, Redis, then one line a member."""
    state = "connected" if part["connected"] else f"unreachable for {part['down_for']:.0f} s"
    lines = [f"cluster node {part['node']}, redis {part['redis']}: {state}"]
    for m in part["members"]:
        age = "this node" if m["self"] else f"last beat {m['last_beat_age']:.1f} s ago"
        workers = f" ({m['processes']} processes)" if m.get("processes", 1) > 1 else ""
        lines.append(f"  {m['name']} {m['address']} {m['version']}{workers}: {age}")
    for c in part.get("collisions", []):
        lines.append(f"  NAME COLLISION: {c}")
    p = part["purges"]
    lines.append(f"purges sent {p['sent']}, applied {p['applied']}, waiting to be sent {p['pending']}, "
                 f"resynchronised {p['resyncs']}, memory emptied {p['emptied']}")
    return "\n".join(lines)
