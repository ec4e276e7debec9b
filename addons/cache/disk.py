"""The cache's disk tier, and the two tiers together.

The index is diskcache (SQLite in WAL mode, values as files): it is safe for several edge
processes on one machine to share a directory (SQLite's locking, files renamed into place),
it bounds the directory in bytes with least-recently-used eviction, and it survives restarts.
LMDB was the alternative: a faster index, but a fixed-size memory map, no byte bound or
eviction of its own and values inside the map rather than as files; diskcache gives all three.

One stored response is one diskcache row (so it is evicted whole), keyed by URL and Vary
selection and tagged with the URL (a purge drops every variant); a second small row per URL
names the request headers its responses vary on. The row's value is the body followed by the
head (an explicit JSON record: status, fields, the parsed header map, rules, lifetime, times,
selection) and a fixed trailer, so a truncated or altered value is detected and answered as a
miss; the body is the value's first bytes, so a later step can stream it from the file. Nothing
is unpickled: rows this module did not write (pickle or text modes) are refused.

The directory is the operator's: it must be writable by the edge's user only, as anything that
can write it decides what the edge serves.

A hit on a body larger than the memory tier takes is not read: the entry carries the open
file (FileBody) and the cache serves it from there. `BodyWriter` is the write path for a body
that arrives in chunks (stored while it streams past); readers may follow it as it grows. A
put of a small body runs on the event loop; copying a file body (a 304's refresh of a large
object) is for a thread (`put` is thread-safe: diskcache is)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import struct
import tempfile
import time
from collections.abc import Mapping
from typing import BinaryIO

import diskcache
import diskcache.core

from addons.cache.policy import ResponseRules, selection
from addons.cache.store import Entry, FileBody, Store
from addons.config import CacheConfig, DiskCacheConfig
from addons.tasks import Throttle

logger = logging.getLogger("edge")
TRAILER = struct.Struct(">Q8s")          # the head's length, then the format's mark
MARK = b"edgec1\r\n"
MAX_HEAD = 1 << 20                       # a longer head is not one this module wrote
SPOOL = "edge-spool"                     # bodies being written, renamed into the index on commit
PURGE_LOG = "edge-purged.log"            # removals, for the other processes' memory tiers
STALE_SPOOL = 86400.0                    # spool files older than this were left by a crash
LOCK_TIMEOUT = 1.0                       # seconds to wait for another process's write lock
INLINE = 2**15                           # smaller values live in the SQLite index itself
# what a broken, locked or altered directory raises: each is a miss, never an error page
FAILURES = (diskcache.Timeout, sqlite3.Error, OSError, ValueError, KeyError, TypeError, OverflowError)
# the Entry fields the record keeps (initial_age and vary are recomputed from them, file is
# where the body was read from): a new
# Entry field must be added to encode_head and make_entry (a test compares the lists)
ENTRY_FIELDS = ("status", "reason", "fields", "headers", "body", "request_time", "response_time", "rules",
                "lifetime", "selected_by", "initial_age", "vary", "file")


# -- the stored record ----------------------------------------------------------------------------

def encode_head(url: str, entry: Entry, body_length: int) -> bytes:
    """Everything the cache needs of an entry but its body, and the trailer that ends the value."""
    head = json.dumps({
        "url": url, "status": entry.status, "reason": entry.reason.decode("latin-1"),
        "fields": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in entry.fields],
        "headers": entry.headers, "request_time": entry.request_time, "response_time": entry.response_time,
        "rules": {"cc": entry.rules.cc, "targeted": entry.rules.targeted}, "lifetime": entry.lifetime,
        "selected_by": entry.selected_by, "body_length": body_length,
    }).encode("ascii")          # ensure_ascii: header values with undecodable bytes survive escaped
    return head + TRAILER.pack(len(head), MARK)


def _tuple(value) -> tuple | None:
    return None if value is None else tuple(tuple(pair) for pair in value)


def decode_head(tail: bytes) -> tuple[dict, int]:
    """The head record from the value's last bytes (at least the trailer and the head), and the
    head's length. Raises ValueError for anything this module did not write."""
    if len(tail) < TRAILER.size:
        raise ValueError("value shorter than its trailer")
    length, mark = TRAILER.unpack(tail[-TRAILER.size:])
    if mark != MARK or length > MAX_HEAD or length > len(tail) - TRAILER.size:
        raise ValueError("not an edge cache record")
    head = json.loads(tail[-TRAILER.size - length:-TRAILER.size])
    if not isinstance(head, dict):
        raise ValueError("not an edge cache record")
    return head, length


