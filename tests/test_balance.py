"""Smooth weighted round robin: pure."""

from collections import Counter

import pytest

from addons.route.balance import SmoothWeighted


def test_nginx_sequence_has_no_bursts():
    swrr = SmoothWeighted([("a", 5), ("b", 1), ("c", 1)])
    assert [swrr.pick() for _ in range(7)] == list("aabacaa")     # nginx's documented order


def test_each_cycle_honours_weights_exactly():
    swrr = SmoothWeighted([("a", 3), ("b", 1)])
    picks = [swrr.pick() for _ in range(4000)]
    assert Counter(picks) == {"a": 3000, "b": 1000}
    assert all(Counter(picks[i:i + 4]) == {"a": 3, "b": 1} for i in range(0, 4000, 4))


def test_empty_pool_is_an_error():
    with pytest.raises(ValueError):
        SmoothWeighted([])
