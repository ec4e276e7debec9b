"""`edge forward report` on a known activity log, its HTML page, and `edge forward ca init`."""

import json
import os
import re
import stat
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner
from cryptography import x509

from addons.forward.report import read_log, registrable, render_html, render_text, summarise
from edgecli.forward_tools import ca, parse_since, report

T = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def entry(at: datetime, user, client, host, action, bytes_in=0, bytes_out=0, rule=None, category=None,
          method="GET", url=None, scheme="https", status=200):
    return {"time": stamp(at), "user": user, "group": None, "client": client, "method": method, "host": host,
            "port": 443, "url": url, "scheme": scheme, "category": category, "rule": rule, "action": action,
            "status": status, "bytes_in": bytes_in, "bytes_out": bytes_out, "duration_ms": 12.5, "cache": None}


def known_entries(base: datetime = T) -> list[dict]:
    minute = timedelta(minutes=1)
    return [
        entry(base, "alice", "10.0.0.2", "www.example.co.uk", "allow", 100, 5000, url="https://www.example.co.uk/"),
        entry(base + minute, "alice", "10.0.0.2", "CDN.example.co.uk.", "allow", 0, 20000),
        entry(base + 2 * minute, "bob", "10.0.0.3", "ads.tracker.example", "block", rule="policy[2]",
              category="ads", method="CONNECT", scheme="tunnel", status=None),
        entry(base + 3 * minute, None, "10.0.0.9", "news.example", "allow", 50, 1000, scheme="http"),
        entry(base + 65 * minute, "bob", "10.0.0.3", "social.example", "block", rule="policy[0]", category="social"),
        entry(base + 70 * minute, "bob", "10.0.0.3", "ads.tracker.example", "block", rule="policy[2]", category="ads"),
        entry(base + 125 * minute, "alice", "10.0.0.2", "news.example", "intercept", 10, 3000),
    ]


def write_log(path, entries, tail: str = "") -> str:
    with open(path, "w", encoding="utf-8") as log:
        log.write(json.dumps(entry(T - timedelta(days=2), "carol", "10.0.0.4", "old.example", "allow", 7, 7)) + "\n")
        for i, line in enumerate(entries):
            log.write(json.dumps(line) + "\n")
            if i == 2:                              # malformed lines among the good ones
                log.write("not json\n[1]\n\n")
                broken = dict(line)
                del broken["bytes_in"]
                log.write(json.dumps(broken) + "\n")
                log.write(json.dumps(dict(line, bytes_out=-1)) + "\n")
                log.write(json.dumps(dict(line, bytes_in=True)) + "\n")
        log.write(tail)
    return str(path)


def test_the_numbers_of_a_known_log(tmp_path):
    path = write_log(tmp_path / "activity.jsonl", known_entries(), tail='{"time": "2026-12-01T12:0')
    counted = read_log(path, since=T - timedelta(hours=1))
    assert (counted.lines, counted.skipped, counted.truncated, counted.older) == (14, 6, True, 1)
    assert (counted.requests, counted.bytes_in, counted.bytes_out) == (7, 160, 29000)
    assert (counted.first, counted.last) == (T, T + timedelta(minutes=125))
    assert dict(counted.actions) == {"allow": 3, "block": 3, "intercept": 1}
    assert counted.domain_requests.most_common() == [("example.co.uk", 2), ("tracker.example", 2),
                                                     ("news.example", 2), ("social.example", 1)]
    assert dict(counted.domain_bytes) == {"example.co.uk": 25100, "tracker.example": 0, "news.example": 4060,
                                          "social.example": 0}
    assert dict(counted.user_requests) == {"alice": 3, "bob": 3, "10.0.0.9 (no user)": 1}
    assert dict(counted.user_bytes) == {"alice": 28110, "bob": 0, "10.0.0.9 (no user)": 1050}
    assert counted.blocks.most_common() == [(("policy[2]", "ads"), 2), (("policy[0]", "social"), 1)]
    assert dict(counted.blocked_domains) == {"tracker.example": 2, "social.example": 1}
    step, buckets = counted.timeline()
    assert (step, len(buckets)) == (300, 26)
    assert buckets[0] == (T, 3, 1)
    assert buckets[13] == (T + timedelta(minutes=65), 0, 1) and buckets[14] == (T + timedelta(minutes=70), 0, 1)
    assert buckets[25] == (T + timedelta(minutes=125), 1, 0)
    assert sum(p + b for _, p, b in buckets) == 7


