"""The activity log's report: who went where, how much, what was blocked (`edge forward report`).

Pure (no mitmproxy import). `read_log()` streams the JSON lines once into counters, so a log of
millions of lines needs memory for its distinct domains and users only; `render_text()` and
`render_html()` draw one `Report`. The HTML is one self-contained file: inline CSS, charts as
inline SVG drawn here, no script, nothing fetched. Every string that came from the log (hosts,
user names, rules) is escaped: the log records what clients sent, and a report is opened in a
browser.

- A line that is not a JSON object with the fields the report reads (INTERFACES.md "Forward
  mode") is skipped and counted; a last line without its newline is counted apart (the proxy may
  be writing it).
- Domains are counted by registrable domain (`www.example.co.uk` and `cdn.example.co.uk` are
  `example.co.uk`), addresses and public suffixes as they are; a user is the authenticated name,
  or the client address when the proxy asks for none.
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from publicsuffixlist import PublicSuffixList

ACTIONS = ("allow", "block", "log", "intercept")
TIME_STEPS = (60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400)   # the timeline's bucket widths, seconds
TIMELINE_BUCKETS = 48                                            # at most this many bars
_psl: PublicSuffixList | None = None


def registrable(host: str) -> str:
    """The domain a host belongs to, as people name a site (`www.bbc.co.uk` -> `bbc.co.uk`)."""
    global _psl
    if _psl is None:
        _psl = PublicSuffixList()
    host = host.lower().rstrip(".")
    if ":" in host or host.rpartition(".")[2].isdigit():
        return host
    return _psl.privatesuffix(host) or host


def parse_time(value: str) -> datetime:
    """An ISO 8601 time with its zone (`2026-12-01T12:00:00.000Z`) as an aware UTC datetime."""
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone")
    return moment.astimezone(UTC)


@dataclass
class Report:
    """What one pass over the log counted (only lines at or after `since`)."""

    since: datetime | None = None
    lines: int = 0                                  # lines read, blank ones aside
    skipped: int = 0                                # malformed lines, the truncated last one included
    truncated: bool = False                         # the last line had no newline and did not parse
    older: int = 0                                  # well-formed lines before `since`
    first: datetime | None = None
    last: datetime | None = None
    requests: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    actions: Counter = field(default_factory=Counter)
    domain_requests: Counter = field(default_factory=Counter)
    domain_bytes: Counter = field(default_factory=Counter)
    user_requests: Counter = field(default_factory=Counter)
    user_bytes: Counter = field(default_factory=Counter)
    blocks: Counter = field(default_factory=Counter)            # (rule, category) -> blocked requests
    blocked_domains: Counter = field(default_factory=Counter)
    minutes: Counter = field(default_factory=Counter)           # (minute since the epoch, blocked?) -> requests

    @property
    def bytes(self) -> int:
        return self.bytes_in + self.bytes_out

    def add(self, entry: dict) -> None:
        """Count one well-formed entry (see `entry_fields`)."""
        moment, user, client, host, action, bytes_in, bytes_out, rule, category = entry_fields(entry)
        if self.since is not None and moment < self.since:
            self.older += 1
            return
        self.first = moment if self.first is None else min(self.first, moment)
        self.last = moment if self.last is None else max(self.last, moment)
        size = bytes_in + bytes_out
        domain = registrable(host)
        who = user if user is not None else f"{client} (no user)"
        self.requests += 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        self.actions[action] += 1
        self.domain_requests[domain] += 1
        self.domain_bytes[domain] += size
        self.user_requests[who] += 1
        self.user_bytes[who] += size
        blocked = action == "block"
        if blocked:
            self.blocks[(rule or "(no rule)", category or "(no list)")] += 1
            self.blocked_domains[domain] += 1
        self.minutes[(int(moment.timestamp()) // 60, blocked)] += 1

    def timeline(self) -> tuple[int, list[tuple[datetime, int, int]]]:
        """(bucket width in seconds, [(bucket start, requests not blocked, blocked)]) over the period."""
        if self.first is None or self.last is None:
            return 60, []
        start, end = int(self.first.timestamp()) // 60 * 60, int(self.last.timestamp())
        step = next((s for s in TIME_STEPS if (end - start) // s < TIMELINE_BUCKETS), TIME_STEPS[-1])
        start = start // step * step
        count = (end - start) // step + 1
        passed, blocked = [0] * count, [0] * count
        for (minute, was_blocked), requests in self.minutes.items():
            index = (minute * 60 - start) // step
            (blocked if was_blocked else passed)[index] += requests
        return step, [(datetime.fromtimestamp(start + i * step, UTC), passed[i], blocked[i]) for i in range(count)]


def entry_fields(entry: object) -> tuple:
    """(time, user, client, host, action, bytes_in, bytes_out, rule, category) of a log entry, or
    ValueError when it lacks one of them or one has the wrong type."""
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    try:
        moment = parse_time(entry["time"])
        user, client, host, action = entry["user"], entry["client"], entry["host"], entry["action"]
        bytes_in, bytes_out, rule, category = entry["bytes_in"], entry["bytes_out"], entry["rule"], entry["category"]
    except (KeyError, TypeError) as missing:
        raise ValueError(f"no valid {missing}") from None
    texts_or_null = (user, rule, category)
    if (not all(isinstance(v, str) for v in (client, host)) or action not in ACTIONS
            or not all(v is None or isinstance(v, str) for v in texts_or_null)
            or not all(type(v) is int and v >= 0 for v in (bytes_in, bytes_out))):
        raise ValueError("a field of the wrong type")
    return moment, user, client, host, action, bytes_in, bytes_out, rule, category


def summarise(lines: Iterable[str], since: datetime | None = None) -> Report:
    """One Report from the log's lines (with their newlines, as a file yields them)."""
    report = Report(since=since)
    pending: str | None = None                     # the previous line, counted once the next one shows it was not the last
    for line in lines:
        if pending is not None:
            _count(report, pending, last=False)
        pending = line
    if pending is not None:
        _count(report, pending, last=not pending.endswith("\n"))
    return report


