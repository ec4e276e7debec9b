"""Choosing an origin within a pool. Pure."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class SmoothWeighted(Generic[T]):
    """nginx's smooth weighted round robin: over sum(weights) picks each item comes up exactly
    `weight` times, interleaved (weights 5:1:1 give a a b a c a a, never a burst of five)."""

    def __init__(self, items: Sequence[tuple[T, int]]):
        if not items:
            raise ValueError("nothing to balance")
        self.items = [item for item, _ in items]
        self.weights = [w for _, w in items]
        self.current = [0] * len(items)

    def pick(self, usable: Callable[[T], bool] | None = None,
             share: Callable[[T], float] | None = None) -> T | None:
        """The next item, among those `usable` accepts (None if it accepts none). Skipped
        items keep their place, as in nginx: the spread stays smooth when they return.
        `share` scales an item's weight (slow start)."""
        best, total = -1, 0
        current, weights, items = self.current, self.weights, self.items
        for i in range(len(items)):
            if not weights[i] or (usable is not None and not usable(items[i])):
                continue
            weight = weights[i] if share is None else weights[i] * share(items[i])
            current[i] += weight
            total += weight
            if best < 0 or current[i] > current[best]:
                best = i
        if best < 0:
            return None
        current[best] -= total
        return items[best]

    def set_weight(self, item: T, weight: int) -> None:
        """Change an item's weight at run time; 0 drains it."""
        self.weights[self.items.index(item)] = weight


def _unit(key: str, item_id: str) -> float:
    """A stable pseudo-random number in (0, 1) for a (key, item) pair."""
    digest = hashlib.blake2b(f"{key}\x00{item_id}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 1) / (2**64 + 2)


def rendezvous(key: str, items: Sequence[tuple[T, int]], ident: Callable[[T], str],
               usable: Callable[[T], bool] | None = None) -> T | None:
    """Weighted rendezvous hashing: the same key always gets the same item, and removing an
    item moves only the keys it had (its weight's share)."""
    best, best_score = None, -math.inf
    for item, weight in items:
        if weight <= 0 or (usable is not None and not usable(item)):
            continue
        score = -weight / math.log(_unit(key, ident(item)))
        if score > best_score:
            best, best_score = item, score
    return best


def least_loaded(items: Sequence[tuple[T, int]], load: Callable[[T], int],
                 usable: Callable[[T], bool] | None = None, start: int = 0) -> T | None:
    """Weighted least connections: the item with the fewest requests in flight per unit of
    weight; ties go to the first from `start` (rotate it to spread ties round robin)."""
    best, best_score = None, math.inf
    n = len(items)
    for j in range(n):
        item, weight = items[(start + j) % n]
        if weight <= 0 or (usable is not None and not usable(item)):
            continue
        score = (load(item) + 1) / weight
        if score < best_score:
            best, best_score = item, score
    return best
