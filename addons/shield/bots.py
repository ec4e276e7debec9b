"""Who is knocking: user-agent classes, behaviour, and a cookie challenge. Pure.

Classes: browser, search_engine, scanner, bad, unknown, and from the tags of the maintained
`crawler-user-agents` list: ai_crawler, seo, advertising, social_preview, feed_reader,
monitoring, archiver, academic (botdata.py matches them fast). Scanners are also the names the
CRS tree in use lists (`scanners-user-agents.data`) and our own. crawlerdetect (another
maintained list) catches automated clients none of these name: `unknown`, as are HTTP
libraries and headless browsers; ua-parser says which browser a human one claims. A few names
stay ours: search engines, scanners, and scrapers that are commonly refused (`bad`).

A User-Agent can be forged: a search engine whose operator documents a reverse DNS check is
verified (verify.py) and is `bad` when it fails; the others are believed by name, which is why
`allow` never bypasses the rate limit or the WAF.

Behaviour overrides the name: a client that asks for a trap path (a WordPress login on a site
without WordPress, /.env, /.git/config), or whose answers are mostly 404s, is `bad` for a while;
one that asks faster than people browse is `busy` (challenged, when the challenge is on).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from dataclasses import dataclass
from functools import lru_cache

from cachetools import TTLCache

from addons.config import DEFAULT_CRS
from addons.shield.botdata import (DATA_CLASSES, Index, crawlerdetect_entries, crs_scanner_names, name_entries,
                                   package_entries)

SCANNERS = ("sqlmap", "nikto", "nmap", "masscan", "zgrab", "nuclei", "wpscan", "dirbuster", "gobuster", "ffuf",
            "feroxbuster", "wfuzz", "acunetix", "nessus", "openvas", "w3af", "arachni", "skipfish", "burpsuite",
            "owasp zap", "zaproxy", "jaeles", "whatweb", "commix", "netsparker", "zmeu", "morfeus")
SEARCH_ENGINES = ("googlebot", "google-inspectiontool", "adsbot-google", "mediapartners-google", "storebot-google",
                  "bingbot", "adidxbot", "duckduckbot", "baiduspider", "yandexbot", "yandeximages", "applebot",
                  "slurp", "sogou", "seznambot", "qwantify", "qwantbot", "petalbot", "naverbot", "yeti", "daum",
                  "exabot", "mojeekbot")
BAD = ("ahrefsbot", "semrushbot", "mj12bot", "dotbot", "blexbot", "megaindex", "bytespider", "dataforseobot",
       "serpstatbot", "zoominfobot", "barkrowler", "seekportbot", "mauibot", "linkpadbot", "aspiegelbot")
BAD_FOR = 600.0             # seconds a client stays `bad` after misbehaving
WINDOW = 60.0               # seconds over which answers are counted for the 404 share
MIN_ANSWERS, MAX_404_SHARE = 20, 0.5
BUSY = 120                  # requests within WINDOW: faster than people browse; challenged when on


class Classifier:
    """User-Agent -> class, from the package's tagged expressions, the CRS tree's scanner
    names and ours; the last 8192 answers are remembered."""

    def __init__(self, scanner_names: tuple[str, ...] = ()) -> None:
        self.data = Index(package_entries())
        self.names = Index(name_entries(SCANNERS + scanner_names, "scanner")
                           + name_entries(SEARCH_ENGINES, "search_engine") + name_entries(BAD, "bad"))
        self.exclusions, crawlers = crawlerdetect_entries()
        self.crawlers = Index(crawlers)
        self.classify = lru_cache(maxsize=8192)(self._classify)

    def _classify(self, user_agent: str) -> str:
        ua = user_agent.strip()
        if not ua:
            return "bad"                        # no browser sends none
        named, data = self.names.kinds(ua.lower()), self.data.kinds(ua)
        if "scanner" in named or "scanner" in data:
            return "scanner"
        if "ai_crawler" in data:
            return "ai_crawler"
        if "search_engine" in named or "search_engine" in data:
            return "search_engine"
        if "bad" in named:
            return "bad"
        for kind in DATA_CLASSES:
            if kind in data:
                return kind
        if self.crawlers.kinds(self.exclusions.sub("", ua).lower()):
            return "unknown"                    # scripts, libraries and other crawlers (crawlerdetect)
        return "browser" if _browser(user_agent) else "unknown"


_default: Classifier | None = None


def classify(user_agent: str) -> str:
    """The class a User-Agent claims (the scanner names of Debian's CRS, if installed)."""
    global _default
    if _default is None:
        _default = Classifier(crs_scanner_names(DEFAULT_CRS))
    return _default.classify(user_agent)


def _browser(user_agent: str) -> bool:
    import ua_parser
    result = ua_parser.parse_user_agent(user_agent)
    return result is not None and result.family not in ("Other", "")


@dataclass
class Seen:
    window_start: float
    requests: int = 0
    answers: int = 0
    not_found: int = 0
    bad_until: float = 0.0
    why: str = ""


class Behaviour:
    """What each client IP has been doing lately, bounded in memory (idle clients forgotten)."""

    def __init__(self, trap_paths: tuple[str, ...], max_clients: int = 100_000) -> None:
        self.set_traps(trap_paths)
        self.seen: TTLCache[str, Seen] = TTLCache(max_clients, ttl=BAD_FOR)

    def set_traps(self, trap_paths: tuple[str, ...]) -> None:
        """The trap paths (a reload may change them; what clients did is kept)."""
        self.traps = frozenset(p.rstrip("/") or "/" for p in trap_paths)

    def _get(self, ip: str, now: float) -> Seen:
        s = self.seen.get(ip)
        if s is None:
            s = self.seen[ip] = Seen(now)
        return s

    def _window(self, s: Seen, now: float) -> None:
        if now - s.window_start > WINDOW:
            s.window_start, s.requests, s.answers, s.not_found = now, 0, 0, 0

    def requested(self, ip: str, path: str, now: float) -> str | None:
        """Why this client counts as bad now (a trap just sprung, or earlier misbehaviour)."""
        s = self._get(ip, now)
        self._window(s, now)
        s.requests += 1
        if path.split("?", 1)[0].rstrip("/") in self.traps:
            s.bad_until, s.why = now + BAD_FOR, f"trap path {path.split('?', 1)[0]}"
        self.seen[ip] = s                       # refresh its time to live
        return s.why if now < s.bad_until else None

    def busy(self, ip: str) -> bool:
        s = self.seen.get(ip)
        return s is not None and s.requests >= BUSY

    def answered(self, ip: str, status: int, now: float) -> None:
        s = self._get(ip, now)
        self._window(s, now)
        s.answers += 1
        s.not_found += status == 404
        if s.answers >= MIN_ANSWERS and s.not_found / s.answers >= MAX_404_SHARE:
            s.bad_until, s.why = now + BAD_FOR, f"{s.not_found} of {s.answers} answers were 404"


class Challenge:
    """A signed, expiring cookie a suspicious client must bring back: HMAC-SHA256 over the
    client IP and the expiry. A client that keeps cookies passes once per `ttl`; a script that
    does not, or that moves to another address, does not."""

    COOKIE = "edge_challenge"

    def __init__(self, secret: bytes | None = None, ttl: float = 3600.0) -> None:
        self.secret = secret or os.urandom(32)      # per process unless given
        self.ttl = ttl

    def _sign(self, ip: str, expiry: int) -> str:
        return hmac.new(self.secret, f"{ip}|{expiry}".encode(), hashlib.sha256).hexdigest()[:32]

    def issue(self, ip: str, now: float | None = None) -> str:
        expiry = int((now if now is not None else time.time()) + self.ttl)
        return f"{expiry}.{self._sign(ip, expiry)}"

    def valid(self, token: str | None, ip: str, now: float | None = None) -> bool:
        if not token or "." not in token:
            return False
        expiry_text, _, signature = token.partition(".")
        if not expiry_text.isdigit() or int(expiry_text) < (now if now is not None else time.time()):
            return False
        return hmac.compare_digest(signature, self._sign(ip, int(expiry_text)))

    def page(self, path: str) -> bytes:
        return (b"<!doctype html><html><head><meta charset=utf-8><title>One moment</title>"
                b"<meta http-equiv=refresh content=1></head><body><p>Checking your browser before "
                b"continuing. This page reloads by itself; cookies must be enabled.</p></body></html>\n")
