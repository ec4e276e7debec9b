"""Choosing an origin within a pool. Pure."""

from __future__ import annotations

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

    def pick(self, usable: Callable[[T], bool] | None = None) -> T | None:
        """The next item, among those `usable` accepts (None if it accepts none). Skipped
        items keep their place, as in nginx: the spread stays smooth when they return."""
        best, total = -1, 0
        current, weights, items = self.current, self.weights, self.items
        for i in range(len(items)):
            if not weights[i] or (usable is not None and not usable(items[i])):
                continue
            current[i] += weights[i]
            total += weights[i]
            if best < 0 or current[i] > current[best]:
                best = i
        if best < 0:
            return None
        current[best] -= total
        return items[best]

    def set_weight(self, item: T, weight: int) -> None:
        """Change an item's weight at run time; 0 drains it."""
        self.weights[self.items.index(item)] = weight
