"""Domain lists for the forward proxy's policy: hosts files, plain domain lists, adblock filter lists.

Pure (no mitmproxy import): the config parser loads them, the policy asks `matches()`.

- The format is read from the content, not the file name: the first line that only one format
  allows decides (`[Adblock ...]`, `!` comments, `||`, `^`, `@@`, `$`, `##` mean adblock; an IP
  address then a name means a hosts file); a file of bare domains is a plain list. A line the
  detected format does not allow is an error naming FILE:LINE, so a mistyped list fails the
  config instead of silently blocking nothing.
- A listed domain matches itself and every subdomain, never a parent or a sibling: `matches()`
  walks the host's suffixes through a set (microseconds, whatever the list's size; no regex scan).
  Hosts are compared in one form: lower case, no trailing dot, IDN as punycode (UTS #46).
- An entry that is an ICANN public suffix (`com`, `co.uk`) is skipped with a warning naming
  FILE:LINE: it would block every site under it, which in a downloaded list is a mistake, not a
  policy. Private-section suffixes (`github.io`, `blogspot.com`) are the operator's to block whole.
- Adblock lists go through adblock-rust (Brave's engine, PyPI `adblock`) for their full syntax,
  asked only when a url is known (a decrypted or plain-HTTP request); as a proxy knows neither the
  resource type nor the page that asked, it asks with type "other" and the url as its own source,
  so rules bound to a type (`$script`) or to third parties never match. Without a url (a CONNECT
  that is not decrypted) only the `||host^` rules decide (without options, or with only
  `$important`, `$document`, `$all`), `@@||host^` exceptions included; with a url the host
  still decides when the engine finds neither a rule nor an exception for the url (a url it
  cannot parse, or one whose host is not the one the tunnel was opened to). A list of nothing but host
  rules builds no engine: both answers are then the same set lookup. Cosmetic rules (`##`) mean
  nothing to a proxy and are ignored.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import adblock
import idna
from publicsuffixlist import PublicSuffixList

from addons.config import ConfigError

log = logging.getLogger(__name__)

MAX_MISTAKES = 20                          # a list's error names this many bad lines at most
# Names every hosts file carries for the machine itself: not entries of a block list.
HOSTS_BOILERPLATE = frozenset({
    "localhost", "localhost.localdomain", "local", "broadcasthost", "0.0.0.0", "ip6-localhost",
    "ip6-loopback", "ip6-localnet", "ip6-mcastprefix", "ip6-allnodes", "ip6-allrouters", "ip6-allhosts",
})
HOST_RULE_OPTIONS = frozenset({"important", "document", "doc", "all"})   # options that keep a rule host-only
_DOMAIN = re.compile(r"(?:[a-z0-9_-]{1,63}\.)*[a-z0-9_-]{1,63}")
_HOST_RULE = re.compile(r"(@@)?\|\|([^/^$*|]+)\^\|?(?:\$(.+))?")
_COSMETIC = re.compile(r"#@?[$%?]{0,2}#")
_ADBLOCK_MARKS = ("||", "^", "@@", "$", "##", "#@#", "#?#", "#$#")


class ListError(ConfigError):
    """A list file that cannot be read as the format it shows: `FILE:LINE: problem`."""


_psl: PublicSuffixList | None = None


def _is_public_suffix(domain: str) -> bool:
    global _psl
    if _psl is None:
        _psl = PublicSuffixList(only_icann=True)
    return _psl.is_public(domain)


def normalise_host(host: str) -> str | None:
    """The one form hosts are compared in (lower case, no trailing dot or brackets, IDN as
    punycode); None for what is no host name."""
    host = host.strip().rstrip(".").lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        return None
    if not host.isascii():
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            return None
    return host


# For matches(): IDN encoding costs ~20 us, and clients ask for the same hosts again and again.
_normalise_asked = functools.lru_cache(maxsize=4096)(normalise_host)


def _ip(text: str) -> str | None:
    """The IP address `text` spells, in its compressed form, or None."""
    if ":" not in text and not text.rpartition(".")[2].isdigit():      # no TLD is all digits: a name
        return None
    try:
        return ipaddress.ip_address(text.strip("[]")).compressed
    except ValueError:
        return None


def _listed(host: str, domains: frozenset[str] | set[str]) -> bool:
    """Is `host` or one of its parent domains in `domains`? One set lookup per label."""
    while True:
        if host in domains:
            return True
        dot = host.find(".")
        if dot < 0:
            return False
        host = host[dot + 1:]


@dataclass
class DomainList:
    """One named list: `matches(host, url=None)` says whether the policy's list applies."""

    name: str
    source: str
    format: str                                            # "hosts" | "plain" | "adblock"
    domains: frozenset[str] = frozenset()                  # listed with their subdomains
    ips: frozenset[str] = frozenset()                      # IP literals, matched exactly
    important: frozenset[str] = frozenset()                # adblock `||host^$important`: beats exceptions
    exceptions: frozenset[str] = frozenset()               # adblock `@@||host^`
    engine: adblock.Engine | None = None                   # adblock url rules, when the list has some
    rules: int = 0
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.rules

    def matches(self, host: str, url: str | None = None) -> bool:
        """Does the list name this host, or (adblock url rules, when a url is given) this url?"""
        if url is not None and self.engine is not None:
            verdict = self.engine.check_network_urls(url, url, "other")
            if verdict.matched or verdict.exception is not None:
                return verdict.matched
            # nothing in the url: the host still decides (a url the engine cannot parse, or one
            # naming another host than the CONNECT did)
        host = host.lower().rstrip(".")
        if not host.isascii() or host.startswith("["):
            host = _normalise_asked(host) or ""
        address = _ip(host)
        if address is not None:
            return address in self.ips
        if self.important and _listed(host, self.important):
            return True
        if self.exceptions and _listed(host, self.exceptions):
            return False
        return _listed(host, self.domains)