def make_entry(head: dict, body: bytes | FileBody) -> Entry:
    """The entry of a head record; `body` its bytes or its file."""
    cc = head["rules"]["cc"]
    length = body.length if isinstance(body, FileBody) else len(body)
    if not isinstance(cc, dict) or length != head["body_length"]:
        raise ValueError("inconsistent edge cache record")
    entry = Entry(int(head["status"]), head["reason"].encode("latin-1"),
                  tuple((k.encode("latin-1"), v.encode("latin-1")) for k, v in head["fields"]),
                  {str(k): str(v) for k, v in head["headers"].items()}, b"" if isinstance(body, FileBody) else body,
                  float(head["request_time"]), float(head["response_time"]),
                  ResponseRules(cc, bool(head["rules"]["targeted"])), float(head["lifetime"]),
                  _tuple(head["selected_by"]))
    entry.file = body if isinstance(body, FileBody) else None
    return entry


def read_value(value: bytes | BinaryIO) -> tuple[dict, int, BinaryIO | bytes]:
    """(head, body length, source): the source is the bytes or the open file positioned at 0."""
    if isinstance(value, bytes):
        head, length = decode_head(value)
        return head, len(value) - TRAILER.size - length, value
    size = value.seek(0, os.SEEK_END)
    value.seek(max(0, size - TRAILER.size))
    length, _ = TRAILER.unpack(value.read(TRAILER.size)) if size >= TRAILER.size else (0, b"")
    if length > min(MAX_HEAD, size - TRAILER.size):
        raise ValueError("not an edge cache record")
    value.seek(size - TRAILER.size - length)
    head, _ = decode_head(value.read())
    value.seek(0)
    return head, size - TRAILER.size - length, value


# -- diskcache glue ---------------------------------------------------------------------------------

class _Spooled:
    """A finished value file in the spool folder, moved into the index instead of copied."""

    def __init__(self, path: str, size: int) -> None:
        self.path, self.size = path, size


class _BodyDisk(diskcache.Disk):
    """diskcache's Disk, renaming spooled files into place and refusing what this module never
    writes (pickles would run code from the directory)."""

    def store(self, value, read, key=diskcache.core.UNKNOWN):
        if not isinstance(value, _Spooled):
            return super().store(value, read, key)
        filename, full_path = self.filename(key, value)
        for attempt in range(3):    # another process may remove an empty sub-folder meanwhile
            os.makedirs(os.path.dirname(full_path), exist_ok=True)
            try:
                os.replace(value.path, full_path)
                break
            except FileNotFoundError:
                if attempt == 2 or not os.path.exists(value.path):
                    raise
        return value.size, diskcache.core.MODE_BINARY, filename, None

    def get(self, key, raw):
        return super().get(key, raw) if raw else None      # keys are always strings here

    def fetch(self, mode, filename, value, read):
        if mode not in (diskcache.core.MODE_RAW, diskcache.core.MODE_BINARY):
            raise OSError("a cache row the edge did not write")
        return super().fetch(mode, filename, value, read)


class _Index(diskcache.Cache):
    """diskcache's Cache with a finer cull: its own cull() deletes ten rows a step, which
    empties a small cache of large objects; this one deletes the least recently used row at a
    time (diskcache's policy query and transaction, so pinned to 5.6 in pyproject.toml)."""

    def cull_one_by_one(self) -> int:
        select = diskcache.core.EVICTION_POLICY[self.eviction_policy]["cull"]
        removed = 0
        while self.volume() > self.size_limit:
            with self._transact() as (sql, cleanup):
                rows = sql(select.format(fields="rowid, filename", now=time.time()), (1,)).fetchall()
                if not rows:
                    break
                sql("DELETE FROM Cache WHERE rowid = ?", (rows[0][0],))
                cleanup(rows[0][1])
                removed += 1
        return removed


def _url_row(url: str) -> str:
    return "u " + url


def _entry_row(url: str, selected_by) -> str:
    return "e " + url + "\n" + json.dumps(selected_by)


