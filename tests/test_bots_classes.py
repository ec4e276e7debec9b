"""Bot classes from maintained data, the per-class action table, and search engines verified by
forward-confirmed reverse DNS against a real DNS server on loopback."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import pytest
import yaml
from crawlerdetect import CrawlerDetect
from crawleruseragents import CRAWLER_USER_AGENTS_DATA

from addons.config import BOT_CLASSES, ConfigError, parse_config
from addons.shield.botdata import PRECEDENCE, TAG_CLASSES, Index, crs_scanner_names, package_entries
from addons.shield.bots import Challenge, Classifier
from addons.shield.verify import FAILED, UNAVAILABLE, VERIFIED, Verifier, in_domains, operator_domains, parse_resolver
from dnsserver import LoopbackDNS, SilentDNS

GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
BINGBOT = "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)"
GPTBOT = "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.0; +https://openai.com/gptbot)"
SEO = "GingerCrawler/1.0 (Language Assistant for Dyslexics; www.gingersoftware.com/crawler_agent.htm)"
MONITOR = "CapsuleChecker (http://www.capsulink.com/)"
FEED = "Netvibes (crawler/bot; http://www.netvibes.com"
UAP_FIREFOX = Path("/usr/share/uap-core/test_resources/firefox_user_agent_strings.yaml")   # Debian uap-core


def examples(tag: str) -> list[str]:
    """The package's own example User-Agents of the entries tagged `tag`."""
    return [ua for e in CRAWLER_USER_AGENTS_DATA if tag in e.get("tags", ()) for ua in e.get("instances", ())]


def uap_browsers() -> list[str]:
    return [c["user_agent_string"] for c in yaml.safe_load(UAP_FIREFOX.read_text())["test_cases"]]


@pytest.fixture(scope="module")
def classifier():
    return Classifier(())


# -- classes (pure) ---------------------------------------------------------------------------------

def test_the_prefilter_finds_exactly_what_the_full_expressions_find():
    """The index runs only a few expressions per User-Agent; on every example of the package it
    gives the classes that running all ~1,500 expressions gives."""
    entries = package_entries()
    index = Index(entries)
    for ua in (ua for e in CRAWLER_USER_AGENTS_DATA for ua in e.get("instances", ())):
        full = {e.kind for e in entries if (e.regex.search(ua) if e.regex else e.literal in ua)}
        assert index.kinds(ua) == full, ua


def test_crawlerdetect_verdicts_are_kept(classifier):
    """Indexed, crawlerdetect's list still says automated exactly where crawlerdetect does."""
    detector = CrawlerDetect()
    for ua in uap_browsers() + examples("http-library") + examples("browser-automation") + examples("seo")[:200]:
        ours = bool(classifier.crawlers.kinds(classifier.exclusions.sub("", ua).lower()))
        assert ours == detector.isCrawler(ua), ua


@pytest.mark.parametrize("ua, kind", [
    (GPTBOT, "ai_crawler"),
    ("CCBot/2.0 (http://commoncrawl.org/faq/)", "ai_crawler"),
    ("Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; OAI-SearchBot/1.0; +https://openai.com/searchbot)",
     "ai_crawler"),                                                             # ai-crawler and search-engine: AI first
    (SEO, "seo"),
    ("LinkedInBot/1.0 (compatible; Mozilla/5.0; Jakarta Commons-HttpClient/3.1 +http://www.linkedin.com)", "social_preview"),
    (FEED, "feed_reader"),
    (MONITOR, "monitoring"),
    ("ia_archiver (+http://www.alexa.com/site/help/webmasters; crawler@alexa.com)", "archiver"),
    ("TurnitinBot (https://turnitin.com/robot/crawlerinfo.html)", "academic"),
    ("binlar_2.6.3 binlar2.6.3@unspecified.mail", "scanner"),                   # a scanner only the package names
    (GOOGLEBOT, "search_engine"),
    ("Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)", "bad"),   # our list stays: as before
    ("python-requests/2.31.0", "unknown"),                                      # http-library: unknown, as before
])
def test_classes_from_the_package_tags(classifier, ua, kind):
    assert classifier.classify(ua) == kind


def test_every_class_of_the_table_is_a_class_the_classifier_gives():
    assert set(PRECEDENCE) | {"browser", "bad", "unknown"} == set(BOT_CLASSES)
    assert set(TAG_CLASSES.values()) == set(PRECEDENCE)


