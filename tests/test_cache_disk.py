"""The cache's disk tier: the stored record, the chunked writer, and the tier through real edges
(in this process and as `edge run -c` subprocesses sharing the directory) and real origins."""

from __future__ import annotations

import dataclasses
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import diskcache
import httpx
import pytest

from addons.cache import Cache
from addons.cache.disk import ENTRY_FIELDS, DiskStore, TieredStore, decode_head, encode_head, make_entry
from addons.cache.policy import ResponseRules
from addons.cache.store import Entry, Store
from addons.config import ConfigError, DiskCacheConfig, parse_config
from tests.conftest import free_port, wait_for_port

BIN = Path(sys.executable).parent
HOST = {"Host": "shop.example"}          # one public URL, whichever edge process answers
SMALL = os.urandom(1000)                 # fits in memory (max_object 4KB)
LARGE = os.urandom(200_000)              # disk only


def entry(body=b"body", vary=None, selected=(), headers=None, time_=1_700_000_000.0) -> Entry:
    fields = [(b"Content-Type", b"text/plain"), (b"X-Odd", b"caf\xe9 \xff"), (b"Cache-Control", b"max-age=60")]
    if vary:
        fields.append((b"Vary", vary.encode()))
    hmap = {k.decode().lower(): v.decode("utf-8", "surrogateescape") for k, v in fields}
    hmap.update(headers or {})
    return Entry(200, b"OK", tuple(fields), hmap, body, time_ - 1, time_,
                 ResponseRules({"max-age": "60", "no-cache": None}, False), 60.0, selected)


def store_at(path, max_size=4 * 2**20, max_object=2**20) -> DiskStore:
    return DiskStore(DiskCacheConfig(str(path), max_size, max_object))