def _count(report: Report, line: str, last: bool) -> None:
    if not line.strip():
        return
    report.lines += 1
    try:
        report.add(json.loads(line))
    except ValueError:                             # json.JSONDecodeError is a ValueError
        report.skipped += 1
        report.truncated = report.truncated or last


def read_log(path: str, since: datetime | None = None) -> Report:
    """The report of the log file at `path` (OSError when it cannot be read)."""
    with open(path, encoding="utf-8", errors="replace", newline="") as log:
        return summarise(log, since)


# --- text -----------------------------------------------------------------------------------

def human_bytes(count: int) -> str:
    """`1536` -> `1.5 KiB`."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{count} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "-"


def skipped_note(report: Report) -> str:
    """What was not counted, said once: for the text and the HTML alike."""
    if not report.skipped:
        return ""
    note = f"{report.skipped} malformed line{'s' if report.skipped != 1 else ''} skipped"
    return note + (" (the last one truncated: the log was being written)" if report.truncated else "")


def period(report: Report) -> str:
    asked = f" (the log since {_when(report.since)})" if report.since else ""
    return f"{_when(report.first)} to {_when(report.last)}{asked}"


def render_text(report: Report, top: int = 10) -> str:
    """The report for a terminal."""
    out = [f"Activity {period(report)}",
           f"requests {report.requests}, blocked {report.actions['block']}, bytes {human_bytes(report.bytes)} "
           f"(in {human_bytes(report.bytes_in)}, out {human_bytes(report.bytes_out)}), "
           f"users {len(report.user_requests)}, domains {len(report.domain_requests)}",
           "actions: " + ", ".join(f"{a} {report.actions[a]}" for a in ACTIONS)]
    if report.older:
        out.append(f"{report.older} earlier lines left out")
    if report.skipped:
        out.append(skipped_note(report))
    sections = [("Top domains by requests", report.domain_requests, str),
                ("Top domains by bytes", report.domain_bytes, human_bytes),
                ("Top users by requests", report.user_requests, str),
                ("Top users by bytes", report.user_bytes, human_bytes),
                ("Blocked domains", report.blocked_domains, str)]
    for title, counter, shown in sections:
        rows = [f"  {shown(v):>12}  {k}" for k, v in counter.most_common(top)]
        out += ["", title, *(rows or ["  (none)"])]
    rows = [f"  {n:>12}  {rule}  {category}" for (rule, category), n in report.blocks.most_common(top)]
    out += ["", "Blocked attempts by rule and list", *(rows or ["  (none)"])]
    return "\n".join(out) + "\n"


# --- HTML with inline SVG -------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px 32px;color:#1d2430;background:#f6f7f9}
h1{font-size:22px;margin:0 0 4px} .period{color:#5b6472;margin:0 0 18px}
.note{background:#fff4d6;border:1px solid #e9c46a;padding:6px 10px;border-radius:6px;display:inline-block}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0 20px}
.card{flex:1 1 0;background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:10px 14px;min-width:110px}
.card b{display:block;font-size:20px;white-space:nowrap} .card span{color:#5b6472;font-size:12px;text-transform:uppercase}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(540px,1fr));gap:16px}
section{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:12px 16px}
h2{font-size:15px;margin:0 0 8px} table{border-collapse:collapse;width:100%;margin-top:8px;font-size:13px}
td,th{padding:3px 6px;border-bottom:1px solid #eef0f3;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
.none{color:#8a93a0} svg{max-width:100%;height:auto} svg text{font:12px system-ui,sans-serif;fill:#1d2430}
"""
_BLUE, _RED = "#3b6fd4", "#d64545"


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _clip(label: str, width: int = 34) -> str:
    return label if len(label) <= width else label[: width - 1] + "\u2026"