class DiskStore:
    """Stored responses in a directory, bounded in bytes (`max_size`, SQLite index included),
    least recently used evicted first. Any failure of the directory is a miss, logged."""

    def __init__(self, settings: DiskCacheConfig) -> None:
        self.settings = settings
        self.max_object = settings.max_object
        self.throttle = Throttle()          # a failing directory is reported once a minute
        self.spool = os.path.join(settings.path, SPOOL)
        os.makedirs(self.spool, exist_ok=True)
        self.index = _Index(settings.path, timeout=LOCK_TIMEOUT, disk=_BodyDisk,
                            size_limit=settings.max_size, eviction_policy="least-recently-used",
                            tag_index=True, cull_limit=0,    # culled by cull_one_by_one after a put
                            disk_min_file_size=INLINE)
        self._sweep_spool()

    @property
    def bytes(self) -> int:
        try:
            return int(self.index.volume())
        except FAILURES:
            return 0

    def close(self) -> None:
        self.index.close()

    def lookup(self, key: str, request: Mapping[str, str], whole_max: int | None = None) -> tuple[Entry | None, bool]:
        """`whole_max`: a longer body stays in its file (the entry's FileBody, for the caller to
        close); None reads every body."""
        try:
            with self.index.transact():     # one write (the access times) for both rows
                names = self.index.get(_url_row(key))
                if not isinstance(names, str):
                    return None, False
                row = _entry_row(key, selection(tuple(json.loads(names)), request))
                value = self.index.get(row, read=True)
        except FAILURES as e:
            self._failed("lookup", key, e)
            return None, False
        if value is None:
            return None, True
        kept = None
        try:
            head, length, source = read_value(value)
            if isinstance(source, bytes):
                body = source[:length]
            elif whole_max is not None and length > whole_max:
                body = kept = FileBody(source, length)
            else:
                body = source.read(length)
            entry = make_entry(head, body)
            if head["url"] != key or _entry_row(key, entry.selected_by) != row:
                raise ValueError("a record stored under another key")
            return entry, True
        except FAILURES as e:
            self._failed("read", key, e)
            self._drop(row)
            kept = None
            return None, True
        finally:
            if not isinstance(value, bytes) and kept is None:
                value.close()

    def put(self, key: str, entry: Entry) -> bool:
        """Store `entry`; one whose body is in a file (FileBody) has it copied, which takes
        as long as the body: call that from a thread."""
        if entry.length > self.max_object:
            return False
        if entry.file is None and len(entry.body) < INLINE:
            return self._commit(key, entry, entry.body + encode_head(key, entry, len(entry.body)))
        writer = self.writer(key)
        if writer is None:
            return False
        try:
            with writer:
                if entry.file is None:
                    return writer.write(entry.body) and writer.commit(entry)
                return writer.copy(entry.file) and writer.commit(entry)
        finally:
            writer.release()

    def writer(self, key: str) -> BodyWriter | None:
        try:
            return BodyWriter(self, key)
        except OSError as e:
            self._failed("spool", key, e)
            return None

    def remove(self, key: str) -> bool:
        try:
            return self.index.evict(key) > 0
        except FAILURES as e:
            self._failed("remove", key, e)
            return False

    def clear(self) -> int:
        """Empties the directory's index; answers how many URLs it held."""
        try:
            urls = sum(1 for k in self.index.iterkeys() if isinstance(k, str) and k.startswith("u "))
            self.index.clear()
            return urls
        except FAILURES as e:
            self._failed("clear", "*", e)
            return 0

    def _commit(self, key: str, entry: Entry, value: bytes | _Spooled) -> bool:
        vary = json.dumps(list(entry.vary))
        try:
            with self.index.transact():
                if self.index.get(_url_row(key)) not in (None, vary):
                    self.index.evict(key)   # a new Vary makes the old selections meaningless
                self.index.set(_url_row(key), vary, tag=key)
                self.index.set(_entry_row(key, entry.selected_by), value, tag=key)
            self.index.cull_one_by_one()
            return True
        except FAILURES as e:
            self._failed("store", key, e)
            return False
        finally:
            if isinstance(value, _Spooled) and os.path.exists(value.path):
                os.unlink(value.path)     # not moved into the index

    def _drop(self, row: str) -> None:
        try:
            self.index.delete(row)
        except FAILURES:
            pass

    def _sweep_spool(self) -> None:
        """Spool files left by a process that died writing them."""
        cutoff = time.time() - STALE_SPOOL
        for name in os.listdir(self.spool):
            path = os.path.join(self.spool, name)
            try:
                if os.stat(path).st_mtime < cutoff:
                    os.unlink(path)
            except OSError:
                pass

    def _failed(self, what: str, key: str, e: Exception) -> None:
        count = self.throttle.occurred(time.monotonic())
        if count:
            logger.warning("edge: disk cache %s of %s failed (%s: %s), %d failure%s since the last report; "
                           "answered as a miss", what, key, type(e).__name__, e, count, "" if count == 1 else "s")