def test_since_filters_and_a_complete_last_line_is_no_truncation(tmp_path):
    path = write_log(tmp_path / "activity.jsonl", known_entries())
    everything = read_log(path)
    assert (everything.requests, everything.older, everything.skipped, everything.truncated) == (8, 0, 5, False)
    late = read_log(path, since=T + timedelta(minutes=65))
    assert (late.requests, late.older, late.actions["block"], late.bytes) == (3, 5, 2, 3010)
    assert summarise([]).requests == 0 and summarise([]).timeline() == (60, [])


def test_text_report_says_totals_tops_blocks_and_skips(tmp_path):
    path = write_log(tmp_path / "activity.jsonl", known_entries(), tail='{"trunc')
    text = render_text(read_log(path, since=T - timedelta(hours=1)), top=2)
    assert "requests 7, blocked 3, bytes 28.5 KiB (in 160 B, out 28.3 KiB), users 3, domains 4" in text
    assert "6 malformed lines skipped (the last one truncated: the log was being written)" in text
    assert "1 earlier lines left out" in text
    tops = text.split("Top domains by bytes\n")[1].split("\n\n")[0].splitlines()
    assert [line.split()[-1] for line in tops] == ["example.co.uk", "news.example"]   # --top 2
    assert re.search(r"\n +2  policy\[2\]  ads\n +1  policy\[0\]  social\n", text)


class Tags(HTMLParser):
    """Every element name and attribute name of a page."""

    def __init__(self):
        super().__init__()
        self.names, self.attributes = set(), set()

    def handle_starttag(self, tag, attrs):
        self.names.add(tag)
        self.attributes.update(name for name, _ in attrs)


def svgs(page: str) -> list[ET.Element]:
    return [ET.fromstring(block) for block in re.findall(r"<svg\b.*?</svg>", page, flags=re.S)]


def test_html_is_self_contained_with_valid_svg_charts_and_the_numbers(tmp_path):
    hostile = known_entries() + [entry(T + timedelta(minutes=126), '<img src=x onerror="alert(1)">', "10.0.0.5",
                                       "<script>alert(1)</script>.example", "block",
                                       rule="policy[9]", category="</title><script>x()</script>")]
    page = render_html(summarise(json.dumps(e) + "\n" for e in hostile))
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # nothing runs, nothing is fetched: no such element or attribute; the only URL is the SVG namespace
    tags = Tags()
    tags.feed(page)
    assert tags.names.isdisjoint({"script", "link", "img", "iframe", "object", "embed", "image", "use", "foreignobject"})
    assert not {a for a in tags.attributes if a in ("src", "href", "xlink:href") or a.startswith("on")}
    assert "@import" not in page and "url(" not in page
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) == {"http://www.w3.org/2000/svg"}
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.example" in page
    charts = svgs(page)
    assert len(charts) == 7                         # the timeline, four tops, blocks by rule, blocked domains
    namespace = "{http://www.w3.org/2000/svg}"
    for chart in charts:
        assert chart.tag == f"{namespace}svg" and float(chart.get("width")) > 0 and float(chart.get("height")) > 0
    bars = charts[1].findall(f"{namespace}g")       # top domains by requests: one bar per domain, longest first
    assert [g.find(f"{namespace}title").text for g in bars] == [
        "example.co.uk: 2", "tracker.example: 2", "news.example: 2", "social.example: 1",
        "<script>alert(1)</script>.example: 1"]
    widths = [float(g.find(f"{namespace}rect").get("width")) for g in bars]
    assert widths[0] == widths[1] == widths[2] == 2 * widths[3]
    for number in (">8<", ">4<", "24.5 KiB (25,100 bytes)", "(28,110 bytes)", "policy[2] · ads", "policy[0] · social"):
        assert number in page, number


