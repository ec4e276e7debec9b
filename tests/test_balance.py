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


def test_unusable_items_are_skipped_and_the_rest_keep_their_ratio():
    swrr = SmoothWeighted([("a", 3), ("b", 1), ("c", 2)])
    picks = [swrr.pick(lambda x: x != "c") for _ in range(400)]
    assert Counter(picks) == {"a": 300, "b": 100}
    assert swrr.pick(lambda x: False) is None


def test_health_rise_fall_and_passive_cooldown():
    from addons.route.health import Health
    h = Health(rise=2, fall=2)
    assert h.available(0) and not h.check_failed("refused") and h.available(0)
    assert h.check_failed("refused") and not h.available(0)            # fall=2: down now
    assert not h.check_passed(0) and not h.available(0)                 # rise=2: not yet
    assert h.check_passed(0) and h.available(0)                         # back
    assert h.probe_failed("refused", now=100.0, cooldown=10)            # a failed probe: out for 10 s
    assert not h.available(105.0) and h.available(110.0)
    assert h.describe(105.0).startswith("unreachable 5s")
    h.probe_failed("refused", now=200.0, cooldown=10)
    assert not h.check_passed(200.0) and h.available(200.0)             # a passing check clears it


def test_slow_start_ramps_a_recovered_origin_from_a_tenth_to_its_full_weight():
    from addons.route.health import Health
    h = Health(rise=1, fall=1)
    assert h.share(0.0, slow_start=10) == 1.0                           # at start-up: full weight
    h.check_failed("refused")
    assert h.check_passed(100.0)
    assert [h.share(t, 10) for t in (100.0, 101.0, 105.0, 110.0)] == [0.1, 0.1, 0.5, 1.0]
    assert h.describe(105.0, 10) == "up, slow start 50%" and h.describe(110.0, 10) == "up"
    h.probe_failed("refused", now=200.0, cooldown=10)                   # unreachable: ramps from 210
    assert h.share(215.0, 10) == 0.5


def test_slow_start_share_scales_round_robin_weights():
    swrr = SmoothWeighted([("warm", 1), ("cold", 1)])
    picks = Counter(swrr.pick(share=lambda o: 0.25 if o == "cold" else 1.0) for _ in range(500))
    assert picks == {"warm": 400, "cold": 100}


def test_rendezvous_is_sticky_and_moves_only_the_removed_share():
    from addons.route.balance import rendezvous
    four = [(f"o{i}", 1) for i in range(4)]
    keys = [f"203.0.113.{i}" for i in range(4000)]
    before = {k: rendezvous(k, four, str) for k in keys}
    assert before == {k: rendezvous(k, four, str) for k in keys}          # sticky
    share = Counter(before.values())
    assert all(900 <= n <= 1100 for n in share.values())                 # equal weights: ~1000 each
    after = {k: rendezvous(k, four, str, lambda o: o != "o3") for k in keys}
    moved = sum(before[k] != after[k] for k in keys)
    assert moved == share["o3"] and moved / len(keys) <= 0.30            # only o3's keys move


def test_least_loaded_prefers_the_idle_weighted_origin():
    from addons.route.balance import least_loaded
    load = {"a": 4, "b": 1, "c": 0}
    assert least_loaded([("a", 1), ("b", 1), ("c", 1)], load.get) == "c"
    assert least_loaded([("a", 10), ("b", 1)], load.get) == "a"          # 5/10 < 2/1
    assert least_loaded([("a", 1)], load.get, lambda o: False) is None
    idle = {"a": 0, "b": 0}.get
    assert [least_loaded([("a", 1), ("b", 1)], idle, start=i) for i in range(4)] == ["a", "b", "a", "b"]
