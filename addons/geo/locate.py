"""Client IP -> Place, from a MaxMind DB file (GeoIP2/GeoLite2 City or Country).

The file is memory-mapped by the maxminddb C extension; lookups are cached per address, and a
file replaced on disk (`edge geoip update` swaps it atomically) is picked up on the next lookup
after RELOAD_CHECK seconds, with no restart.
"""

from __future__ import annotations

import datetime
import importlib.util
import ipaddress
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import geoip2.database
import geoip2.errors
import maxminddb
from cachetools import LRUCache

from addons.tasks import Throttle, report

logger = logging.getLogger("edge")
RELOAD_CHECK = 2.0          # seconds between looks at the file's identity
CACHE_SIZE = 65536          # addresses remembered (a few MiB)
PROBES = ("1.1.1.1", "81.2.69.160", "223.5.5.5", "2001:4860:4860::8888")    # looked up before a file is used


@dataclass(frozen=True)
class Place:
    country: str | None          # ISO 3166-1 alpha-2
    continent: str | None        # AF AN AS EU NA OC SA
    lat: float | None
    lon: float | None


class GeoDatabaseError(Exception):
    """The database cannot be used; said for the user."""


def embedded_database() -> Path:
    """The GeoLite2 City database shipped in the `maxminddb-geolite2` package (built 2018-07-03,
    CC BY-SA 4.0): good enough to route by continent out of the box, never downloaded."""
    spec = importlib.util.find_spec("_maxminddb_geolite2")
    if spec is None or not spec.submodule_search_locations:
        raise GeoDatabaseError("the embedded GeoLite2 database (package maxminddb-geolite2) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "GeoLite2-City.mmdb"


def open_reader(path: str | os.PathLike) -> geoip2.database.Reader:
    try:
        reader = geoip2.database.Reader(str(path))
    except FileNotFoundError:
        raise GeoDatabaseError(f"{path}: no such file") from None
    except (OSError, ValueError, maxminddb.InvalidDatabaseError) as e:
        raise GeoDatabaseError(f"{path}: not a MaxMind DB file ({e})") from None
    kind = reader.metadata().database_type
    if "City" not in kind and "Country" not in kind:
        reader.close()
        raise GeoDatabaseError(f"{path}: a {kind} database; a City or Country database is needed")
    lookup = reader.city if "City" in kind else reader.country
    try:            # a file with valid metadata can still have a broken tree or data section
        for ip in PROBES:
            try:
                lookup(ip)
            except geoip2.errors.AddressNotFoundError:
                pass
    except (maxminddb.InvalidDatabaseError, ValueError, OSError) as e:
        reader.close()
        raise GeoDatabaseError(f"{path}: a damaged MaxMind DB file ({e})") from None
    return reader


def describe(path: str | os.PathLike) -> str:
    """`GeoLite2-City built 2018-07-03` for status and lookups."""
    with open_reader(path) as reader:
        meta = reader.metadata()
        built = datetime.datetime.fromtimestamp(meta.build_epoch, datetime.timezone.utc).date()
        return f"{meta.database_type} built {built}"


class Locator:
    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path else embedded_database()
        self.reader = open_reader(self.path)
        self.identity = self._identity()
        self.checked = time.monotonic()
        self.cache: LRUCache[str, Place | None] = LRUCache(CACHE_SIZE)
        self.is_city = "City" in self.reader.metadata().database_type
        self.failures = Throttle()

    def _identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    def _maybe_reload(self, now: float) -> None:
        self.checked = now
        identity = self._identity()
        if identity is None or identity == self.identity:
            return
        try:
            reader = open_reader(self.path)
        except GeoDatabaseError as e:          # keep serving with the database we have
            logger.warning("edge: geo database not reloaded: %s", e)
            self.identity = identity
            return
        old, self.reader, self.identity = self.reader, reader, identity
        self.is_city = "City" in reader.metadata().database_type
        self.cache.clear()
        old.close()
        logger.warning("edge: geo database reloaded: %s", self.path)

    def locate(self, ip: str) -> Place | None:
        """None for an address the database does not know (private, reserved, unlisted)."""
        now = time.monotonic()
        if now - self.checked > RELOAD_CHECK:
            self._maybe_reload(now)
        try:
            return self.cache[ip]
        except KeyError:
            pass
        place = self._lookup(ip)
        self.cache[ip] = place
        return place

    def _lookup(self, ip: str) -> Place | None:
        try:
            if ipaddress.ip_address(ip).is_private:
                return None
            record = self.reader.city(ip) if self.is_city else self.reader.country(ip)
        except (ValueError, geoip2.errors.AddressNotFoundError):
            return None
        except maxminddb.InvalidDatabaseError as e:     # damage the probes missed: unknown, reported
            report(self.failures, f"geo lookup in {self.path}", e)
            return None
        location = getattr(record, "location", None)
        return Place(record.country.iso_code, record.continent.code,
                     location.latitude if location else None, location.longitude if location else None)

    def close(self) -> None:
        self.reader.close()