class BodyWriter:
    """A body arriving in chunks on its way to the disk tier: written to a spool file in the
    cache directory, entered into the index by commit(entry) (the response's head, any body),
    thrown away by abort(), by a body past max_object, or by leaving its `with` block
    uncommitted. read() lets readers follow the body while it is written and after commit
    (through a descriptor of its own, valid after the file is renamed or evicted) until
    release()."""

    COPY_STEP = 2**22

    def __init__(self, disk: DiskStore, key: str) -> None:
        self.disk, self.key = disk, key
        fd, self.path = tempfile.mkstemp(dir=disk.spool, suffix=".part")
        self.file: BinaryIO | None = os.fdopen(fd, "wb", buffering=0)    # readers see each write
        self.length = 0
        self.reader: int | None = os.open(self.path, os.O_RDONLY)

    def read(self, offset: int, size: int) -> bytes:
        if self.reader is None:
            return b""
        return os.pread(self.reader, max(0, min(size, self.length - offset)), offset)

    def release(self) -> None:
        if self.reader is not None:
            os.close(self.reader)
            self.reader = None

    def copy(self, body: FileBody) -> bool:
        """Write a body that is in another file, a few MiB at a time."""
        offset = 0
        while offset < body.length:
            step = min(self.COPY_STEP, body.length - offset)
            chunk = body.read(offset, step)
            if not chunk or not self.write(chunk):
                self.abort()
                return False
            offset += len(chunk)
        return True

    def write(self, chunk: bytes) -> bool:
        """False once the body is too large or cannot be written: the writer is aborted."""
        if self.file is None:
            return False
        self.length += len(chunk)
        if self.length > self.disk.max_object:
            self.abort()
            return False
        try:
            self.file.write(chunk)
            return True
        except OSError as e:
            self.disk._failed("write", self.key, e)
            self.abort()
            return False

    def commit(self, entry: Entry) -> bool:
        """Stores the written body with `entry`'s head (its own body is not used)."""
        if self.file is None:
            return False
        try:
            self.file.write(encode_head(self.key, entry, self.length))
            self.file.close()
        except (OSError, ValueError, TypeError) as e:
            self.disk._failed("write", self.key, e)
            self.abort()
            return False
        self.file = None
        return self.disk._commit(self.key, entry, _Spooled(self.path, os.path.getsize(self.path)))

    def __enter__(self) -> BodyWriter:
        return self

    def __exit__(self, *exc) -> None:
        """Leaving the block without commit() (a truncated or failed response) aborts."""
        if self.file is not None:
            self.abort()

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        try:
            os.unlink(self.path)
        except OSError:
            pass


class PurgeLog:
    """The keys purged or invalidated by any process sharing the directory, so that each drops
    them from its own memory tier: one line appended per removal (`*`: everything), read from
    where this process left off on every lookup (one stat when nothing is new). Past MAX_LOG
    bytes the file is replaced by an empty one; a process that sees a new file clears its
    memory. The disk row is removed before the line is written, so a memory tier cleared
    late cannot be refilled with the removed entry. The workers of one machine share theirs in
    EDGE_RUNTIME_DIR, with or without a disk tier (make_store)."""

    MAX_LOG = 2**20

    def __init__(self, path: str) -> None:
        self.path = path
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))  # its inode tells a replaced log
        self.inode, self.offset = self._stat()      # what came before this process is not its concern

    def record(self, key: str) -> None:
        line = ("*" if "\n" in key else key).encode("utf-8", "surrogateescape") + b"\n"
        try:
            if self._stat()[1] > self.MAX_LOG:
                fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path))
                os.close(fd)
                os.replace(tmp, self.path)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)      # one write: lines of processes appending at once never mix
            finally:
                os.close(fd)
        except OSError as e:
            logger.warning("edge: disk cache purge log %s not written (%s): other processes may serve "
                           "%s from memory until it is evicted", self.path, e, key)

    def apply(self, memory: Store) -> None:
        """Drop from `memory` what the other processes removed since the last call."""
        inode, size = self._stat()
        if inode != self.inode:
            memory.clear()
            self.inode, self.offset = inode, size
            return
        if size <= self.offset:
            return
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                new = f.read(size - self.offset)
        except OSError:
            memory.clear()
            return
        complete = new.rfind(b"\n") + 1    # a line still being written is read next time
        self.offset += complete
        for line in new[:complete].splitlines():
            key = line.decode("utf-8", "surrogateescape")
            if key == "*":
                memory.clear()
            else:
                memory.remove(key)

    def _stat(self) -> tuple[int, int]:
        try:
            st = os.stat(self.path)
            return st.st_ino, st.st_size
        except OSError:
            return 0, 0


