"""Is this really Googlebot? Forward-confirmed reverse DNS, cached. No mitmproxy import.

The method Google and Bing document: the PTR name of the client address must end in the
operator's domain (googlebot.com, google.com; search.msn.com; ...), and that name's A/AAAA
records must contain the address (a PTR record is whatever the owner of the address block
writes; only the forward lookup, in the operator's zone, proves it). Any User-Agent can say
Googlebot, so a claim that fails is `bad`.

Outcomes, each cached for its own time (bounded in count):
  verified     6 h      the operator's own crawler
  failed       1 h      no PTR, a PTR outside the operator's domains, or a forward lookup that
                        does not contain the address (the classic spoof)
  unavailable  30 s     the DNS did not answer in time (timeout, SERVFAIL, no server): nothing
                        is known, so nothing is trusted, but it is not called a spoof either
Only search engines whose operator documents this method are checked; a claim of another one
is believed by name (and `allow` never skips the rate limit or the WAF).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

from cachetools import TLRUCache

from addons.net import parse_ip

logger = logging.getLogger("edge")

VERIFIED, FAILED, UNAVAILABLE = "verified", "failed", "unavailable"
TTL = {VERIFIED: 6 * 3600.0, FAILED: 3600.0, UNAVAILABLE: 30.0}
MAX_ENTRIES = 50_000          # cached outcomes (client address, operator)
MAX_PENDING = 256             # lookups in flight at once; beyond, a claim is `unavailable` at once
LOOKUP_LIFETIME = 5.0         # seconds one lookup (PTR, then A/AAAA) may take in all, in the background

# (User-Agent names, lower case) -> the domains their operator's crawlers resolve in
OPERATORS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("googlebot", "google-inspectiontool", "adsbot-google", "mediapartners-google", "storebot-google",
      "googleother", "apis-google", "feedfetcher-google"), ("googlebot.com", "google.com")),
    (("bingbot", "msnbot", "adidxbot", "bingpreview"), ("search.msn.com",)),
    (("applebot",), ("applebot.apple.com",)),
    (("yandexbot", "yandeximages", "yandexmobilebot"), ("yandex.ru", "yandex.net", "yandex.com")),
    (("baiduspider",), ("baidu.com", "baidu.jp")),
    (("yahoo! slurp",), ("crawl.yahoo.net",)),
    (("seznambot",), ("seznam.cz",)),
    (("petalbot",), ("petalsearch.com", "aspiegel.com")),
)


def operator_domains(user_agent: str) -> tuple[str, ...] | None:
    """The domains a search-engine User-Agent must resolve in, or None when its operator
    documents no such check."""
    ua = user_agent.lower()
    for names, domains in OPERATORS:
        if any(n in ua for n in names):
            return domains
    return None


def in_domains(name: str, domains: tuple[str, ...]) -> bool:
    """True if `name` (a PTR target) is one of `domains` or below one of them."""
    name = name.rstrip(".").lower()
    return any(name == d or name.endswith("." + d) for d in domains)


def parse_resolver(text: str) -> tuple[str, int]:
    """HOST:PORT or [V6]:PORT or HOST -> (host, port); ValueError if it is not an address."""
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ValueError(f"{text!r}: expected HOST:PORT, like 127.0.0.1:53")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        if not p.isdigit():
            raise ValueError(f"{text!r}: expected HOST:PORT, like 127.0.0.1:53")
        port = int(p)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: expected the resolver's IP address (and :PORT)") from None
    if not 0 < port < 65536:
        raise ValueError(f"{text!r}: the port must be from 1 to 65535")
    return host, port


class Verifier:
    """Forward-confirmed reverse DNS of client addresses, one lookup per address in flight,
    outcomes cached."""

    def __init__(self, resolver: str | None = None) -> None:
        self.address = resolver
        self.cache: TLRUCache = TLRUCache(MAX_ENTRIES, ttu=lambda key, outcome, now: now + TTL[outcome])
        self.pending: dict[tuple, asyncio.Task] = {}
        self.lookups = 0                      # lookups started (for the trace of tests and benches)
        self._resolver = None

    def resolver(self):
        if self._resolver is None:
            import dns.asyncresolver
            if self.address is None:
                r = dns.asyncresolver.Resolver()          # the system's (/etc/resolv.conf)
            else:
                host, port = parse_resolver(self.address)
                r = dns.asyncresolver.Resolver(configure=False)
                r.nameservers, r.port = [host], port
            r.lifetime, r.timeout = LOOKUP_LIFETIME, LOOKUP_LIFETIME / 2
            self._resolver = r
        return self._resolver

    def cached(self, ip: str, domains: tuple[str, ...]) -> str | None:
        return self.cache.get((ip, domains))

    async def verify(self, ip: str, domains: tuple[str, ...], wait: float) -> str:
        """The outcome for `ip`, waiting at most `wait` seconds for a lookup; a lookup still
        running then goes on in the background and its outcome is cached for the next request."""
        outcome = self.cached(ip, domains)
        if outcome is not None:
            return outcome
        task = self.start(ip, domains)
        if task is None:
            return UNAVAILABLE
        try:
            return await asyncio.wait_for(asyncio.shield(task), wait)
        except TimeoutError:
            return UNAVAILABLE

    def start(self, ip: str, domains: tuple[str, ...]) -> asyncio.Task | None:
        """The lookup for (ip, domains), started unless one is in flight; None when too many are."""
        key = (ip, domains)
        task = self.pending.get(key)
        if task is None:
            if len(self.pending) >= MAX_PENDING:
                return None
            self.lookups += 1
            task = self.pending[key] = asyncio.get_running_loop().create_task(self._lookup(ip, domains))
        return task

    async def _lookup(self, ip: str, domains: tuple[str, ...]) -> str:
        try:
            outcome = await self.check(ip, domains)
        except Exception as e:             # never lets a lookup die unrecorded
            logger.warning("edge bots: reverse DNS check of %s failed: %s: %s", ip, type(e).__name__, e)
            outcome = UNAVAILABLE
        finally:
            self.pending.pop((ip, domains), None)
        self.cache[(ip, domains)] = outcome
        return outcome

    async def check(self, ip: str, domains: tuple[str, ...]) -> str:
        """One forward-confirmed reverse lookup."""
        import dns.exception
        import dns.resolver
        resolver = self.resolver()
        address = parse_ip(ip)                      # an IPv4-mapped IPv6 address is its IPv4 one
        if address is None:
            return FAILED
        rdtype = "AAAA" if address.version == 6 else "A"
        try:
            names = [r.target.to_text() for r in await resolver.resolve_address(str(address))]
            for name in names:
                if not in_domains(name, domains):
                    continue
                try:
                    forward = await resolver.resolve(name, rdtype)
                except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                    continue
                if any(ipaddress.ip_address(r.address) == address for r in forward):
                    return VERIFIED
            return FAILED
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return FAILED                  # the address has no PTR record: not the operator's crawler
        except (dns.exception.Timeout, dns.resolver.NoNameservers, OSError):
            return UNAVAILABLE

    def close(self) -> None:
        for task in self.pending.values():
            task.cancel()
        self.pending.clear()
