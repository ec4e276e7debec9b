"""What mitmweb shows of a flow when it is the edge's console: one verdict (a few words and a
marker for the flow list), the decisions one per line for the Comment tab, and the public URL
the client asked split into the parts mitmweb's flow list renders. Plain functions, no
mitmproxy."""

from __future__ import annotations

from dataclasses import dataclass

# One marker per verdict, only for verdicts worth finding in a long list (`~marked`, `~marker
# zap`): a plain miss or forward carries none.
MARKS = {
    "failed closed": ":warning:",   # a hook of the edge raised: the client got a 5xx
    "refused": ":no_entry:",        # the edge answered 4xx itself: shield, unknown host, no route
    "error": ":x:",                 # no origin answered properly (502/503/504), or the exchange broke
    "detected": ":eyes:",           # the shield in detect mode would have refused it
    "failed over": ":repeat:",      # an origin failed before answering; another one did
    "hit": ":zap:",                 # answered from the cache
}

# The decisions that say why the edge answered a request itself, in the order they are looked at.
REASONS = ("shield", "tls", "protocol", "site", "route", "redirect", "upstream", "failed")
MISSES = frozenset({"uri-miss", "vary-miss", "miss", "stale", "request"})   # the cache forwarded
DEFAULT_PORTS = {"http": 80, "https": 443}
# Verdicts whose answer did not come from an origin: an origin a route chose is shown bare, not
# with a path as if it had been asked (the WAF refuses after routing).
NO_ORIGIN = frozenset({"refused", "hit", "answered"})


@dataclass(frozen=True)
class Verdict:
    word: str           # refused, hit, miss, forwarded, failed over, error, failed closed, detected, answered
    mark: str           # mitmproxy's marker (":zap:"), "" for none
    headline: str       # the comment's first line


def refusing(shield: str | None) -> bool:
    """A shield decision that refused the request (detect mode and the allow list do not)."""
    return bool(shield) and not shield.startswith(("detect", "allow"))


def _reason(rec: dict) -> str:
    for key in REASONS:
        if rec.get(key):
            return f"{key}: {_short(rec[key])}"
    return ""


def verdict(rec: dict, status: int | None, by_edge: bool, error: str | None, cache: str) -> Verdict:
    """The flow's verdict from its decision record. `status`: the client's (None: no answer);
    `by_edge`: the edge made that answer itself; `error`: mitmproxy's error for the flow;
    `cache`: the cache's verdict (trace.cache_verdict: hit, uri-miss, ..., none)."""
    extra = ", streamed" if rec.get("stream") else ""
    to = " → " + " ".join(filter(None, (rec.get("pool"), rec["origin"]))) if rec.get("origin") else ""
    if rec.get("failed"):
        word, why = "failed closed", f"failed: {rec['failed']}"
    elif refusing(rec.get("shield")) or (by_edge and status is not None and 400 <= status < 500):
        word, why = "refused", _reason(rec)
    elif status is None or (by_edge and status >= 500) or error:
        word, why = "error", _reason(rec) or (error or "")
    elif str(rec.get("shield", "")).startswith("detect"):
        word, why = "detected", f"shield: {rec['shield']}"
    elif rec.get("failover") and not by_edge:
        tried = ", ".join(str(f).split(" ", 1)[0] for f in rec["failover"])
        word, why = "failed over", f"after {tried}"
    elif cache == "hit":
        word, why, to = "hit", "", ""
    elif by_edge:
        word, why, to = "answered", _reason(rec), ""
    else:
        word, why = ("miss" if cache in MISSES else "forwarded"), ""
    if word in ("refused", "error", "failed closed"):
        to, extra = "", ""
    headline = f"{word}{extra}{to}" + (f" ({why})" if why else "")
    return Verdict(word, MARKS.get(word, ""), headline)


def _short(value) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items() if v is not None)
    return str(value)


def comment(v: Verdict, rec: dict, origin_url: str | None = None, host_field: str | None = None) -> str:
    """The verdict's headline, then each decision on a line of its own. `rec`: the decisions
    without the facts the flow shows anyway; `origin_url`: what the origin was asked (its URL
    and the path sent), in place of the chosen origin's bare URL; `host_field`: the request's
    Host field (what an origin got) when it is not the public host the flow now shows (a
    trusted proxy's X-Forwarded-Host)."""
    lines = [v.headline]
    for key, value in rec.items():
        if value in (None, [], "", {}):
            continue
        if key == "origin" and origin_url and v.word not in NO_ORIGIN:
            value = origin_url
        lines.append(f"{key}: {_short(value)}")
    if host_field:
        lines.append(f"request Host: {host_field}")
    return "\n".join(lines)


def public_parts(url: str) -> tuple[str, str, int, str, str] | None:
    """(scheme, host, port, path, authority) of `scheme://authority/path` (the public URL the
    edge recorded, addons/client.public_base), or None when it cannot be split: the flow then
    keeps the URL it has."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in DEFAULT_PORTS:
        return None
    cut = rest.find("/")
    if cut < 0:                                 # OPTIONS * : the path is the asterisk
        authority, path = (rest[:-1], "*") if rest.endswith("*") else (rest, "/")
    else:
        authority, path = rest[:cut], rest[cut:]
    if authority.startswith("["):
        host, close, tail = authority[1:].partition("]")
        if not close or (tail and not tail.startswith(":")):
            return None
        port_text = tail[1:]
    elif authority.count(":") == 1:
        host, _, port_text = authority.partition(":")
    elif ":" in authority:
        return None
    else:
        host, port_text = authority, ""
    if not host:
        return None
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            return None
        port = int(port_text)
    else:
        port = DEFAULT_PORTS[scheme]
    return scheme, host, port, path, authority


def listen_address(addrs: list[tuple]) -> tuple[str, int] | None:
    """What mitmweb's status bar should name: the first listener's bound (host, port).
    mitmweb renders the global listen_host/listen_port options there ("*:8080" when unset);
    the edge names each listener's address in its mode spec instead, so those stay unset."""
    if not addrs:
        return None
    host, port = addrs[0][:2]
    return host, port