def load_list(path: str, name: str) -> DomainList:
    """Read one list file, its format detected from its content; ListError names FILE:LINE."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise ListError(f"cannot read the list {name!r}: {error.strerror or error}", source=path) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ListError("not UTF-8 text", source=path, line=line) from None
    return parse_list(text, name, path)


def parse_list(text: str, name: str, source: str = "<list>") -> DomainList:
    """A list from its text (`load_list` without the file; also for lists written inline in the config)."""
    lines = text.splitlines()
    kind, decided_at = detect_format(lines)
    parse = {"hosts": _parse_hosts, "plain": _parse_plain, "adblock": _parse_adblock}[kind]
    parsed = parse(lines, name, source, decided_at)
    for warning in parsed.warnings[:5]:
        log.warning("%s", warning)
    if len(parsed.warnings) > 5:
        log.warning("%s: %d more entries skipped the same way", source, len(parsed.warnings) - 5)
    return parsed


def detect_format(lines: Iterable[str]) -> tuple[str, int]:
    """("hosts" | "plain" | "adblock", the line number that decided it, 0 for a plain list)."""
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("!") or line[:8].lower() == "[adblock":
            return "adblock", number
        if line.startswith("#"):
            if _COSMETIC.match(line):
                return "adblock", number
            continue
        if any(mark in line for mark in _ADBLOCK_MARKS) or line.startswith(("|", "/")):
            return "adblock", number
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and _ip(words[0]) is not None:
            return "hosts", number
    return "plain", 0


class _Builder:
    """Collects one list's entries, warnings and mistakes while its lines are read."""

    def __init__(self, name: str, source: str, kind: str, decided_at: int):
        self.name, self.source, self.kind = name, source, kind
        self.detected = f" (a {kind} list, as line {decided_at} shows)" if decided_at else ""
        self.domains: set[str] = set()
        self.ips: set[str] = set()
        self.warnings: list[str] = []
        self.mistakes: list[ListError] = []

    def mistake(self, number: int, problem: str) -> None:
        if len(self.mistakes) < MAX_MISTAKES:
            self.mistakes.append(ListError(problem + self.detected, source=self.source, line=number))

    def domain(self, number: int, entry: str) -> str | None:
        """The entry as a listed domain, or None (a mistake or a warning is recorded)."""
        domain = normalise_host(entry)
        if domain is None or len(domain) > 253 or not _DOMAIN.fullmatch(domain):
            self.mistake(number, f"{entry!r} is not a domain name")
            return None
        if _is_public_suffix(domain):
            self.warnings.append(f"{self.source}:{number}: {entry!r} skipped: a public suffix "
                                 f"(it would match every site under it)")
            return None
        return domain

    def add(self, number: int, entry: str) -> None:
        """One hosts/plain entry: an IP literal, or a domain (a `*.` or `.` prefix changes nothing)."""
        address = _ip(entry)
        if address is not None:
            self.ips.add(address)
            return
        domain = self.domain(number, entry.removeprefix("*.").removeprefix("."))
        if domain is not None:
            self.domains.add(domain)

    def done(self, **extra) -> DomainList:
        if self.mistakes:
            raise ListError.of(self.mistakes)
        rules = extra.pop("rules", len(self.domains) + len(self.ips))
        return DomainList(self.name, self.source, self.kind, frozenset(self.domains), frozenset(self.ips),
                          rules=rules, warnings=self.warnings, **extra)