class TieredStore:
    """Memory in front of disk, with the memory Store's interface: small objects live in both
    (the disk copy survives restarts and is shared with the other processes), larger ones up to
    disk.max_object on disk only; a disk hit small enough for memory is promoted to it."""

    def __init__(self, memory: Store, memory_max_object: int, disk: DiskStore, purge_log: str | None = None) -> None:
        """`purge_log`: where the removals are shared (the workers' runtime directory, see
        make_store); by default in the disk directory, for every process sharing it."""
        self.memory, self.disk = memory, disk
        self.memory_max_object = memory_max_object
        self.max_object = max(memory_max_object, disk.max_object)
        self.purged = PurgeLog(purge_log or os.path.join(disk.settings.path, PURGE_LOG))

    @property
    def bytes(self) -> int:
        return self.memory.bytes + self.disk.bytes

    @property
    def tiers(self) -> dict[str, int]:
        return {"memory": self.memory.bytes, "disk": self.disk.bytes}

    def lookup(self, key: str, request: Mapping[str, str]) -> tuple[Entry | None, bool]:
        self.purged.apply(self.memory)
        entry, known = self.memory.lookup(key, request)
        if entry is not None:
            return entry, True
        entry, on_disk = self.disk.lookup(key, request, self.memory_max_object)
        if entry is not None and entry.file is None and len(entry.body) <= self.memory_max_object:
            self.memory.put(key, entry)
        return entry, known or on_disk

    def writer(self, key: str, expected: int | None = None) -> BodyWriter | None:
        """A body streaming past goes to disk (a small one is promoted to memory when hit); an
        older copy in memory must not shadow it."""
        if expected is not None and expected > self.disk.max_object:
            return None
        self.memory.remove(key)
        return self.disk.writer(key)

    def put_in_thread(self, key: str, entry: Entry):
        """put() of an entry whose body is in a file (copied: it takes a while), as an awaitable."""
        self.memory.remove(key)
        return asyncio.to_thread(self.disk.put, key, entry)

    def put(self, key: str, entry: Entry) -> bool:
        in_memory = False
        if entry.file is None and len(entry.body) <= self.memory_max_object:
            in_memory = self.memory.put(key, entry)
        else:
            self.memory.remove(key)     # an older, smaller copy must not shadow this one
        return self.disk.put(key, entry) or in_memory

    def remove(self, key: str) -> bool:
        in_memory = self.memory.remove(key)
        on_disk = self.disk.remove(key)
        self.purged.record(key)
        return on_disk or in_memory

    def clear(self) -> int:
        urls = max(self.memory.clear(), self.disk.clear())
        self.purged.record("*")
        return urls

    def close(self) -> None:
        self.disk.close()


class SharedMemory:
    """The memory tier alone, for workers of one machine (addons/workers): its removals are
    written to the machine's PurgeLog and the other workers' removals are applied before each
    lookup, as TieredStore does with a disk tier."""

    def __init__(self, memory: Store, purged: PurgeLog) -> None:
        self.memory, self.purged = memory, purged
        self.max_object = memory.max_object

    @property
    def bytes(self) -> int:
        return self.memory.bytes

    @property
    def tiers(self) -> dict[str, int]:
        return self.memory.tiers

    def lookup(self, key: str, request: Mapping[str, str]) -> tuple[Entry | None, bool]:
        self.purged.apply(self.memory)
        return self.memory.lookup(key, request)

    def writer(self, key: str, expected: int | None = None):
        return self.memory.writer(key, expected)

    def put(self, key: str, entry: Entry) -> bool:
        return self.memory.put(key, entry)

    def remove(self, key: str) -> bool:
        removed = self.memory.remove(key)
        self.purged.record(key)
        return removed

    def clear(self) -> int:
        urls = self.memory.clear()
        self.purged.record("*")
        return urls

    def close(self) -> None:
        """Nothing to release, as for the memory Store."""


def make_store(settings: CacheConfig, purge_log: str | None = None) -> Store | SharedMemory | TieredStore:
    """The store `cache:` describes: memory only, or memory in front of `cache.disk`.
    `purge_log`: the PurgeLog the workers of a machine share (EDGE_RUNTIME_DIR/purge.log), one
    log for every removal with or without a disk tier (the disk directory's own is then not
    written: one bookkeeping, not two); None for a single process."""
    memory = Store(settings.max_size, settings.max_object)
    if not settings.enabled:                # a disabled cache leaves the directory alone
        return memory
    if settings.disk is not None:
        return TieredStore(memory, settings.max_object, DiskStore(settings.disk), purge_log)
    return memory if purge_log is None else SharedMemory(memory, PurgeLog(purge_log))