def test_browsers_from_ua_parsers_test_data_are_browsers(classifier):
    uas = uap_browsers()
    kinds = [classifier.classify(ua) for ua in uas]
    assert len(uas) > 200 and kinds.count("browser") >= 0.95 * len(uas)
    assert not {"scanner", "bad", "ai_crawler"} & set(kinds)


def test_scanner_names_come_from_the_crs_tree_in_use(tmp_path):
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "scanners-user-agents.data").write_text("# scanners\n\nEdgeTestProbe\nfancy scanner/\n")
    names = crs_scanner_names(str(tmp_path))
    assert names == ("EdgeTestProbe", "fancy scanner/")
    with_crs = Classifier(names)
    assert with_crs.classify("edgetestprobe/2.0") == "scanner"                 # @pm: case-insensitive
    assert with_crs.classify("Mozilla/5.0 Fancy Scanner/1") == "scanner"
    fallback = Classifier(crs_scanner_names(str(tmp_path / "nowhere")))        # no tree: the built-in names
    assert fallback.classify("edgetestprobe/2.0") != "scanner"
    assert fallback.classify("sqlmap/1.7.2#stable (https://sqlmap.org)") == "scanner"


def test_operators_and_their_domains():
    assert operator_domains(GOOGLEBOT) == ("googlebot.com", "google.com")
    assert operator_domains(BINGBOT) == ("search.msn.com",)
    assert operator_domains("Mozilla/5.0 (compatible; DuckDuckBot/1.1)") is None     # no rDNS method published
    assert in_domains("crawl-66-249-66-1.googlebot.com.", ("googlebot.com",))
    assert not in_domains("googlebot.com.evil.example.", ("googlebot.com",))
    assert not in_domains("evilgooglebot.com.", ("googlebot.com",))
    assert parse_resolver("127.0.0.1:5353") == ("127.0.0.1", 5353) and parse_resolver("[::1]:53") == ("::1", 53)
    with pytest.raises(ValueError):
        parse_resolver("dns.example:53")


# -- the action table (config) ----------------------------------------------------------------------

def bots_config(text: str):
    return parse_config("pools: {a: {origins: [http://x]}}\nshield:\n  bots:\n"
                        + "".join(f"    {line}\n" for line in text.strip().splitlines()), source="edge.yaml").shield.bots


def test_the_old_keys_map_onto_the_table():
    table = dict(bots_config("block: [scanner, bad]").actions)
    assert table["scanner"] == table["bad"] == table["ai_crawler"] == "block"
    assert table["seo"] == "rate_limit" and table["browser"] == table["search_engine"] == table["unknown"] == "allow"
    table = dict(bots_config("block: [scanner]").actions)
    assert table["bad"] == "allow" and table["ai_crawler"] == "block"         # as before: bad was not blocked
    c = bots_config("challenge: true\nallow: [browser]")
    assert dict(c.actions)["unknown"] == "challenge" and not c.challenge_busy
    c = bots_config("actions: {seo: block, ai_crawler: allow, unknown: challenge}\nbudgets: {}")
    assert dict(c.actions)["seo"] == "block" and dict(c.actions)["ai_crawler"] == "allow"


@pytest.mark.parametrize("text, error", [
    ("block: [scanner]\nactions: {scanner: allow}", "edge.yaml:5: shield.bots.actions.scanner: allow here, but block: says block"),
    ("block: [seo]\nallow: [seo]", "edge.yaml:5: shield.bots.allow[0]: seo is in block too"),
    ("actions: {seo: tarpit}", "edge.yaml:4: shield.bots.actions.seo: expected one of allow, challenge, block, rate_limit"),
    ("actions: {robots: block}", "edge.yaml:4: shield.bots.actions.robots: unknown key"),
    ("budgets: {browser: 10/m}", "edge.yaml:4: shield.bots.budgets.browser: browser is not rate limited"),
    ("budgets: {seo: lots}", "edge.yaml:4: shield.bots.budgets.seo: 'lots': expected a rate"),
    ("resolver: dns.example", "edge.yaml:4: shield.bots.resolver: 'dns.example': expected the resolver's IP address"),
    ("verify_timeout: 0s", "edge.yaml:4: shield.bots.verify_timeout: expected a duration from 1ms to 30s"),
])
def test_table_mistakes_name_the_line(text, error):
    with pytest.raises(ConfigError) as e:
        bots_config(text)
    assert str(e.value).startswith(error), str(e.value)


