"""Choosing an origin within a pool. Pure."""

from __future__ import annotations

from collections.abc import Sequence
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
        self.total = sum(self.weights)

    def pick(self) -> T:
        best = 0
        current, weights = self.current, self.weights
        for i in range(len(current)):
            current[i] += weights[i]
            if current[i] > current[best]:
                best = i
        current[best] -= self.total
        return self.items[best]
