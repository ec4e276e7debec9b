"""User-Agent classes from maintained data, matched fast. Pure.

The data: the `crawler-user-agents` package (the monperrus list: some 1,500 regular
expressions, each tagged search-engine, ai-crawler, seo, scanner, ...), the scanner names of the
CRS tree in use (`rules/scanners-user-agents.data`, which the CRS matches with @pmFromFile:
case-insensitive substrings), and our own short lists (bots.py).

Fast: one alternation of 1,500 expressions costs ~280 µs per User-Agent in Python's `re` (it
tries every branch at every position). Each expression is indexed instead by a literal it
cannot match without (the longest run of plain characters outside any branch or repeat), keyed
by that literal's first three characters; a User-Agent's own three-character windows pick the
few expressions worth running. Expressions without such a literal (a handful) always run.
"""

from __future__ import annotations

import os
import re
import re._constants as sre_constants
import re._parser as sre_parse
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

GRAM = 3
# package tags -> our classes. http-library and browser-automation stay `unknown` (scripts,
# libraries, headless browsers: what `unknown` always meant, and what `challenge: true` asks for).
TAG_CLASSES = {"scanner": "scanner", "ai-crawler": "ai_crawler", "search-engine": "search_engine",
               "seo": "seo", "advertising": "advertising", "social-preview": "social_preview",
               "feed-reader": "feed_reader", "monitoring": "monitoring", "archiver": "archiver",
               "academic": "academic"}
# an expression with two tags takes the first of them here: an AI search bot (OAI-SearchBot,
# PerplexityBot) is an AI crawler first; blocking it costs no place in Google's or Bing's index
PRECEDENCE = ("scanner", "ai_crawler", "search_engine", "advertising", "seo", "social_preview",
              "feed_reader", "monitoring", "archiver", "academic")
DATA_CLASSES = PRECEDENCE


def required_literal(pattern: str, ignore_case: bool = False) -> str:
    """The longest run of plain characters every match of `pattern` contains ('' if none)."""
    try:
        parsed = sre_parse.parse(pattern, re.IGNORECASE if ignore_case else 0)
    except re.error:
        return ""
    if parsed.state.flags & re.IGNORECASE and not ignore_case:
        return ""                                   # (?i) inside: the literal's case says nothing
    best, run = "", []

    def walk(items) -> None:
        nonlocal best, run
        for op, arg in items:
            if op is sre_constants.LITERAL:
                run.append(chr(arg))
                continue
            if op is sre_constants.SUBPATTERN and not arg[1] and not arg[2]:   # a plain group: still in sequence
                walk(arg[3])
                continue
            if op is sre_constants.AT:                  # ^, $, \b take no characters
                continue
            best, run = max(best, "".join(run), key=len), []
        best = max(best, "".join(run), key=len)

    walk(parsed)
    best = max(best, "".join(run), key=len)
    return best


@dataclass(frozen=True)
class Entry:
    literal: str                 # in the case the text is searched in
    regex: re.Pattern | None     # None: the literal alone decides
    kind: str


class Index:
    """Entries looked up by the three-character windows of a text."""

    def __init__(self, entries: Iterable[Entry]) -> None:
        self.by_gram: dict[str, list[Entry]] = defaultdict(list)
        self.always: list[Entry] = []
        for e in entries:
            (self.by_gram[e.literal[:GRAM]] if len(e.literal) >= GRAM else self.always).append(e)
        self.by_gram = dict(self.by_gram)

    def kinds(self, text: str) -> set[str]:
        """The classes of every entry that matches `text`."""
        found = set()
        grams = {text[i:i + GRAM] for i in range(len(text) - GRAM + 1)}
        for gram in grams & self.by_gram.keys():
            for e in self.by_gram[gram]:
                if e.kind not in found and e.literal in text and (e.regex is None or e.regex.search(text)):
                    found.add(e.kind)
        for e in self.always:
            if e.kind not in found and (e.regex.search(text) if e.regex is not None else e.literal in text):
                found.add(e.kind)
        return found


def package_entries(data: list[dict] | None = None) -> list[Entry]:
    """The crawler-user-agents expressions that carry a tag we class by (case-sensitive, as
    the package means them)."""
    if data is None:
        from crawleruseragents import CRAWLER_USER_AGENTS_DATA as data
    entries = []
    for item in data:
        kinds = [TAG_CLASSES[t] for t in item.get("tags", ()) if t in TAG_CLASSES]
        if not kinds:
            continue
        kind = min(kinds, key=PRECEDENCE.index)
        pattern = item["pattern"]
        literal = required_literal(pattern)
        plain = re.escape(literal) == pattern or literal == pattern
        entries.append(Entry(literal, None if plain else re.compile(pattern), kind))
    return entries


def crawlerdetect_entries() -> tuple[re.Pattern, list[Entry]]:
    """crawlerdetect's list, the same verdicts as its isCrawler (which strips its exclusions,
    then searches one alternation of ~1,300 expressions): the exclusions, and the expressions
    as `unknown` entries, case-insensitive (searched in the lowered text). A leading `[...]*`
    is dropped: it changes where a match starts, never whether there is one."""
    from crawlerdetect.providers.crawlers import data as crawlers
    from crawlerdetect.providers.exclusions import data as exclusions
    entries = []
    for pattern in crawlers:
        pattern = re.sub(r"^\[[^\]]*\]\*", "", pattern)
        entries.append(Entry(required_literal(pattern, ignore_case=True).lower(),
                             re.compile(pattern, re.IGNORECASE), "unknown"))
    return re.compile("|".join(exclusions), re.IGNORECASE), entries


def name_entries(names: Iterable[str], kind: str) -> list[Entry]:
    """Plain names matched as case-insensitive substrings (searched in the lowered text)."""
    return [Entry(n.lower(), None, kind) for n in names if n.strip()]


def crs_scanner_names(crs: str | None) -> tuple[str, ...]:
    """The scanner User-Agents of a CRS tree (`rules/scanners-user-agents.data`, one name a
    line, # comments); () when the tree or the file is not there."""
    if not crs:
        return ()
    try:
        with open(os.path.join(crs, "rules", "scanners-user-agents.data"), encoding="utf-8", errors="replace") as f:
            return tuple(line.strip() for line in f if line.strip() and not line.lstrip().startswith("#"))
    except OSError:
        return ()