# -- through a real edge ------------------------------------------------------------------------------

@pytest.fixture
def dns():
    server = LoopbackDNS()
    yield server
    server.stop()


def bot_edge(edge, origin, bots: str, log=None):
    o = origin("o")
    e = edge(f"pools: {{p: {{origins: [{o.url}]}}}}\nshield:\n  bots: {bots}\n", access_log=log)
    return e, o


def get(e, ua: str, source: str = "127.0.0.1", **kw) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source)) as c:
        return c.get(f"{e.url}/echo", headers={"User-Agent": ua}, **kw)


def trace(log: Path) -> list[dict]:
    return [json.loads(line)["edge"] for line in log.read_text().splitlines()]


def test_each_action_is_applied(origin, edge, dns, tmp_path):
    log = tmp_path / "access.log"
    e, o = bot_edge(edge, origin, "{actions: {ai_crawler: block, seo: rate_limit, monitoring: challenge, "
                                  f"feed_reader: allow}}, budgets: {{seo: 6/m}}, resolver: '{dns.address}'}}", str(log))
    assert get(e, GPTBOT).status_code == 403
    assert get(e, SEO).status_code == 200
    limited = get(e, SEO)                                                       # a bucket of 1 at 6/m
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 9
    assert get(e, SEO, source="127.0.0.2").status_code == 200                  # per client address
    with httpx.Client(headers={"User-Agent": MONITOR}) as c:
        first = c.get(f"{e.url}/echo")
        assert first.status_code == 403 and Challenge.COOKIE in c.cookies and "Checking your browser" in first.text
        assert c.get(f"{e.url}/echo").status_code == 200                       # came back with the cookie
    assert get(e, FEED).status_code == 200
    agents = [s.headers.get("user-agent") for s in o.seen]
    assert agents == [SEO, SEO, MONITOR, FEED]
    bots = [(t["bot"], t.get("shield")) for t in trace(log)]
    assert bots[0] == ("ai_crawler", "bots: automated clients of this kind are not served (403)")
    assert bots[2] == ("seo", "bots: too many requests (seo) (429)")
    assert bots[5] == ("monitoring: challenge passed", None)
    assert dns.zone.questions == []                                             # no search engine: no lookup


def test_the_production_setting_refuses_ai_crawlers_and_scanners(origin, edge, dns):
    e, o = bot_edge(edge, origin, f"{{block: [scanner, bad], resolver: '{dns.address}'}}")
    refused = examples("ai-crawler") + examples("scanner")
    with httpx.Client() as c:
        codes = {ua: c.get(f"{e.url}/echo", headers={"User-Agent": ua}).status_code for ua in refused}
        browser = uap_browsers()[0]
        assert c.get(f"{e.url}/echo", headers={"User-Agent": browser}).status_code == 200
    assert {ua for ua, code in codes.items() if code != 403} == set()
    assert [s.headers.get("user-agent") for s in o.seen] == [browser]


def test_search_engines_are_verified_by_forward_confirmed_reverse_dns(origin, edge, dns, tmp_path):
    dns.zone.add("127.0.0.2", "crawl-127-0-0-2.googlebot.com")                  # the real thing
    dns.zone.add("127.0.0.3", "crawler.evil.example")                           # PTR outside Google's domains
    dns.zone.add("127.0.0.4", "crawl-66-249-66-1.googlebot.com", ["66.249.66.1"])   # PTR forged; forward disagrees
    dns.zone.add("127.0.0.6", "msnbot-127-0-0-6.search.msn.com")                # a real bingbot
    #   127.0.0.5 has no PTR record at all
    log = tmp_path / "access.log"
    e, o = bot_edge(edge, origin, f"{{block: [scanner, bad], resolver: '{dns.address}'}}", str(log))
    assert get(e, GOOGLEBOT, "127.0.0.2").status_code == 200
    assert get(e, GOOGLEBOT, "127.0.0.3").status_code == 403
    assert get(e, GOOGLEBOT, "127.0.0.4").status_code == 403
    assert get(e, GOOGLEBOT, "127.0.0.5").status_code == 403
    assert get(e, BINGBOT, "127.0.0.6").status_code == 200
    assert get(e, GOOGLEBOT, "127.0.0.2").status_code == 200                  # from the cache
    assert get(e, GOOGLEBOT, "127.0.0.4").status_code == 403                  # so is a failure
    assert [s.headers["user-agent"] for s in o.seen] == [GOOGLEBOT, BINGBOT, GOOGLEBOT]
    assert dns.zone.asked("PTR").count("2.0.0.127.in-addr.arpa.") == 1        # two requests, one lookup
    assert dns.zone.asked("PTR").count("4.0.0.127.in-addr.arpa.") == 1
    assert dns.zone.asked("A") == ["crawl-127-0-0-2.googlebot.com.", "crawl-66-249-66-1.googlebot.com.",
                                   "msnbot-127-0-0-6.search.msn.com."]        # the evil name is never resolved
    labels = [t["bot"] for t in trace(log)]
    assert labels[:3] == ["search_engine: verified by reverse DNS",
                          "bad: claims a search engine; reverse DNS says otherwise",
                          "bad: claims a search engine; reverse DNS says otherwise"]


