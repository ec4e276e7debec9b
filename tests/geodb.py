"""GeoIP2 City databases built by the tests (mmdb-writer), so no test needs a downloaded one."""

from __future__ import annotations

from pathlib import Path

from mmdb_writer import MMDBWriter, MmdbF64
from netaddr import IPSet

# network -> (country, continent, lat, lon)
PLACES = {
    "81.2.69.0/24": ("GB", "EU", 51.51, -0.13),        # London
    "89.160.20.0/24": ("SE", "EU", 59.33, 18.05),      # Stockholm
    "8.8.8.0/24": ("US", "NA", 37.75, -97.82),
    "24.114.0.0/16": ("CA", "NA", 43.65, -79.38),      # Toronto
    "223.5.5.0/24": ("CN", "AS", 30.29, 120.16),
    "41.0.0.0/16": ("NG", "AF", 6.52, 3.38),           # Lagos: no rule, nearest decides
    "200.160.0.0/16": ("BR", "SA", -23.55, -46.63),    # São Paulo
    "2a02:c7c::/32": ("GB", "EU", 51.51, -0.13),
}


def build(path: Path, places: dict[str, tuple] = PLACES, kind: str = "GeoIP2-City") -> Path:
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type=kind, languages=["en"],
                        description={"en": "edge test database"})
    for network, (country, continent, lat, lon) in places.items():
        record = {"country": {"iso_code": country, "names": {"en": country}},
                  "continent": {"code": continent, "names": {"en": continent}}}
        if lat is not None:
            record["location"] = {"latitude": MmdbF64(lat), "longitude": MmdbF64(lon)}
        writer.insert_network(IPSet([network]), record)
    writer.to_db_file(str(path))
    return path