def test_cli_report_prints_and_writes_html(tmp_path):
    now = datetime.now(UTC)
    log = write_log(tmp_path / "activity.jsonl", known_entries(now - timedelta(hours=3)))
    config = tmp_path / "forward.yaml"
    config.write_text("mode: forward\nactivity_log: activity.jsonl\n")     # relative to the config
    page = tmp_path / "report.html"
    result = CliRunner().invoke(report, ["-c", str(config), "--since", "24h", "--html", str(page)])
    assert result.exit_code == 0, result.output
    assert "requests 7, blocked 3" in result.output and "1 earlier lines left out" in result.output
    assert f"wrote {page}" in result.output and "tracker.example" in page.read_text()
    result = CliRunner().invoke(report, ["--log", log, "--since", "1h"])
    assert result.exit_code == 0 and "requests 1, blocked 0" in result.output     # only the 125th minute
    result = CliRunner().invoke(report, ["--log", str(tmp_path / "none.jsonl")])
    assert result.exit_code == 1 and "none.jsonl: No such file or directory" in result.output
    result = CliRunner().invoke(report, ["--log", log, "--since", "yesterday"])
    assert result.exit_code == 2 and "expected a duration like 30m, 24h or 7d" in result.output
    result = CliRunner().invoke(report, [])
    assert result.exit_code == 1 and "give --log PATH or -c FILE" in result.output


def test_since_takes_a_duration_or_a_time():
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert parse_since("24h", now) == now - timedelta(days=1)
    assert parse_since("30m", now) == now - timedelta(minutes=30)
    assert parse_since("2026-11-30T08:00:00Z") == datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
    assert parse_since("2026-11-30 08:00") == datetime(2026, 11, 30, 8, 0, tzinfo=UTC)


def test_registrable_domains():
    assert registrable("www.bbc.co.uk") == "bbc.co.uk" and registrable("a.b.example.com.") == "example.com"
    assert registrable("someone.github.io") == "someone.github.io" and registrable("co.uk") == "co.uk"
    assert registrable("203.0.113.7") == "203.0.113.7" and registrable("2001:db8::1") == "2001:db8::1"


def test_ca_init_writes_mitmproxys_confdir_files(tmp_path):
    from mitmproxy.certs import CertStore
    out = tmp_path / "ca"
    result = CliRunner().invoke(ca, ["init", "--out", str(out)])
    assert result.exit_code == 0, result.output
    secret, public = out / "mitmproxy-ca.pem", out / "mitmproxy-ca-cert.pem"
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(out / "mitmproxy-ca.p12").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o700
    assert b"PRIVATE KEY" in secret.read_bytes() and b"PRIVATE KEY" not in public.read_bytes()
    cert = x509.load_pem_x509_certificate(public.read_bytes())
    assert cert.subject.rfc4514_string() == "O=edge,CN=edge forward proxy CA"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # mitmproxy takes the directory as its confdir as it is, and signs leaves with this CA
    store = CertStore.from_store(out, "mitmproxy", 2048)
    assert store.default_ca.fingerprint() == cert.fingerprint(cert.signature_hash_algorithm)
    leaf = x509.load_pem_x509_certificate(store.get_cert("intranet.example", []).cert.to_pem())
    leaf.verify_directly_issued_by(cert)
    fingerprint = cert.fingerprint(cert.signature_hash_algorithm).hex(":").upper()
    assert f"SHA-256 fingerprint (users can check it): {fingerprint}" in result.output
    assert f"intercept: {{ca: {secret}}}" in result.output
    assert "update-ca-certificates" in result.output and "certutil -addstore Root" in result.output


def test_ca_init_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "ca"
    assert CliRunner().invoke(ca, ["init", "--out", str(out)]).exit_code == 0
    secret = out / "mitmproxy-ca.pem"
    before = secret.read_bytes()
    result = CliRunner().invoke(ca, ["init", "--out", str(out)])
    assert result.exit_code == 1 and f"{secret} exists: a CA is there already" in result.output
    assert secret.read_bytes() == before
    os.chmod(secret, 0o644)                         # a loosened mode is not kept by --force
    result = CliRunner().invoke(ca, ["init", "--out", str(out), "--force", "--cn", "Example Org proxy"])
    assert result.exit_code == 0, result.output
    assert secret.read_bytes() != before and stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert "CN=Example Org proxy" in result.output


@pytest.mark.parametrize("existing", ["mitmproxy-ca.pem", "mitmproxy-ca.p12"])
def test_ca_init_refuses_when_either_key_file_is_there(tmp_path, existing):
    (tmp_path / existing).write_text("someone's key")
    result = CliRunner().invoke(ca, ["init", "--out", str(tmp_path)])
    assert result.exit_code == 1 and (tmp_path / existing).read_text() == "someone's key"