def test_a_dns_server_that_does_not_answer_gets_a_503_not_a_403(origin, edge, tmp_path):
    silent = SilentDNS()
    try:
        log = tmp_path / "access.log"
        e, o = bot_edge(edge, origin, f"{{resolver: '{silent.address}', verify_timeout: 200ms}}", str(log))
        r = get(e, GOOGLEBOT, "127.0.0.2")
        assert r.status_code == 503 and r.headers["Retry-After"] == "60"
        assert get(e, uap_browsers()[0], "127.0.0.3").status_code == 200     # everyone else is served meanwhile
        assert len(o.seen) == 1
        first = trace(log)[0]
        assert first["bot"] == "search_engine: not verified (no DNS answer in time)"
        assert first["shield"] == "bots: search engine not verified yet (503)"
    finally:
        silent.stop()


def test_a_fake_search_engine_in_detect_mode_is_only_recorded(origin, edge, dns, tmp_path):
    log = tmp_path / "access.log"
    e, o = bot_edge(edge, origin, f"{{mode: detect, resolver: '{dns.address}'}}", str(log))
    assert get(e, GOOGLEBOT, "127.0.0.7").status_code == 200
    assert get(e, GPTBOT).status_code == 200
    assert [t.get("shield") for t in trace(log)] == ["detect: bots: automated clients of this kind are not served (403)"] * 2
    assert re.fullmatch(r"bad: claims a search engine.*", trace(log)[0]["bot"])


def test_the_verifier_on_ipv6_and_ipv4_mapped_addresses(dns):
    dns.zone.add("::1", "crawl-v6.googlebot.com")                               # PTR, then AAAA
    dns.zone.add("127.0.0.9", "crawl-127-0-0-9.google.com")
    google = operator_domains(GOOGLEBOT)

    async def run():
        v = Verifier(dns.address)
        got = [await v.verify("::1", google, 2.0), await v.verify("::ffff:127.0.0.9", google, 2.0),
               await v.verify("127.0.0.10", google, 2.0), await v.verify("not an address", google, 2.0)]
        both = await asyncio.gather(v.verify("127.0.0.9", google, 2.0), v.verify("127.0.0.9", google, 2.0))
        v.close()
        return got, both, v.lookups

    got, both, lookups = asyncio.run(run())
    assert got == [VERIFIED, VERIFIED, FAILED, FAILED] and UNAVAILABLE not in both
    assert list(both) == [VERIFIED, VERIFIED] and lookups == 5                 # two at once: one lookup
    assert dns.zone.asked("AAAA") == ["crawl-v6.googlebot.com."]


def test_a_reload_keeps_what_the_bots_learnt():
    from addons.shield.addon import Shield
    text = "pools: {a: {origins: [http://x]}}\nshield:\n  bots: {resolver: '127.0.0.1:%d', actions: {seo: rate_limit}}\n"
    shield = Shield(lambda: None, lambda entry: None)
    shield.apply(parse_config(text % 5353))
    verifier, classifier, buckets = shield.verifier, shield.classifier, shield.bot_limits["seo"]
    verifier.cache[("127.0.0.2", ("googlebot.com",))] = VERIFIED
    shield.apply(parse_config(text % 5353))
    assert shield.verifier is verifier and shield.classifier is classifier and shield.bot_limits["seo"] is buckets
    shield.apply(parse_config(text % 5354))                                     # another resolver: asked afresh
    assert shield.verifier is not verifier and shield.verifier.cached("127.0.0.2", ("googlebot.com",)) is None
    shield.apply(parse_config(text.replace("resolver: '127.0.0.1:%d', ", "verify: false, ")))
    assert shield.verifier is None
