"""The cache's memory: stored responses by URL and Vary selection, bounded in bytes (LRU);
the body of a large disk entry left in its file (FileBody); and MemoryWriter, a body stored in
memory while it streams past."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import cachetools

from addons.cache.policy import ResponseRules, http_date, initial_age, selection, vary_names

Fields = tuple[tuple[bytes, bytes], ...]
ENTRY_OVERHEAD = 512        # bytes of bookkeeping counted per stored response


class FileBody:
    """A stored body left in its file (a disk hit too large for memory): the open file, whose
    first `length` bytes are the body. Shared by whoever serves or copies it (`share()`, then
    one `close()` each); the file stays readable after the index evicts it."""

    def __init__(self, file, length: int) -> None:
        self.file, self.length = file, length
        self.users = 1

    def share(self) -> FileBody:
        self.users += 1
        return self

    def read(self, offset: int, size: int) -> bytes:
        """Body bytes only: the record's head that follows them in the file is never read."""
        return os.pread(self.file.fileno(), max(0, min(size, self.length - offset)), offset)

    def close(self) -> None:
        self.users -= 1
        if self.users <= 0 and not self.file.closed:
            self.file.close()


@dataclass
class Entry:
    status: int
    reason: bytes
    fields: Fields              # response header fields as they will be served
    headers: dict[str, str]     # the same, lower-case and combined, for the policy
    body: bytes
    request_time: float
    response_time: float
    rules: ResponseRules
    lifetime: float
    selected_by: tuple          # the request's values of the Vary'd headers
    initial_age: float = 0.0    # RFC 9111 4.2.3 corrected_initial_age, fixed when stored
    vary: tuple[str, ...] = ()  # the request headers it varies on, parsed once
    file: FileBody | None = None    # set (and body empty) when the body stayed on disk

    def __post_init__(self) -> None:
        self.initial_age = initial_age(http_date(self.headers.get("date")), self.headers.get("age"),
                                       self.request_time, self.response_time)
        self.vary = vary_names(self.headers.get("vary")) or ()

    def age(self, now: float) -> float:
        """current_age: the initial age plus the time spent here."""
        return self.initial_age + (now - self.response_time)

    @property
    def length(self) -> int:
        """The body's size, in memory or in its file."""
        return len(self.body) if self.file is None else self.file.length

    @property
    def size(self) -> int:
        return self.length + sum(len(k) + len(v) + 4 for k, v in self.fields) + ENTRY_OVERHEAD


def _size(variants: dict) -> int:
    return sum(e.size for e in variants.values())


class Store:
    """URL key -> {vary selection -> Entry}, evicting least recently used URLs past max_bytes.
    Used from the event loop only, so no locking is needed."""

    def __init__(self, max_bytes: int, max_object: int | None = None) -> None:
        self.lru: cachetools.LRUCache = cachetools.LRUCache(maxsize=max_bytes, getsizeof=_size)
        self.max_object = max_bytes if max_object is None else max_object   # the largest body stored
        # bodies being written while they stream (MemoryWriter) count against a budget of their
        # own: many slow downloads of large objects at once cannot hold more than this
        self.filling = 0
        self.fill_budget = max(self.max_object, max_bytes // 4)

    @property
    def bytes(self) -> int:
        return int(self.lru.currsize)

    @property
    def tiers(self) -> dict[str, int]:
        return {"memory": self.bytes}

    def close(self) -> None:
        """Nothing to release: the disk tier's counterpart."""

    def lookup(self, key: str, request: Mapping[str, str]) -> tuple[Entry | None, bool]:
        """The stored response selected for this request, and whether the URL is known at all."""
        variants = self.lru.get(key)
        if not variants:
            return None, False
        for entry in variants.values():
            if not entry.vary or selection(entry.vary, request) == entry.selected_by:
                return entry, True
        return None, True

    def writer(self, key: str, expected: int | None = None) -> MemoryWriter | None:
        """Where a body streaming past is stored: memory, up to max_object; `expected` (its
        Content-Length) is reserved in the fill budget at once, None when there is no room."""
        if expected is not None and (expected > self.max_object or self.filling + expected > self.fill_budget):
            return None
        return MemoryWriter(self, key, expected or 0)

    def put(self, key: str, entry: Entry) -> bool:
        if entry.file is not None or entry.size > self.lru.maxsize:
            return False
        variants = dict(self.lru.get(key) or {})
        # a new Vary header makes the old selections meaningless
        variants = {k: e for k, e in variants.items() if e.headers.get("vary") == entry.headers.get("vary")}
        variants[entry.selected_by] = entry
        while _size(variants) > self.lru.maxsize and len(variants) > 1:
            variants.pop(next(k for k in variants if k != entry.selected_by))
        self.lru[key] = variants
        return True

    def remove(self, key: str) -> bool:
        return self.lru.pop(key, None) is not None

    def clear(self) -> int:
        n = len(self.lru)
        self.lru.clear()
        return n


class MemoryWriter:
    """A body stored in memory while it streams past: grows up to the store's max_object (past
    it the writer gives up and frees what it held), entered by commit(entry) with `entry`'s
    head. read() lets readers follow it while it grows and after (read-while-writer)."""

    def __init__(self, store: Store, key: str, reserve: int = 0) -> None:
        self.store, self.key = store, key
        self.buffer: bytearray | None = bytearray()
        self.body = b""             # once committed: the stored bytes, which readers go on reading
        self.length = 0
        self.reserved = reserve     # counted in the store's fill budget: max(reserve, length)
        store.filling += reserve

    def write(self, chunk: bytes) -> bool:
        """False once the body is past max_object or the store's fill budget: given up."""
        if self.buffer is None:
            return False
        store, grow = self.store, max(0, self.length + len(chunk) - self.reserved)
        if self.length + len(chunk) > store.max_object or store.filling + grow > store.fill_budget:
            self.abort()
            return False
        self.buffer += chunk
        self.length += len(chunk)
        self.reserved += grow
        store.filling += grow
        return True

    def read(self, offset: int, size: int) -> bytes:
        if self.buffer is not None:
            return bytes(self.buffer[offset:offset + size])
        return self.body[offset:offset + size]

    def commit(self, entry: Entry) -> bool:
        """Stores the written body with `entry`'s head (its own body is replaced)."""
        if self.buffer is None:
            return False
        entry.body = self.body = bytes(self.buffer)
        self._unbudget()
        return self.store.put(self.key, entry)

    def abort(self) -> None:
        if self.buffer is not None:
            self._unbudget()
        self.body = b""

    def _unbudget(self) -> None:
        self.store.filling -= self.reserved
        self.reserved, self.buffer = 0, None

    def release(self) -> None:
        """Readers are done: nothing to release (the disk writer's counterpart)."""