def _worded(lines: list[str]) -> Iterable[tuple[int, str, list[str]]]:
    """(line number, line, its words before a `#` comment) for each line that has words."""
    for number, raw in enumerate(lines, 1):
        words = raw.split("#", 1)[0].split()
        if words:
            yield number, raw, words


def _parse_hosts(lines: list[str], name: str, source: str, decided_at: int) -> DomainList:
    """`ADDRESS NAME [NAME...]` lines, `#` comments; the address is not looked at."""
    build = _Builder(name, source, "hosts", decided_at)
    for number, raw, words in _worded(lines):
        if len(words) < 2 or _ip(words[0]) is None:
            build.mistake(number, f"expected 'ADDRESS HOST', got {raw.strip()!r}")
            continue
        for entry in words[1:]:
            if entry.lower() not in HOSTS_BOILERPLATE:
                build.add(number, entry)
    return build.done()


def _parse_plain(lines: list[str], name: str, source: str, decided_at: int) -> DomainList:
    """One domain (or IP address) a line, `#` comments."""
    build = _Builder(name, source, "plain", decided_at)
    for number, raw, words in _worded(lines):
        if len(words) > 1:
            build.mistake(number, f"expected one domain, got {raw.strip()!r}")
            continue
        build.add(number, words[0])
    return build.done()


def _parse_adblock(lines: list[str], name: str, source: str, decided_at: int) -> DomainList:
    """Network rules to adblock-rust; `||host^` rules also to the host sets."""
    build = _Builder(name, source, "adblock", decided_at)
    important: set[str] = set()
    exceptions: set[str] = set()
    network: list[str] = []
    url_rules = False
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith(("!", "[", "#")) or _COSMETIC.search(line):
            continue
        rule = _HOST_RULE.fullmatch(line)
        if rule is None:
            network.append(line)
            url_rules = True
            continue
        exception, host, options = rule.groups()
        domain = build.domain(number, host)
        if domain is None:
            continue
        network.append(line)
        names = {option.strip().lower() for option in options.split(",")} if options else set()
        if not names <= HOST_RULE_OPTIONS:
            url_rules = True                     # e.g. $third-party, $script, $domain=: the engine's alone
        elif exception:
            exceptions.add(domain)
        elif "important" in names:
            important.add(domain)
        else:
            build.domains.add(domain)
    engine = None
    if url_rules:
        filters = adblock.FilterSet()
        filters.add_filters(network)
        engine = adblock.Engine(filters, optimize=True)
    return build.done(important=frozenset(important), exceptions=frozenset(exceptions), engine=engine,
                      rules=len(network))