def stored_bytes(path) -> int:
    """What the directory holds: value files and the index (the WAL is the index's journal)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*")
               if p.is_file() and not p.name.endswith(("-wal", "-shm")))


def value_files(path) -> list[Path]:
    return sorted(Path(path).rglob("*.val"))


# -- the record and the writer ------------------------------------------------------------------

def test_the_record_round_trips_every_field_the_cache_needs():
    e = entry(b"x" * 10, vary="Accept-Language", selected=(("accept-language", "fr"),),
              headers={"age": "30", "etag": '"e1"'})
    value = e.body + encode_head("http://shop.example/a", e, len(e.body))
    head, length = decode_head(value)
    back = make_entry(head, value[:len(e.body)])
    assert back == e and back.initial_age == e.initial_age >= 30 and back.vary == ("accept-language",)
    assert head["url"] == "http://shop.example/a"
    # a new Entry field must be taught to the record: the list names them all
    assert tuple(f.name for f in dataclasses.fields(Entry)) == ENTRY_FIELDS


@pytest.mark.parametrize("damage", [lambda v: v[:-1], lambda v: v[:-20] + v[-19:], lambda v: v + b"x",
                                    lambda v: b"", lambda v: v[:len(v) // 2]])
def test_a_damaged_record_is_refused(damage):
    e = entry()
    value = damage(e.body + encode_head("k", e, len(e.body)))
    with pytest.raises((ValueError, KeyError, UnicodeError)):
        head, length = decode_head(value)
        make_entry(head, value[:len(value) - length - 16])


def test_the_writer_commits_chunks_and_aborts_cleanly(tmp_path):
    disk = store_at(tmp_path, max_object=300_000)
    w = disk.writer("http://a/big")
    for i in range(10):
        assert w.write(bytes([i]) * 25_000)
    assert w.commit(entry(b""))
    got, known = disk.lookup("http://a/big", {})
    assert known and got.body == b"".join(bytes([i]) * 25_000 for i in range(10))
    assert len(value_files(tmp_path)) == 1

    w = disk.writer("http://a/aborted")
    assert w.write(b"partial" * 10_000)
    w.abort()
    assert not w.commit(entry(b"")) and disk.lookup("http://a/aborted", {}) == (None, False)

    w = disk.writer("http://a/huge")                        # past max_object: aborted by itself
    assert w.write(b"x" * 200_000) and not w.write(b"x" * 200_000)
    assert not w.commit(entry(b"")) and disk.lookup("http://a/huge", {}) == (None, False)
    assert os.listdir(disk.spool) == [] and len(value_files(tmp_path)) == 1


def test_a_writer_left_uncommitted_is_aborted(tmp_path):
    disk = store_at(tmp_path)
    with pytest.raises(ConnectionResetError):
        with disk.writer("http://a/cut") as w:
            w.write(b"x" * 50_000)
            raise ConnectionResetError("the origin went away mid-body")
    with disk.writer("http://a/whole") as w:
        w.write(b"y" * 50_000)
        assert w.commit(entry(b""))
    assert os.listdir(disk.spool) == [] and disk.lookup("http://a/cut", {}) == (None, False)
    assert disk.lookup("http://a/whole", {})[0].body == b"y" * 50_000


CHILD = """
import sys
from tests.test_cache_disk import entry, store_at
disk = store_at(sys.argv[1], max_size=16 * 2**20)
print(sum(disk.put(f"http://child/{i}", entry(bytes([i]) * 40_000)) for i in range(40)))
"""


def test_two_processes_write_and_read_one_directory_at_once(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).parent.parent, env={**os.environ, "PYTHONPATH": "."})
    disk = store_at(tmp_path, max_size=16 * 2**20)
    mine = 0
    for i in range(40):                  # reading the other process's rows while both write
        mine += disk.put(f"http://parent/{i}", entry(bytes([i]) * 40_000))
        got, _ = disk.lookup(f"http://child/{i}", {})
        assert got is None or got.body == bytes([i]) * 40_000
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0 and out.strip() == "40" and mine == 40
    for who in ("child", "parent"):
        for i in range(40):
            assert disk.lookup(f"http://{who}/{i}", {})[0].body == bytes([i]) * 40_000
    assert len(value_files(tmp_path)) == 80


def test_vary_selections_and_a_changed_vary(tmp_path):
    disk = store_at(tmp_path)
    for lang in ("fr", "de"):
        assert disk.put("http://a/p", entry(lang.encode() * 20_000, "Accept-Language", (("accept-language", lang),)))
    assert disk.lookup("http://a/p", {"accept-language": "de"})[0].body == b"de" * 20_000
    assert disk.lookup("http://a/p", {"accept-language": "fr"})[0].body == b"fr" * 20_000
    assert disk.lookup("http://a/p", {"accept-language": "it"}) == (None, True)
    assert disk.put("http://a/p", entry(b"plain"))           # no Vary now: the old selections go
    assert disk.lookup("http://a/p", {"accept-language": "fr"})[0].body == b"plain"
    assert len(value_files(tmp_path)) == 0                  # both large variants removed, "plain" inline


def test_rows_the_edge_did_not_write_are_never_unpickled(tmp_path):
    disk = store_at(tmp_path)
    assert disk.put("http://a/p", entry())
    foreign = diskcache.Cache(str(tmp_path))
    foreign.set("e http://a/p\n[]", Tripwire())             # a pickle where a record belongs
    Tripwire.fired = False
    assert disk.lookup("http://a/p", {}) == (None, True) and not Tripwire.fired
    foreign.set("e http://a/q\n[]", b"garbage bytes")
    foreign.set("u http://a/q", "[]")
    assert disk.lookup("http://a/q", {}) == (None, True)
    assert "e http://a/q\n[]" not in foreign                # a broken record is dropped


class Tripwire:
    fired = False

    def __reduce__(self):
        return (_fire, ())


def _fire():
    Tripwire.fired = True
    return "unpickled"


def test_memory_in_front_of_disk(tmp_path):
    tiers = TieredStore(Store(2**20, 4096), 4096, store_at(tmp_path))
    assert tiers.put("http://a/small", entry(SMALL)) and tiers.put("http://a/large", entry(LARGE))
    assert tiers.memory.lookup("http://a/small", {})[0] is not None     # small: both tiers
    assert tiers.memory.lookup("http://a/large", {}) == (None, False)   # large: disk only
    fresh = TieredStore(Store(2**20, 4096), 4096, store_at(tmp_path))  # another process, or a restart
    assert fresh.lookup("http://a/small", {})[0].body == SMALL
    assert fresh.memory.lookup("http://a/small", {})[0].body == SMALL   # promoted
    large = fresh.lookup("http://a/large", {})[0]           # too large for memory: left in its file
    assert large.body == b"" and large.length == len(LARGE) and large.file.read(0, 2 * len(LARGE)) == LARGE
    large.file.close()
    assert large.file.file.closed
    assert fresh.remove("http://a/small") and tiers.disk.lookup("http://a/small", {}) == (None, False)
    assert fresh.clear() == 1 and tiers.lookup("http://a/large", {}) == (None, False)
    assert set(fresh.tiers) == {"memory", "disk"}


def test_a_removal_in_one_process_reaches_the_memory_of_the_others(tmp_path):
    here, there = (TieredStore(Store(2**20, 4096), 4096, store_at(tmp_path)) for _ in range(2))
    for key in ("http://a/1", "http://a/2", "http://a/3"):
        assert here.put(key, entry(SMALL))
        assert there.lookup(key, {})[0] is not None and there.memory.lookup(key, {})[0] is not None
    assert here.remove("http://a/1")
    assert there.lookup("http://a/1", {}) == (None, False)
    assert there.memory.lookup("http://a/2", {})[0] is not None          # only what was removed
    here.purged.MAX_LOG = 10                    # the next removal replaces the log: `there` starts over
    assert here.remove("http://a/2")
    assert there.lookup("http://a/3", {})[0] is not None                 # from disk again
    assert there.memory.lookup("http://a/2", {}) == (None, False)
    here.clear()
    assert there.lookup("http://a/3", {}) == (None, False) and there.memory.bytes == 0


def test_an_unopenable_directory_is_a_config_error(tmp_path):
    (tmp_path / "cache.db").write_bytes(b"not a database" * 100)
    config = parse_config(f"pools: {{a: {{origins: ['http://127.0.0.1:1']}}}}\ncache: {{disk: {{path: {tmp_path}}}}}\n",
                          "edge.yaml")
    with pytest.raises(ConfigError, match="edge.yaml: cache.disk.path: cannot open the disk cache"):
        Cache().apply(config)


@pytest.mark.parametrize("disk, where, problem", [
    ("{path: /etc/passwd/sub}", "cache.disk.path", "not a directory"),
    ("{path: ''}", "cache.disk.path", "expected the directory"),
    ("{max_size: 2MB}", "cache.disk.path", "expected the directory"),
    ("{path: DIR, max_size: 100KB}", "cache.disk.max_size", "at least 1MB"),
    ("{path: DIR, max_size: 2MB, max_object: 3MB}", "cache.disk.max_object", "not be larger than cache.disk.max_size"),
    ("{path: DIR, max_size: lots}", "cache.disk.max_size", "expected a size"),
    ("{path: DIR, ttl: 1}", "cache.disk.ttl", "unknown key"),
])
def test_config_errors_name_file_line_and_key(tmp_path, disk, where, problem):
    text = f"pools: {{a: {{origins: ['http://127.0.0.1:1']}}}}\ncache:\n  max_size: 1MB\n  disk: {disk}\n"
    with pytest.raises(ConfigError) as e:
        parse_config(text.replace("DIR", str(tmp_path)), "edge.yaml")
    assert str(e.value).startswith(f"edge.yaml:4: {where}: ") and problem in str(e.value)


def test_config_defaults(tmp_path):
    c = parse_config(f"pools: {{a: {{origins: ['http://127.0.0.1:1']}}}}\ncache: {{disk: {{path: {tmp_path}/new}}}}\n")
    assert c.cache.disk == DiskCacheConfig(f"{tmp_path}/new", 10 * 2**30, 2**30)
    assert parse_config("pools: {a: {origins: ['http://127.0.0.1:1']}}\n").cache.disk is None


# -- through real edges ----------------------------------------------------------------------------

def site_config(o, folder, disk_size="4MB", disk_object="1MB") -> str:
    return (f"pools: {{eu: {{origins: [{o.url}]}}}}\n"
            f"cache: {{max_size: 1MB, max_object: 4KB, disk: {{path: {folder}, max_size: {disk_size}, "
            f"max_object: {disk_object}}}}}\n")


@pytest.fixture
def pages():
    return {
        "/large": lambda req, o: (200, [("Cache-Control", "max-age=600"), ("Age", "40")], LARGE),
        "/small": lambda req, o: (200, [("Cache-Control", "max-age=600")], SMALL),
        "/lang": lambda req, o: (200, [("Cache-Control", "max-age=600"), ("Vary", "Accept-Language")],
                                 req.headers.get("accept-language", "").encode() * 50_000),
        "/toolarge": lambda req, o: (200, [("Cache-Control", "max-age=600")], b"t" * 1_100_000),
        **{f"/fill{i}": (lambda i: lambda req, o: (200, [("Cache-Control", "max-age=600")],
                                                   bytes([i]) * 300_000))(i) for i in range(16)},
    }


def count(o, path) -> int:
    return sum(1 for s in o.seen if s.path == path)


class EdgeProcess:
    """`edge run -c FILE` as its own process, on a port of its own."""

    def __init__(self, tmp_path: Path, config_text: str) -> None:
        self.port = free_port()
        cfg = tmp_path / f"edge-{self.port}.yaml"
        cfg.write_text(config_text + f"listen: 127.0.0.1:{self.port}\n")
        self.proc = subprocess.Popen([BIN / "edge", "run", "-c", str(cfg), "--confdir", str(tmp_path / "conf")],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_port(self.port, self.proc)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=15)
        assert self.proc.returncode == 0, err
        return err


def test_an_object_over_the_memory_limit_is_a_disk_hit(origin, edge, tmp_path, pages):
    o = origin("eu", pages=pages)
    e = edge(site_config(o, tmp_path / "cache"))
    with httpx.Client(base_url=e.url, headers=HOST) as c:
        first, second = c.get("/large"), c.get("/large")
        ranged = c.get("/large", headers={"Range": "bytes=10-19"})
        assert c.get("/toolarge").status_code == 200 and c.get("/toolarge").status_code == 200
    assert first.content == second.content == LARGE and ranged.content == LARGE[10:20]
    assert "fwd=uri-miss" in first.headers["cache-status"] and "stored" in first.headers["cache-status"]
    assert second.headers["cache-status"].startswith("edge; hit") and ranged.status_code == 206
    assert count(o, "/large") == 1 and count(o, "/toolarge") == 2       # past disk.max_object: not stored
    chain = e.master.addons.get("edge")
    assert chain.cache.store.memory.lookup("http://shop.example/large", {}) == (None, False)
    tiers = {line.split('"')[1]: float(line.split()[1]) for line in chain.metrics().splitlines()
             if line.startswith("edge_cache_tier_bytes{")}
    assert tiers["disk"] > len(LARGE) and tiers["memory"] == 0


def test_vary_variants_on_disk(origin, edge, tmp_path, pages):
    o = origin("eu", pages=pages)
    e = edge(site_config(o, tmp_path / "cache"))
    with httpx.Client(base_url=e.url, headers=HOST) as c:
        for lang in ("fr", "de", "fr", "de"):
            r = c.get("/lang", headers={"Accept-Language": lang})
            assert r.content == lang.encode() * 50_000
    assert count(o, "/lang") == 2


def test_the_byte_bound_holds(origin, edge, tmp_path, pages):
    o = origin("eu", pages=pages)
    folder = tmp_path / "cache"
    e = edge(site_config(o, folder, disk_size="2MB"))
    with httpx.Client(base_url=e.url, headers=HOST) as c:
        for i in range(16):                                    # 4.8 MB through a 2 MB directory
            assert c.get(f"/fill{i}").content == bytes([i]) * 300_000
            assert stored_bytes(folder) <= 2 * 2**20
        assert c.get("/fill15").status_code == 200 and count(o, "/fill15") == 1   # the latest kept
        assert c.get("/fill0").status_code == 200 and count(o, "/fill0") == 2     # the oldest evicted
    assert 3 <= len(value_files(folder)) <= 6


def test_a_restart_keeps_entries_and_their_age(origin, tmp_path, pages):
    o = origin("eu", pages=pages)
    text = site_config(o, tmp_path / "cache")
    first = EdgeProcess(tmp_path, text)
    try:
        r = httpx.get(f"{first.url}/large", headers=HOST)
        assert r.content == LARGE and r.headers["age"] == "40"
    finally:
        first.stop()
    second = EdgeProcess(tmp_path, text)
    try:
        r = httpx.get(f"{second.url}/large", headers=HOST)
    finally:
        second.stop()
    assert r.content == LARGE and r.headers["cache-status"].startswith("edge; hit") and count(o, "/large") == 1
    assert 40 <= int(r.headers["age"]) <= 40 + 60             # counted on from the stored wall-clock times


def test_two_processes_share_one_directory(origin, edge, tmp_path, pages):
    o = origin("eu", pages=pages)
    text = site_config(o, tmp_path / "cache")
    e = edge(text)
    other = EdgeProcess(tmp_path, text)
    try:
        assert httpx.get(f"{e.url}/large", headers=HOST).content == LARGE              # stored here
        r = httpx.get(f"{other.url}/large", headers=HOST)                             # a hit there
        assert r.content == LARGE and r.headers["cache-status"].startswith("edge; hit")
        assert httpx.get(f"{other.url}/small", headers=HOST).content == SMALL         # stored there
        r = httpx.get(f"{e.url}/small", headers=HOST)                                 # a hit here
        assert r.content == SMALL and r.headers["cache-status"].startswith("edge; hit")
        assert httpx.request("PURGE", f"{e.url}/small", headers=HOST).status_code == 200       # purged here
        assert httpx.get(f"{other.url}/small", headers=HOST).content == SMALL          # a miss there
        assert count(o, "/small") == 2
    finally:
        other.stop()
    assert count(o, "/large") == 1


def test_purge_removes_from_both_tiers(origin, edge, tmp_path, pages):
    o = origin("eu", pages=pages)
    folder = tmp_path / "cache"
    e = edge(site_config(o, folder))
    with httpx.Client(base_url=e.url, headers=HOST) as c:
        for path in ("/small", "/large", "/small", "/large"):
            c.get(path)
        assert count(o, "/small") == count(o, "/large") == 1
        assert c.request("PURGE", "/small").status_code == 200 and c.request("PURGE", "/large").status_code == 200
        assert c.request("PURGE", "/large").status_code == 404
        c.get("/small"), c.get("/large")
        assert count(o, "/small") == count(o, "/large") == 2
        assert e.master.commands.call("edge.purge", "*") == "purged 2 URLs"
        assert len(diskcache.Cache(str(folder))) == 0 and value_files(folder) == []
        c.get("/small"), c.get("/large")
    assert count(o, "/small") == count(o, "/large") == 3


def test_a_corrupt_or_unreadable_entry_is_a_miss(origin, edge, tmp_path, pages):
    o = origin("eu", pages=pages)
    folder = tmp_path / "cache"
    e = edge(site_config(o, folder))
    with httpx.Client(base_url=e.url, headers=HOST) as c:
        assert c.get("/large").content == LARGE
        (stored,) = value_files(folder)
        stored.write_bytes(stored.read_bytes()[:-5])          # truncated
        r = c.get("/large")
        assert r.content == LARGE and "fwd=uri-miss" not in r.headers["cache-status"]
        assert count(o, "/large") == 2                         # a miss, stored again
        (stored,) = value_files(folder)
        stored.unlink()
        stored.mkdir()                                         # cannot be read as a file
        assert c.get("/large").content == LARGE and count(o, "/large") == 3
        assert c.get("/large").content == LARGE and count(o, "/large") == 3   # and a hit once more
        assert c.get("/small").content == SMALL                # everyone else still served