def bar_chart(rows: list[tuple[str, int]], shown=str, color: str = _BLUE, width: int = 520, tip=None) -> str:
    """Horizontal bars, one a row, the value at the bar's end (`shown`); the full label and the
    value as `tip` shows it as the bar's tooltip."""
    if not rows:
        return '<p class="none">(none)</p>'
    row_height, label_width, value_width = 22, 210, 80
    bar_room = width - label_width - value_width
    most = max(v for _, v in rows) or 1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{row_height * len(rows) + 4}" '
             f'viewBox="0 0 {width} {row_height * len(rows) + 4}" role="img">']
    for i, (label, value) in enumerate(rows):
        y = i * row_height + 2
        length = max(1.0, bar_room * value / most)
        parts.append(f'<g><title>{_esc(label)}: {_esc((tip or shown)(value))}</title>'
                     f'<text x="{label_width - 8}" y="{y + 15}" text-anchor="end">{_esc(_clip(label))}</text>'
                     f'<rect x="{label_width}" y="{y + 3}" width="{length:.1f}" height="{row_height - 6}" '
                     f'rx="2" fill="{color}"/>'
                     f'<text x="{label_width + length + 6:.1f}" y="{y + 15}">{_esc(shown(value))}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def timeline_chart(step: int, buckets: list[tuple[datetime, int, int]], width: int = 1180, height: int = 220) -> str:
    """Requests over time: a column per bucket, the blocked part stacked on top in red."""
    if not buckets:
        return '<p class="none">(none)</p>'
    left, bottom, top_room = 48, 34, 14
    plot_width, plot_height = width - left - 10, height - bottom - top_room
    most = max(p + b for _, p, b in buckets) or 1
    scale = 10 ** math.floor(math.log10(most))
    ceiling = next(m * scale for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10) if m * scale >= most)
    slot = plot_width / len(buckets)
    label_every = max(1, math.ceil(len(buckets) / 12))
    fmt = "%H:%M" if step < 86400 else "%m-%d"
    base = top_room + plot_height
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img">']
    for fraction in (0, 0.5, 1):
        y = base - plot_height * fraction
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#dde1e7"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{ceiling * fraction:g}</text>')
    for i, (start, passed, blocked) in enumerate(buckets):
        x = left + i * slot + slot * 0.1
        bar = slot * 0.8
        passed_height, blocked_height = plot_height * passed / ceiling, plot_height * blocked / ceiling
        tip = f"{start.strftime('%Y-%m-%d %H:%M')} UTC: {passed + blocked} requests, {blocked} blocked"
        parts.append(f'<g><title>{_esc(tip)}</title>'
                     f'<rect x="{x:.1f}" y="{base - passed_height:.1f}" width="{bar:.1f}" '
                     f'height="{passed_height:.1f}" fill="{_BLUE}"/>'
                     f'<rect x="{x:.1f}" y="{base - passed_height - blocked_height:.1f}" width="{bar:.1f}" '
                     f'height="{blocked_height:.1f}" fill="{_RED}"/></g>')
        if i % label_every == 0:
            parts.append(f'<text x="{x + bar / 2:.1f}" y="{base + 16}" text-anchor="middle">'
                         f'{_esc(start.strftime(fmt))}</text>')
    parts.append(f'<rect x="{width - 230}" y="{height - 14}" width="10" height="10" fill="{_BLUE}"/>'
                 f'<text x="{width - 215}" y="{height - 5}">not blocked</text>'
                 f'<rect x="{width - 130}" y="{height - 14}" width="10" height="10" fill="{_RED}"/>'
                 f'<text x="{width - 115}" y="{height - 5}">blocked</text></svg>')
    return "".join(parts)


