"""Which pool serves a client, from where it is. Pure.

Order (Cloudflare's geo steering with proximity fallback): the client's country rule, its
continent rule, the pools by great-circle distance from the client, the default pool. A pool
with nothing available falls through to the next choice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from cachetools import LRUCache

from addons.config import EdgeConfig, GeoConfig
from addons.geo.locate import Place

EARTH_KM = 6371.0


def distance_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance (haversine) between two (lat, lon) points."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_KM * math.asin(min(1.0, math.sqrt(h)))


def candidates(place: Place | None, countries: Mapping[str, str], continents: Mapping[str, str],
               locations: Mapping[str, tuple[float, float]] | None, default: str) -> list[tuple[str, str]]:
    """(pool, why) in the order to try them; `locations` None: no nearest step."""
    out: list[tuple[str, str]] = []
    if place is not None:
        if place.country in countries:
            out.append((countries[place.country], f"country {place.country}"))
        if place.continent in continents:
            out.append((continents[place.continent], f"continent {place.continent}"))
        if locations and place.lat is not None and place.lon is not None:
            here = (place.lat, place.lon)
            for pool, where in sorted(locations.items(), key=lambda kv: distance_km(here, kv[1])):
                out.append((pool, f"nearest ({distance_km(here, where):.0f} km)"))
    out.append((default, "default pool" if place is not None else "location unknown: default pool"))
    seen: set[str] = set()
    return [(p, why) for p, why in out if not (p in seen or seen.add(p))]


def steer(options: list[tuple[str, str]], available: Callable[[str], bool], default: str) -> tuple[str, str]:
    """The first available choice; when none is, the default pool (its fallback chain and
    the 503 decide from there)."""
    for pool, why in options:
        if available(pool):
            return pool, why
    return default, "nothing available: default pool"


class Steering:
    """A config's geo rules, with each place's ordered choices remembered (the distances to
    every pool are worked out once per place, not per request)."""

    def __init__(self, countries: Mapping[str, str], continents: Mapping[str, str],
                 locations: Mapping[str, tuple[float, float]] | None, default: str) -> None:
        self.countries, self.continents = dict(countries), dict(continents)
        self.locations, self.default = locations, default
        self.remembered: LRUCache[Place | None, list[tuple[str, str]]] = LRUCache(4096)

    @classmethod
    def from_config(cls, config: EdgeConfig) -> Steering:
        geo = config.geo or GeoConfig()
        locations = {name: p.location for name, p in config.pools.items() if p.location} if geo.nearest else None
        return cls(geo.countries, geo.continents, locations, config.default_pool)

    def options(self, place: Place | None) -> list[tuple[str, str]]:
        try:
            return self.remembered[place]
        except KeyError:
            out = self.remembered[place] = candidates(place, self.countries, self.continents,
                                                      self.locations, self.default)
            return out
