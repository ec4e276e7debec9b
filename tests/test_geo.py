"""Geo steering: pure rules, the database reader (built by the test), and through the proxy with
the client's location taken from a trusted X-Forwarded-For."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import httpx
import pytest
import responses
from click.testing import CliRunner

from addons.config import ConfigError, parse_config
from addons.geo import locate
from addons.geo.locate import Locator, Place
from addons.geo.steer import candidates, distance_km, steer
from addons.geo.update import LEGACY_URL
from edgecli.main import cli
from tests import geodb

LONDON, STOCKHOLM, LAGOS = Place("GB", "EU", 51.51, -0.13), Place("SE", "EU", 59.33, 18.05), \
    Place("NG", "AF", 6.52, 3.38)
LOCATIONS = {"eu": (50.11, 8.68), "us": (39.04, -77.49), "ap": (1.35, 103.82)}
RULES = dict(countries={"US": "us", "GB": "uk"}, continents={"EU": "eu", "AS": "ap"})

GB_IP, SE_IP, US_IP, CA_IP, CN_IP, NG_IP, BR_IP = ("81.2.69.160", "89.160.20.112", "8.8.8.8", "24.114.1.1",
                                                   "223.5.5.5", "41.0.1.1", "200.160.2.3")


@pytest.fixture
def mmdb(tmp_path):
    return geodb.build(tmp_path / "test-city.mmdb")


# -- pure ------------------------------------------------------------------------------------------

def test_great_circle_distance():
    assert distance_km((51.51, -0.13), (48.86, 2.35)) == pytest.approx(343, abs=3)      # London-Paris
    assert distance_km((0, 0), (0, 180)) == pytest.approx(20015, abs=5)                 # half the equator


def test_rule_order_country_continent_nearest_default():
    assert [p for p, _ in candidates(LONDON, locations=LOCATIONS, default="eu", **RULES)] == ["uk", "eu", "us", "ap"]
    assert candidates(STOCKHOLM, locations=LOCATIONS, default="eu", **RULES)[0] == ("eu", "continent EU")
    assert [p for p, _ in candidates(LAGOS, locations=LOCATIONS, default="eu", **RULES)] == ["eu", "us", "ap"]
    assert candidates(LAGOS, locations=None, default="us", **RULES) == [("us", "default pool")]
    assert candidates(None, locations=LOCATIONS, default="eu", **RULES) == [("eu", "location unknown: default pool")]


def test_a_pool_with_nothing_available_falls_through_to_the_next_choice():
    options = candidates(LONDON, locations=LOCATIONS, default="eu", **RULES)
    assert steer(options, lambda p: p != "uk", "eu") == ("eu", "continent EU")
    assert steer(options, lambda p: p not in ("uk", "eu"), "eu") == ("us", "nearest (5917 km)")
    assert steer(options, lambda p: False, "eu") == ("eu", "nothing available: default pool")


@pytest.mark.parametrize("geo, key, problem", [
    ("countries: {NO: eu}", "routing.geo.countries", 'quote country codes like "NO"'),
    ("countries: {usa: eu}", "routing.geo.countries.usa", "ISO country code"),
    ("continents: {EU: mars}", "routing.geo.continents.EU", "no pool named 'mars'"),
    ("continents: {XX: eu}", "routing.geo.continents.XX", "one of AF AN AS"),
    ("database: /no/such.mmdb", "routing.geo.database", "cannot read"),
    ("nearest: true", "routing.geo.nearest", "needs pools with a location"),
])
def test_geo_config_errors_name_the_line(geo, key, problem):
    with pytest.raises(ConfigError) as e:
        parse_config(f"pools:\n  eu: {{origins: [http://x]}}\nrouting:\n  default_pool: eu\n  geo:\n    {geo}\n", "g.yaml")
    assert e.value.line == 6 and e.value.key.startswith(key) and problem in e.value.problem


def test_locator_reads_city_records_and_knows_what_it_does_not_know(mmdb):
    locator = Locator(mmdb)
    assert locator.locate(GB_IP) == Place("GB", "EU", 51.51, -0.13)
    assert locator.locate("2a02:c7c::7").country == "GB"
    assert locator.locate("1.1.1.1") is None                   # not in this database
    assert locator.locate("10.0.0.1") is None and locator.locate("::1") is None
    assert locator.locate("not an ip") is None


def test_the_embedded_database_needs_no_download():
    locator = Locator()                                         # GeoLite2 City from maxminddb-geolite2
    assert locator.path.stat().st_size > 10_000_000
    assert locator.locate(GB_IP).country == "GB" and locator.locate(US_IP).continent == "NA"


def test_a_replaced_file_is_picked_up_without_a_restart(mmdb, monkeypatch):
    locator = Locator(mmdb)
    assert locator.locate(GB_IP).country == "GB"
    moved = dict(geodb.PLACES, **{"81.2.69.0/24": ("IE", "EU", 53.35, -6.26)})
    geodb.build(mmdb.with_suffix(".new"), moved)
    os.replace(mmdb.with_suffix(".new"), mmdb)
    monkeypatch.setattr(locate, "RELOAD_CHECK", 0.0)
    assert locator.locate(GB_IP).country == "IE"


def test_a_broken_replacement_keeps_the_old_database(mmdb, monkeypatch):
    locator = Locator(mmdb)
    mmdb.with_suffix(".new").write_bytes(b"garbage")
    os.replace(mmdb.with_suffix(".new"), mmdb)
    monkeypatch.setattr(locate, "RELOAD_CHECK", 0.0)
    assert locator.locate(GB_IP).country == "GB"


# -- through the proxy ---------------------------------------------------------------------------------

def geo_config(mmdb, eu, us, ap, trusted="[127.0.0.1/32]", health=""):
    return (f"trusted_proxies: {trusted}\npools:\n"
            f"  eu: {{origins: [{eu.url}], location: {{lat: 50.11, lon: 8.68}}{health}}}\n"
            f"  us: {{origins: [{us.url}], location: {{lat: 39.04, lon: -77.49}}{health}}}\n"
            f"  ap: {{origins: [{ap.url}], location: {{lat: 1.35, lon: 103.82}}{health}}}\n"
            f"routing:\n  default_pool: eu\n  geo:\n    database: {mmdb}\n"
            f"    countries: {{US: us, CA: us}}\n    continents: {{EU: eu, NA: us, AS: ap}}\n    nearest: true\n")


def pool_for(e, ip):
    r = httpx.get(f"{e.url}/echo", headers={"X-Forwarded-For": ip})
    assert r.status_code == 200
    return r.json()["origin"]


def test_clients_reach_the_pool_for_where_they_are(origin, edge, mmdb, tmp_path):
    eu, us, ap = origin("eu"), origin("us"), origin("ap")
    log = tmp_path / "access.log"
    e = edge(geo_config(mmdb, eu, us, ap), access_log=str(log))
    got = {ip: pool_for(e, ip) for ip in (GB_IP, SE_IP, US_IP, CA_IP, CN_IP, NG_IP, BR_IP, "1.1.1.1", "10.9.8.7")}
    assert got == {GB_IP: "eu", SE_IP: "eu", US_IP: "us", CA_IP: "us", CN_IP: "ap",
                   NG_IP: "eu",            # Lagos: Frankfurt is nearer than Singapore
                   BR_IP: "us",            # São Paulo: Ashburn is nearest
                   "1.1.1.1": "eu", "10.9.8.7": "eu"}     # unknown and private: the default
    lines = [json.loads(line)["edge"] for line in log.read_text().splitlines()]
    assert lines[0]["geo"] == {"country": "GB", "continent": "EU", "pool": "eu", "why": "continent EU"}
    assert lines[2]["geo"]["why"] == "country US"
    assert lines[5]["geo"]["why"].startswith("nearest (")
    assert lines[7]["geo"] == {"country": None, "continent": None, "pool": "eu",
                               "why": "location unknown: default pool"}


def test_forwarded_for_from_an_untrusted_peer_does_not_move_the_client(origin, edge, mmdb):
    eu, us, ap = origin("eu"), origin("us"), origin("ap")
    e = edge(geo_config(mmdb, eu, us, ap, trusted="[]"))
    assert pool_for(e, US_IP) == "eu"                       # 127.0.0.1 is where it really is


def test_a_geo_pool_with_no_healthy_origin_falls_through(origin, edge, mmdb):
    eu, us, ap = origin("eu"), origin("us"), origin("ap")
    health = ", health: {path: /health, interval: 100ms, timeout: 100ms, rise: 1, fall: 1}"
    e = edge(geo_config(mmdb, eu, us, ap, health=health))
    route = e.master.addons.get("route")
    us.stop()
    from tests.conftest import until
    until(lambda: "down" in route.status())
    assert pool_for(e, US_IP) == "eu"                       # country rule's pool is down: nearest next


# -- CLI -------------------------------------------------------------------------------------------

def test_geoip_lookup_says_what_the_edge_would_decide(mmdb, tmp_path):
    config = tmp_path / "edge.yaml"
    config.write_text("pools:\n  eu: {origins: [http://127.0.0.1:1], location: {lat: 50, lon: 8}}\n"
                      "  us: {origins: [http://127.0.0.1:2], location: {lat: 39, lon: -77}}\n"
                      f"routing:\n  default_pool: eu\n  geo:\n    database: {mmdb.name}\n    countries: {{US: us}}\n")
    run = lambda ip: CliRunner().invoke(cli, ["geoip", "lookup", ip, "-c", str(config)])
    us = run(US_IP)
    assert us.exit_code == 0, us.output
    assert "country US, continent NA (37.75, -97.82)" in us.output and "pool us: country US" in us.output
    assert "GeoIP2-City built" in us.output
    assert "pool eu: nearest" in run(BR_IP).output or "pool us: nearest" in run(BR_IP).output
    assert "pool eu: location unknown" in run("10.0.0.1").output
    bad = run("300.1.1.1")
    assert bad.exit_code == 2 and "not an IP address" in bad.output


def maxmind_archive(mmdb, edition="GeoLite2-City") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(mmdb, arcname=f"{edition}_20261124/{edition}.mmdb")
        info = tarfile.TarInfo(f"{edition}_20261124/COPYRIGHT.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"(c) x"))
    return buf.getvalue()


def mock_maxmind(archive: bytes, digest: str | None = None, status: int = 200):
    digest = digest or hashlib.sha256(archive).hexdigest()
    responses.add(responses.GET, LEGACY_URL, body=f"{digest}  GeoLite2-City_20261124.tar.gz\n", status=status,
                  match=[responses.matchers.query_param_matcher(
                      {"edition_id": "GeoLite2-City", "license_key": "KEY", "suffix": "tar.gz.sha256"})])
    responses.add(responses.GET, LEGACY_URL, body=archive, status=status,
                  match=[responses.matchers.query_param_matcher(
                      {"edition_id": "GeoLite2-City", "license_key": "KEY", "suffix": "tar.gz"})])


@responses.activate
def test_geoip_update_verifies_and_swaps_in_a_running_edge_picks_it_up(origin, edge, mmdb, tmp_path, monkeypatch):
    monkeypatch.setattr(locate, "RELOAD_CHECK", 0.0)
    eu, us, ap = origin("eu"), origin("us"), origin("ap")
    installed = tmp_path / "live" / "GeoLite2-City.mmdb"
    installed.parent.mkdir()
    installed.write_bytes(mmdb.read_bytes())
    e = edge(geo_config(installed, eu, us, ap))
    assert pool_for(e, GB_IP) == "eu"
    moved = geodb.build(tmp_path / "new.mmdb", dict(geodb.PLACES, **{"81.2.69.0/24": ("US", "NA", 40.7, -74.0)}))
    mock_maxmind(maxmind_archive(moved))
    result = CliRunner().invoke(cli, ["geoip", "update", "--license-key", "KEY", "--out", str(installed)])
    assert result.exit_code == 0, result.output
    assert "GeoIP2-City built" in result.output and str(installed) in result.output
    assert installed.read_bytes() == moved.read_bytes()
    assert sorted(os.listdir(installed.parent)) == ["GeoLite2-City.mmdb"]      # no leftovers
    assert pool_for(e, GB_IP) == "us"                       # reloaded, no restart


@responses.activate
def test_geoip_update_refuses_a_download_that_does_not_match_its_checksum(mmdb, tmp_path):
    installed = tmp_path / "live" / "GeoLite2-City.mmdb"
    installed.parent.mkdir()
    installed.write_bytes(b"the old one")
    mock_maxmind(maxmind_archive(mmdb), digest="0" * 64)
    result = CliRunner().invoke(cli, ["geoip", "update", "--license-key", "KEY", "--out", str(installed)])
    assert result.exit_code == 1 and "SHA-256 mismatch" in result.output and "nothing was changed" in result.output
    assert installed.read_bytes() == b"the old one"
    assert sorted(os.listdir(installed.parent)) == ["GeoLite2-City.mmdb"]      # no leftovers


@responses.activate
def test_geoip_update_says_when_the_key_is_refused(tmp_path):
    mock_maxmind(b"", status=401)
    result = CliRunner().invoke(cli, ["geoip", "update", "--license-key", "KEY", "--out", str(tmp_path / "x.mmdb")])
    assert result.exit_code == 1 and "refused the licence key" in result.output
    assert not (tmp_path / "x.mmdb").exists()


@responses.activate
def test_geoip_update_with_an_account_id_uses_basic_auth(mmdb, tmp_path):
    archive = maxmind_archive(mmdb)
    url = "https://download.maxmind.com/geoip/databases/GeoLite2-City/download"
    auth = responses.matchers.header_matcher({"Authorization": "Basic MTIzNDpLRVk="})       # 1234:KEY
    responses.add(responses.GET, url, body=f"{hashlib.sha256(archive).hexdigest()}  x.tar.gz",
                  match=[auth, responses.matchers.query_param_matcher({"suffix": "tar.gz.sha256"})])
    responses.add(responses.GET, url, body=archive,
                  match=[auth, responses.matchers.query_param_matcher({"suffix": "tar.gz"})])
    result = CliRunner().invoke(cli, ["geoip", "update", "--license-key", "KEY", "--account-id", "1234",
                                      "--out", str(tmp_path / "db.mmdb")])
    assert result.exit_code == 0, result.output


def test_a_reloaded_config_without_a_database_goes_back_to_the_embedded_one(mmdb):
    from addons.route import Route
    pools = "pools:\n  eu: {origins: [http://127.0.0.1:1]}\n"
    route = Route()
    route.apply(parse_config(f"{pools}routing:\n  default_pool: eu\n  geo:\n    database: {mmdb}\n"))
    kept = route.locator
    route.apply(parse_config(f"{pools}routing:\n  default_pool: eu\n  geo:\n    database: {mmdb}\n"))
    assert route.locator is kept                                  # same file: same reader and cache
    route.apply(parse_config(f"{pools}routing:\n  default_pool: eu\n  geo: {{countries: {{}}}}\n"))
    assert route.locator.path == locate.embedded_database()