def _exact_bytes(count: int) -> str:
    return f"{human_bytes(count)} ({count:,} bytes)"


def _counted(title: str, counter: Counter, top: int, by_bytes: bool, color: str = _BLUE) -> str:
    chart = bar_chart(counter.most_common(top), human_bytes if by_bytes else str, color,
                      tip=_exact_bytes if by_bytes else str)
    return f"<section><h2>{_esc(title)}</h2>{chart}</section>"


def render_html(report: Report, top: int = 10) -> str:
    """The report as one self-contained HTML page."""
    cards = [("requests", f"{report.requests:,}"), ("blocked", f"{report.actions['block']:,}"),
             ("bytes", human_bytes(report.bytes)), ("users", f"{len(report.user_requests):,}"),
             ("domains", f"{len(report.domain_requests):,}")]
    cards += [(a, f"{report.actions[a]:,}") for a in ACTIONS if a != "block"]
    blocks = report.blocks.most_common(top)
    block_rows = [(f"{rule} \u00b7 {category}", n) for (rule, category), n in blocks]
    step, buckets = report.timeline()
    note = skipped_note(report)
    return "".join([
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>edge forward proxy: activity report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Forward proxy activity</h1>",
        f'<p class="period">{_esc(period(report))}</p>',
        f'<p class="note">{_esc(note)}</p>' if note else "",
        '<div class="cards">', *(f"<div class=\"card\"><b>{_esc(v)}</b><span>{_esc(k)}</span></div>" for k, v in cards),
        "</div>",
        f'<section><h2>Requests over time (per {_esc(_step_name(step))})</h2>{timeline_chart(step, buckets)}</section>',
        '<div class="grid" style="margin-top:16px">',
        _counted("Top domains by requests", report.domain_requests, top, False),
        _counted("Top domains by bytes", report.domain_bytes, top, True),
        _counted("Top users by requests", report.user_requests, top, False),
        _counted("Top users by bytes", report.user_bytes, top, True),
        f"<section><h2>Blocked attempts by rule and list</h2>{bar_chart(block_rows, str, _RED)}</section>",
        _counted("Blocked domains", report.blocked_domains, top, False, _RED),
        "</div></body></html>\n",
    ])


def _step_name(seconds: int) -> str:
    span = timedelta(seconds=seconds)
    if span >= timedelta(days=1):
        return f"{span.days} day{'s' if span.days > 1 else ''}"
    if seconds >= 3600:
        return f"{seconds // 3600} hour{'s' if seconds >= 7200 else ''}"
    return f"{seconds // 60} minute{'s' if seconds >= 120 else ''}"
