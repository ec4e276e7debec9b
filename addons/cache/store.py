"""The cache's memory: stored responses by URL and Vary selection, bounded in bytes (LRU)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import cachetools

from addons.cache.policy import ResponseRules, http_date, initial_age, selection, vary_names

Fields = tuple[tuple[bytes, bytes], ...]
ENTRY_OVERHEAD = 512        # bytes of bookkeeping counted per stored response


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

    def __post_init__(self) -> None:
        self.initial_age = initial_age(http_date(self.headers.get("date")), self.headers.get("age"),
                                       self.request_time, self.response_time)
        self.vary = vary_names(self.headers.get("vary")) or ()

    def age(self, now: float) -> float:
        """current_age: the initial age plus the time spent here."""
        return self.initial_age + (now - self.response_time)

    @property
    def size(self) -> int:
        return len(self.body) + sum(len(k) + len(v) + 4 for k, v in self.fields) + ENTRY_OVERHEAD


def _size(variants: dict) -> int:
    return sum(e.size for e in variants.values())


class Store:
    """URL key -> {vary selection -> Entry}, evicting least recently used URLs past max_bytes.
    Used from the event loop only, so no locking is needed."""

    def __init__(self, max_bytes: int, max_object: int | None = None) -> None:
        self.lru: cachetools.LRUCache = cachetools.LRUCache(maxsize=max_bytes, getsizeof=_size)
        self.max_object = max_bytes if max_object is None else max_object   # the largest body stored

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

    def put(self, key: str, entry: Entry) -> bool:
        if entry.size > self.lru.maxsize:
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
