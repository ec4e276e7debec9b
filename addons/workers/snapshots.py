"""What each worker counted, summed for the whole machine: /status, `edge status` and /metrics
answer the same from whichever worker the kernel handed the admin connection to.

Each worker writes a snapshot of itself (its metrics registry's samples, its status, its load)
to EDGE_RUNTIME_DIR/worker-PID.json every INTERVAL seconds, atomically (a temporary file
renamed into place); the worker answering an admin request reads the others' and adds its own,
taken at that moment. Not prometheus-client's multiprocess mode: it is switched on for the whole
process by an environment variable read when metrics are made, keeps no registry of its own
(the edge has one registry per edge, and tests run several edges in one process), and needs
every gauge's aggregation declared where it is made and dead processes' files removed by hand;
a JSON file per worker is plain, bounded by the labels the edge allows, and read only when asked.

Counters and histogram buckets are summed. Gauges are summed where they are amounts (requests
in flight, connections, memory-tier bytes), taken once where the workers share the thing (the
disk tier's bytes), and kept per worker with a `worker` label where each worker has its own
view (an origin's availability and weight). A dead worker (its pid gone or a zombie, or no
snapshot for RETIRE_AFTER) is retired: its counters are added, under a lock, into retired.json
and its snapshot removed, so machine-wide counters never go down when a worker dies and its
replacement starts from zero (a decrease would read to Prometheus as a reset, and rate() would
count the whole total again); its gauges go with it. Snapshots of another run (another
supervisor: the parent pid) are removed, not counted: a new run starts from zero, which
Prometheus takes for the restart it is. Pure but for the files; no mitmproxy."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator

INTERVAL = 1.0          # seconds between a worker's snapshots
STALE_AFTER = 10.0      # an older snapshot of a live worker: stuck, its gauges are not counted
RETIRE_AFTER = 120.0    # older still: its pid was taken by another process, the worker is gone
PREFIX, SUFFIX = "worker-", ".json"
RETIRED = "retired.json"
LOCK = "snapshots.lock"
LOCK_WAIT = 0.2         # seconds a reader waits for the lock before reading without it
MAX_GONE = 1024         # identities of retired workers remembered (a late snapshot of one is ignored)
SUMMED = ("counter", "histogram", "summary")
PER_WORKER = frozenset({"edge_origin_available", "edge_origin_weight"})


def identity(record: dict) -> str:
    return f"{record['pid']}@{record['started']}"


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (a dead worker its supervisor has not reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


# -- merging (pure) -------------------------------------------------------------------------------------

def _sample_key(name: str, labels: dict) -> tuple:
    return name, tuple(sorted(labels.items()))


def add_counters(into: list[dict], families: list[dict]) -> list[dict]:
    """`into` plus the counters and histograms of `families` (both in snapshot form: name,
    type, help, samples [[name, labels, value]]), gauges left out; a new list."""
    merged = {f["name"]: {**f, "samples": {_sample_key(n, l): [n, l, v] for n, l, v in f["samples"]}} for f in into}
    for family in families:
        if family["type"] not in SUMMED:
            continue
        target = merged.setdefault(family["name"], {**family, "samples": {}})
        for name, labels, value in family["samples"]:
            key = _sample_key(name, labels)
            if key in target["samples"]:
                target["samples"][key][2] += value
            else:
                target["samples"][key] = [name, labels, value]
    return [{**f, "samples": list(f["samples"].values())} for f in merged.values()]


def merge_metrics(records: list[dict], retired: list[dict], now: float) -> list[dict]:
    """The machine's families: counters summed over the live workers and the retired ones;
    gauges of the workers whose snapshot is fresh, by the rule of each (module docstring)."""
    families: dict[str, dict] = {}
    samples: dict[str, dict[tuple, list]] = {}

    def add(family: dict, name: str, labels: dict, value: float, how: str) -> None:
        families.setdefault(family["name"], {"name": family["name"], "type": family["type"], "help": family["help"]})
        into = samples.setdefault(family["name"], {})
        key = _sample_key(name, labels)
        if key not in into:
            into[key] = [name, labels, value]
        elif how == "max":
            into[key][2] = max(into[key][2], value)
        else:
            into[key][2] += value

    for family in retired:
        for name, labels, value in family["samples"]:
            add(family, name, labels, value, "sum")
    for record in records:
        fresh = now - record["at"] <= STALE_AFTER
        for family in record["metrics"]:
            gauge = family["type"] not in SUMMED
            if gauge and not fresh:
                continue
            for name, labels, value in family["samples"]:
                how = "sum"
                if gauge and family["name"] in PER_WORKER:
                    labels = {**labels, "worker": str(record["index"])}
                elif gauge and family["name"] == "edge_cache_tier_bytes" and labels.get("tier") == "disk":
                    how = "max"                     # one directory, seen by every worker
                add(family, name, labels, value, how)
    if "edge_cache_bytes" in families and "edge_cache_tier_bytes" in samples:     # memory summed, disk once
        samples["edge_cache_bytes"] = {_sample_key("edge_cache_bytes", {}): [
            "edge_cache_bytes", {}, sum(s[2] for s in samples["edge_cache_tier_bytes"].values())]}
    return [{**f, "samples": list(samples.get(name, {}).values())} for name, f in families.items()]


PURGE_COUNTS = ("sent", "applied", "resyncs", "emptied")      # the cluster's purge counters (addons/cluster)


def status_counters(status: dict) -> dict:
    """The counting parts of a worker's /status: what the shield refused, site requests, the
    cluster's purges (each worker has its own Redis link)."""
    purges = status.get("cluster", {}).get("purges", {})
    return {"shield": dict(status.get("shield", {})),
            "sites": {name: site["requests"] for name, site in status.get("sites", {}).items()},
            "misdirected": status.get("misdirected", 0), "route_rate_refusals": status.get("route_rate_refusals", 0),
            "purges": {k: purges[k] for k in PURGE_COUNTS if k in purges}}


