"""Config parsing: the contract keys, and every mistake named by file:line: key."""

import ipaddress

import pytest

from addons.config import MAX_READINGS, ConfigError, config_from_origins, load_config, parse_config
from tests.conftest import REPO

GOOD = """\
listen: 127.0.0.1:8080
trusted_proxies: [127.0.0.1/32, "::1"]
pools:
  eu:
    origins:
      - {url: http://127.0.0.1:9001, weight: 3}
      - {url: http://127.0.0.1:9002, weight: 1}
  us:
    origins: ["https://origin.example"]
routing:
  default_pool: eu
scrub:
  server_header: null
  strip: [X-Powered-By]
access_log: "-"
"""


def test_contract_keys_parse():
    cfg = parse_config(GOOD, "good.yaml")
    assert cfg.listen == ("127.0.0.1", 8080)
    assert cfg.trusted_proxies == (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
    assert [(o.host, o.port, o.weight) for o in cfg.pools["eu"].origins] == [("127.0.0.1", 9001, 3), ("127.0.0.1", 9002, 1)]
    us = cfg.pools["us"].origins[0]
    assert (us.scheme, us.host, us.port) == ("https", "origin.example", 443)
    assert cfg.default_pool == "eu" and cfg.default_origin.port == 9001
    assert cfg.scrub.server_header is None and cfg.scrub.strip == ("X-Powered-By",)
    assert cfg.access_log == "-"


def test_shipped_example_is_valid():
    cfg = load_config(str(REPO / "data" / "edge.example.yaml"))
    assert set(cfg.pools) == {"eu", "us", "ap"} and cfg.default_pool == "eu"


def test_defaults():
    cfg = parse_config("pools: {a: {origins: [http://10.0.0.1:81]}}")
    assert cfg.default_pool == "a" and cfg.listen == ("127.0.0.1", 8080) and cfg.trusted_proxies == ()
    assert cfg.scrub.server_header == "edge" and "X-Powered-By" in cfg.scrub.strip
    assert cfg.access_log is None


@pytest.mark.parametrize("text, line, key, problem", [
    ("pools:\n  a:\n    origins: [http://x:1]\nfirewall: {}\n", 4, "firewall", "unknown key"),
    ("pools: {a: {origins: [http://x]}}\ncompress:\n  encodings: [br, deflate]\n", 3, "compress.encodings[1]",
     "expected one of br, zstd, gzip"),
    ("pools: {a: {origins: [http://x]}}\ncompress:\n  min_size: -1\n", 3, "compress.min_size", "expected a size"),
    ("pools: {a: {origins: [http://x]}}\ncache:\n  max_size: lots\n", 3, "cache.max_size", "expected a size"),
    ("pools: {a: {origins: [http://x]}}\ncache:\n  max_size: 1MB\n  max_object: 2MB\n", 4, "cache.max_object", "not be larger"),
    ("pools: {a: {origins: [http://x]}}\ncache:\n  default_ttl: soon\n", 3, "cache.default_ttl", "duration"),
    ("pools: {a: {origins: [http://x]}}\ncache:\n  enabled: 1\n", 3, "cache.enabled", "true or false"),
    ("pools:\n  a:\n    origins:\n      - {url: 'ftp://x', weight: 1}\n", 4, "pools.a.origins[0].url", "scheme must be http"),
    ("pools:\n  a:\n    origins:\n      - {url: 'http://x/path'}\n", 4, "pools.a.origins[0].url", "no path"),
    ("pools:\n  a:\n    origins:\n      - {url: 'http://x:99999'}\n", 4, "pools.a.origins[0].url", "bad port"),
    ("pools:\n  a:\n    origins:\n      - {url: 'http://x', weight: 0}\n", 4, "pools.a.origins[0].weight", "weight must be"),
    ("pools:\n  a:\n    origins:\n      - {url: 'http://x', wieght: 2}\n", 4, "pools.a.origins[0].wieght", "unknown key"),
    ("pools:\n  a:\n    origins:\n      - {weight: 2}\n", 4, "pools.a.origins[0]", "needs a url"),
    ("pools:\n  a:\n    origins: []\n", 3, "pools.a.origins", "at least one origin"),
    ("pools: {}\n", 1, "pools", "at least one pool"),
    ("pools:\n  a:\n    origins: [http://x]\n    slow_start: soon\n", 4, "pools.a.slow_start", "duration"),
    ("pools:\n  a:\n    origins: [http://x]\n    connect_timeout: 0s\n", 4, "pools.a.connect_timeout", "more than 0"),
    ("pools:\n  a:\n    origins: [http://x]\n    location: {lat: 91, lon: 0}\n", 4, "pools.a.location.lat",
     "degrees from -90 to 90"),
    ("pools: {a: {origins: [http://x]}}\nadmin: 127.0.0.1:8080\n", 2, "admin", "must differ from listen"),
    ("pools:\n  a: {origins: [http://x]}\n  b: {origins: [http://y]}\n", None, "routing", "default_pool is required"),
    ("pools:\n  a: {origins: [http://x]}\nrouting:\n  default_pool: zz\n", 4, "routing.default_pool", "no pool named 'zz'"),
    ("listen: nowhere\npools: {a: {origins: [http://x]}}\n", 1, "listen", "expected HOST:PORT"),
    ("trusted_proxies: [10.0.0.0/8, bogus]\npools: {a: {origins: [http://x]}}\n", 1, "trusted_proxies[1]", "not an IP"),
    ("pools: {a: {origins: [http://x]}}\nscrub:\n  strip: [ok, 'bad name']\n", 3, "scrub.strip[1]", "header name"),
    ("pools: {a: {origins: [http://x]}}\nscrub:\n  server_header: 5\n", 3, "scrub.server_header", "expected a string"),
    ("pools: {a: {origins: [http://x]}}\naccess_log: 7\n", 2, "access_log", "expected"),
    ("pools: {a: {origins: [http://x]}}\npools: {}\n", 2, "pools", "duplicate key"),
    ("pools: [\n", None, "", "not valid YAML"),
    ("- just\n- a list\n", 1, "", "expected a mapping"),
])
def test_errors_name_file_line_and_key(text, line, key, problem):
    with pytest.raises(ConfigError) as e:
        parse_config(text, "edge.yaml")
    err = e.value
    assert problem in err.problem
    assert err.key == key
    if line is not None:
        assert err.line == line
        assert str(err).startswith(f"edge.yaml:{line}: {key}: " if key else f"edge.yaml:{line}: ")


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.yaml"))


def test_origins_from_command_line():
    cfg = config_from_origins(["http://127.0.0.1:9001", "http://[::1]:9002"])
    assert [o.url for o in cfg.pools["default"].origins] == ["http://127.0.0.1:9001", "http://[::1]:9002"]
    assert all(o.weight == 1 for o in cfg.origins)
    with pytest.raises(ValueError, match="scheme"):
        config_from_origins(["127.0.0.1:9001"])


# -- every mistake of a file, in one refusal -------------------------------------------------------

def mistakes(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(text, "edge.yaml")
    assert str(e.value) == "\n".join(map(str, e.value.mistakes))
    first = e.value.mistakes[0]
    assert (e.value.key, e.value.line, e.value.problem) == (first.key, first.line, first.problem)
    return str(e.value).splitlines()


def test_every_mistake_is_listed_in_file_order():
    text = """\
pools:
  eu: {origins: [{url: 'http://x', weight: 0, bakup: true}], fallback: us}
  us:
    origins: [http://y]
    health: {interval: soon}
    passive: {failures: 0}
routing: {default_pool: eu}
scrub: {strip: ['bad name'], server_header: 5}
cache: {max_size: lots, disk: {path: 7}}
compress: {encodings: [deflate]}
shield:
  waf: {crs: /nowhere}
  timeouts: {idle: 0s}
  bots: {block: [robots]}
access_log: 7
sites:
  a: {hosts: ['a:80']}
  b: {hosts: [b.example], routes: [{path: nope}], hsts: {max_age: never}}
trusted_proxies: [bogus]
buffer_limit: 1KB
firewall: on
"""
    lines = mistakes(text)
    assert lines == [
        "edge.yaml:2: pools.eu.origins[0].bakup: unknown key (known: backup, url, weight)",
        "edge.yaml:2: pools.eu.origins[0].weight: weight must be a whole number from 1 to 1000",
        "edge.yaml:5: pools.us.health.interval: 'soon': expected a duration like 500ms, 10s, 5m or 1h",
        "edge.yaml:6: pools.us.passive.failures: expected a whole number from 1 to 100",
        "edge.yaml:8: scrub.server_header: expected a string, or null to remove the header",     # as read
        "edge.yaml:8: scrub.strip[0]: expected a header name",
        "edge.yaml:9: cache.max_size: 'lots': expected a size like 512KB, 8MB or 1GB",
        "edge.yaml:9: cache.disk.path: expected the directory to keep cached bodies in",
        "edge.yaml:10: compress.encodings[0]: expected one of br, zstd, gzip",
        "edge.yaml:12: shield.waf.crs: /nowhere: no rules/ folder here (Debian: apt-get install modsecurity-crs)",
        "edge.yaml:13: shield.timeouts.idle: must be more than 0",
        "edge.yaml:14: shield.bots.block[0]: expected one of browser, search_engine, scanner, bad, unknown",
        "edge.yaml:15: access_log: expected \"-\" (stdout), a file path, or null",
        "edge.yaml:17: sites.a.hosts[0]: 'a:80': without a port (hosts match whatever the port)",
        "edge.yaml:18: sites.b.routes[0].path: expected a path prefix starting with / (no query, no %, no spaces)",
        "edge.yaml:18: sites.b.hsts.max_age: 'never': expected a duration like 500ms, 10s, 5m or 1h",
        "edge.yaml:19: trusted_proxies[0]: 'bogus' is not an IP address or CIDR",
        "edge.yaml:20: buffer_limit: at least 16KB (smaller bodies are cached and compressed whole)",
        "edge.yaml:21: firewall: unknown key (known: access_log, access_log_format, acme, admin, buffer_limit, "
        "cache, certificates, cluster, compress, default_site, listen, pools, reload, routing, scrub, shield, "
        "shutdown_timeout, sites, trusted_proxies)",
    ]


def test_a_part_set_aside_is_not_reported_again_by_what_refers_to_it():
    """A broken pool or site still exists for its references: one mistake, not five."""
    text = """\
pools:
  eu: {origins: [http://x], fallback: us}
  us: {origins: [ftp://y]}
routing:
  default_pool: us
  geo: {countries: {US: us}, nearest: false}
sites:
  shop: {hosts: [shop.example], routes: [{path: /, pool: us}]}
  blog: {hosts: [nope:1]}
default_site: blog
"""
    assert mistakes(text) == [
        "edge.yaml:3: pools.us.origins[0].url: 'ftp://y': scheme must be http or https",
        "edge.yaml:9: sites.blog.hosts[0]: 'nope:1': without a port (hosts match whatever the port)",
    ]


@pytest.mark.parametrize("text, expected", [
    ("pools: {a: {origins: [http://x]}, b: {origins: [http://y]}}\nrouting: {default_pool: zz}\nadmin: x\n",
     ["edge.yaml:2: routing.default_pool: no pool named 'zz'", "edge.yaml:3: admin: 'x': expected HOST:PORT"]),
    ("pools: {a: {origins: [http://x]}, b: {origins: [http://y]}}\nadmin: x\n",
     ["edge.yaml:1: routing: routing.default_pool is required when there are several pools",
      "edge.yaml:2: admin: 'x': expected HOST:PORT"]),
    ("pools: 5\nadmin: x\n", ["edge.yaml:1: pools: expected a mapping"]),        # no pools: nothing to go on with
    ("pools: {a: {origins: [http://x]}}\npools: {}\nlisten: [1, 1]\n",
     ["edge.yaml:2: pools: duplicate key", "edge.yaml:3: listen[1]: 127.0.0.1:1 is listed twice"]),
])
def test_the_reading_goes_on_where_it_can(text, expected):
    assert mistakes(text) == expected


def test_a_file_of_mistakes_is_read_a_bounded_number_of_times():
    text = "pools:\n" + "".join(f"  p{i}: {{origins: [ftp://x{i}]}}\n" for i in range(200))
    lines = mistakes(text)
    assert len(lines) == MAX_READINGS + 1 and lines[0] == "edge.yaml:2: pools.p0.origins[0].url: 'ftp://x0': scheme must be http or https"
    assert lines[-1] == f"edge.yaml:201: more mistakes may follow (the file was read {MAX_READINGS} times)"