def add_status_counters(into: dict, more: dict) -> dict:
    out = {"shield": dict(into.get("shield", {})), "sites": dict(into.get("sites", {})),
           "purges": dict(into.get("purges", {})),
           "misdirected": into.get("misdirected", 0) + more["misdirected"],
           "route_rate_refusals": into.get("route_rate_refusals", 0) + more["route_rate_refusals"]}
    for part in ("shield", "sites", "purges"):
        for k, n in more.get(part, {}).items():
            out[part][k] = out[part].get(k, 0) + n
    return out


def merge_status(own: dict, others: list[dict], retired: dict, now: float) -> dict:
    """The answering worker's status (`own`, a record: its pools, their health, its config's
    sites) with the machine's counts: refusals and site requests summed over every worker
    (the retired too), requests in flight over the live ones; and `workers`, one line each."""
    status = json.loads(json.dumps(own["status"]))          # a copy the sums may change
    records = [own, *others]
    counts = retired or {}
    for record in records:
        counts = add_status_counters(counts, status_counters(record["status"]))
    if "shield" in status:
        status["shield"] = counts["shield"]
    for name, site in status.get("sites", {}).items():
        site["requests"] = counts["sites"].get(name, 0)
    for key in ("misdirected", "route_rate_refusals"):
        if key in status:
            status[key] = counts[key]
    if "purges" in status.get("cluster", {}):           # counters summed; removals waiting: the live ones'
        pending = sum(r["status"].get("cluster", {}).get("purges", {}).get("pending", 0) for r in records
                      if now - r["at"] <= STALE_AFTER)
        status["cluster"]["purges"] = {**counts["purges"], "pending": pending}
    in_flight: dict[tuple[str, str], int] = {}
    for record in records:
        if now - record["at"] <= STALE_AFTER:
            for pool, body in record["status"].get("pools", {}).items():
                for o in body["origins"]:
                    in_flight[(pool, o["url"])] = in_flight.get((pool, o["url"]), 0) + o["in_flight"]
    for pool, body in status.get("pools", {}).items():
        for o in body["origins"]:
            o["in_flight"] = in_flight.get((pool, o["url"]), 0)
    status["workers"] = sorted((worker_line(r, now) for r in records), key=lambda w: (w["index"], w["pid"]))
    return status


def worker_line(record: dict, now: float) -> dict:
    return {"index": record["index"], "pid": record["pid"], "uptime": round(now - record["started"], 1),
            "in_flight": record["in_flight"], "connections": record["connections"],
            "health_checks": record["health_checks"], "snapshot_age": round(max(0.0, now - record["at"]), 1),
            "stale": now - record["at"] > STALE_AFTER}


# -- the files ---------------------------------------------------------------------------------------------

def snapshot_path(folder: str, pid: int) -> str:
    return os.path.join(folder, f"{PREFIX}{pid}{SUFFIX}")


def write_atomically(path: str, data: bytes) -> None:
    """Readers see the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_snapshot(folder: str, record: dict) -> None:
    write_atomically(snapshot_path(folder, record["pid"]), json.dumps(record, separators=(",", ":")).encode())


@contextlib.contextmanager
def _locked(folder: str, wait: float = LOCK_WAIT) -> Iterator[bool]:
    """One worker at a time reads the snapshots and retires the dead: a reader never sees a
    dead worker's counters both in its snapshot and in retired.json, nor in neither. Held for
    a few milliseconds; a worker stuck while holding it (stopped, swapping) must not stall the
    others' event loops: after `wait` seconds they read without it (True: locked) and retire
    nobody (retiring is what needs the lock)."""
    fd = os.open(os.path.join(folder, LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.002)
        yield True
    finally:
        os.close(fd)            # releases the lock


def _load(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _empty_retired(run: int) -> dict:
    return {"run": run, "metrics": [], "status": {}, "gone": []}


def gather(folder: str, own: dict, now: float, alive: Callable[[int], bool] = pid_alive) -> tuple[list[dict], dict]:
    """The other workers' snapshots of this run (`own["run"]`), and the retired counters
    (metrics: families, status: status_counters), after retiring the workers that are gone."""
    others: list[dict] = []
    with _locked(folder) as locked:
        retired_path = os.path.join(folder, RETIRED)
        retired = _load(retired_path)
        if retired is None or retired.get("run") != own["run"]:
            retired = _empty_retired(own["run"])
        changed = False
        for name in os.listdir(folder):
            if not (name.startswith(PREFIX) and name.endswith(SUFFIX)):
                continue
            path = os.path.join(folder, name)
            record = _load(path)
            if record is not None and record.get("pid") == own["pid"] and identity(record) == identity(own):
                continue                            # its own: `own` is newer
            if record is None or record.get("run") != own["run"] or identity(record) in retired["gone"]:
                if locked:
                    _remove(path)                   # unreadable, another run's, or counted already
                continue
            gone = record["pid"] == own["pid"] or not alive(record["pid"]) or now - record["at"] > RETIRE_AFTER
            if gone and not locked:
                others.append(record)               # counted as if alive until it can be retired
                continue
            if gone:
                retired["metrics"] = add_counters(retired["metrics"], record["metrics"])
                retired["status"] = add_status_counters(retired["status"], status_counters(record["status"]))
                retired["gone"] = [*retired["gone"], identity(record)][-MAX_GONE:]
                changed = True
                _remove(path)
                continue
            others.append(record)
        if changed:
            write_atomically(retired_path, json.dumps(retired, separators=(",", ":")).encode())
    return others, retired


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
