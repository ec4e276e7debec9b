"""The WAF with either generation of the Core Rule Set: the tree says which (CRS 3 or 4) and
the edge sets that generation's variables (paranoia, thresholds) and reads its score back;
the engine gets the bytes the client sent, and HTTP/2's :authority as the Host. Rule trees of
our own in CRS 4's variable style, through a real edge and real clients."""

from __future__ import annotations

import io
import os
import re
import subprocess
import tarfile
from pathlib import Path

import httpx
import pytest
import requests
import responses
from click.testing import CliRunner

from addons.config import WafConfig
from addons.shield import crs_update
from addons.shield.crs import CrsError, detect_version, setup_for, tree_identity
from addons.shield.waf import Waf, WafError, engine_fields
from edgecli.main import cli
from tests.conftest import free_port
from tests.rawnet import RecordingOrigin, exchange, status_of
from tests.test_lifecycle import Running, config_text, token_file
from tests.test_shield import needs_crs
from tests.test_streaming import log_lines

# A CRS-4-shaped tree: the setup stamp, the initialisation defaults, a rule per paranoia level
# (each scoring into its level's counter, as CRS 4's rules do) and the blocking evaluation
# that sums the levels up to tx.blocking_paranoia_level. Set CRS 3's tx.paranoia_level
# instead and the paranoia 2 rule never runs; read CRS 3's tx.anomaly_score and it is empty.
CRS4_SETUP = 'SecAction "id:900990,phase:1,pass,nolog,setvar:tx.crs_setup_version=4280"\n'
CRS4_INIT = """\
SecRule &TX:crs_setup_version "@eq 0" "id:901001,phase:1,deny,status:500,log,msg:'CRS is deployed without configuration'"
SecRule &TX:inbound_anomaly_score_threshold "@eq 0" "id:901100,phase:1,pass,nolog,setvar:tx.inbound_anomaly_score_threshold=5"
SecRule &TX:blocking_paranoia_level "@eq 0" "id:901120,phase:1,pass,nolog,setvar:tx.blocking_paranoia_level=1"
SecRule &TX:detection_paranoia_level "@eq 0" "id:901125,phase:1,pass,nolog,setvar:tx.detection_paranoia_level=%{TX.blocking_paranoia_level}"
SecAction "id:901200,phase:1,pass,nolog,setvar:tx.blocking_inbound_anomaly_score=0,setvar:tx.inbound_anomaly_score_pl1=0,setvar:tx.inbound_anomaly_score_pl2=0"
"""
CRS4_ATTACKS = """\
SecRule TX:DETECTION_PARANOIA_LEVEL "@lt 1" "id:934011,phase:2,pass,nolog,skipAfter:END-REQUEST-934"
SecRule ARGS "@contains levelone" "id:934100,phase:2,pass,log,msg:'paranoia 1 word',setvar:tx.inbound_anomaly_score_pl1=+3"
SecRule TX:DETECTION_PARANOIA_LEVEL "@lt 2" "id:934013,phase:2,pass,nolog,skipAfter:END-REQUEST-934"
SecRule ARGS "@contains leveltwo" "id:934200,phase:2,pass,log,msg:'paranoia 2 word',setvar:tx.inbound_anomaly_score_pl2=+5"
SecMarker "END-REQUEST-934"
"""
CRS4_BLOCKING = """\
SecRule TX:BLOCKING_PARANOIA_LEVEL "@ge 1" "id:949052,phase:2,pass,nolog,setvar:'tx.blocking_inbound_anomaly_score=+%{tx.inbound_anomaly_score_pl1}'"
SecRule TX:BLOCKING_PARANOIA_LEVEL "@ge 2" "id:949053,phase:2,pass,nolog,setvar:'tx.blocking_inbound_anomaly_score=+%{tx.inbound_anomaly_score_pl2}'"
SecRule TX:BLOCKING_INBOUND_ANOMALY_SCORE "@ge %{tx.inbound_anomaly_score_threshold}" "id:949110,phase:2,deny,status:403,log,msg:'Inbound Anomaly Score Exceeded (Total Score: %{TX.BLOCKING_INBOUND_ANOMALY_SCORE})'"
"""
# exact bytes: U+2019 (E2 80 99) in the URL, a header and the body; and its double-encoded form
BYTE_RULES = r"""
SecRule REQUEST_URI_RAW "@rx \xe2\x80\x99" "id:4100,phase:1,pass,log,msg:'quote in the URL'"
SecRule REQUEST_HEADERS:X-Quote "@rx ^it\xe2\x80\x99s$" "id:4101,phase:1,pass,log,msg:'quote in a header'"
SecRule REQUEST_HEADERS_NAMES "@rx ^x-\xe2\x80\x99$" "id:4102,phase:1,pass,log,t:lowercase,msg:'quote in a header name'"
SecRule REQUEST_BODY "@rx \xe2\x80\x99" "id:4103,phase:2,pass,log,msg:'quote in the body'"
SecRule REQUEST_URI_RAW|REQUEST_HEADERS|REQUEST_HEADERS_NAMES "@rx \xc3\xa2\xc2\x80\xc2\x99" "id:4104,phase:1,pass,log,msg:'double-encoded'"
SecRule REQUEST_BODY "@rx \xc3\xa2\xc2\x80\xc2\x99" "id:4105,phase:2,pass,log,msg:'double-encoded body'"
SecRule REQUEST_HEADERS:X-Raw "@rx ^\xff\x00\xc3$" "id:4106,phase:1,pass,log,msg:'no UTF-8 at all'"
"""
BROWSER = {"Host": "shop.example", "User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
           "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
           "Accept-Language": "en-GB,en;q=0.5"}


def crs4_tree(root, extra: str = "", header: str = ""):
    """A CRS-4-style tree under `root`: crs-setup.conf.example and rules/."""
    rules = root / "rules"
    rules.mkdir(parents=True)
    (root / "crs-setup.conf.example").write_text(CRS4_SETUP)
    (rules / "REQUEST-901-INITIALIZATION.conf").write_text(header + CRS4_INIT)
    (rules / "REQUEST-934-APPLICATION-ATTACK-GENERIC.conf").write_text(CRS4_ATTACKS + extra)
    (rules / "REQUEST-949-BLOCKING-EVALUATION.conf").write_text(CRS4_BLOCKING)
    return root


def judge(waf: Waf, query: bytes, version: str = "HTTP/1.1", fields=((b"Host", b"shop.example"),), body=b""):
    inspection, finding = waf.begin(("127.0.0.1", 40000), ("127.0.0.1", 8080), b"GET", b"/search?" + query,
                                    version, list(fields))
    return finding or waf.finish(inspection, body)


# -- which CRS: detection and the setup it gets ------------------------------------------------

def test_version_from_the_setup_stamp_and_from_the_rule_headers(tmp_path):
    stamped = detect_version(str(crs4_tree(tmp_path / "a")))
    assert (stamped.major, stamped.setup_version, stamped.source) == (4, 4280, "crs-setup.conf.example")
    headed = detect_version(str(crs4_tree(tmp_path / "b", header="# OWASP CRS ver.4.7.0\n")))
    assert (headed.major, headed.minor, headed.patch, headed.setup_version) == (4, 7, 0, 470)
    (tmp_path / "c" / "rules").mkdir(parents=True)
    (tmp_path / "c" / "rules" / "REQUEST-942-X.conf").write_text(
        "SecRule ARGS \"@rx x\" \"id:942100,phase:2,pass,ver:'OWASP_CRS/4.28.0'\"\n")
    assert str(detect_version(str(tmp_path / "c"))) == "CRS 4.28.0"
    (tmp_path / "d" / "rules").mkdir(parents=True)         # says nothing: CRS 3, as the edge always assumed
    assert detect_version(str(tmp_path / "d")).major == 3


@needs_crs
def test_debians_tree_is_crs_3():
    version = detect_version("/usr/share/modsecurity-crs")
    assert (version.major, version.setup_version) == (3, 334)


def test_an_unknown_generation_is_refused(tmp_path):
    crs4_tree(tmp_path, header="# OWASP CRS ver.5.0.0\n")
    with pytest.raises(CrsError, match="CRS 3 and CRS 4 only"):
        detect_version(str(tmp_path))
    with pytest.raises(WafError, match="CRS 5.0.0"):
        Waf(WafConfig(crs=str(tmp_path)))


def test_each_generation_gets_its_own_variables(tmp_path):
    crs4 = setup_for(detect_version(str(crs4_tree(tmp_path))), 3, 7)
    assert "tx.blocking_paranoia_level=3" in crs4.actions and "tx.detection_paranoia_level=3" in crs4.actions
    assert "tx.paranoia_level" not in crs4.actions and "tx.inbound_anomaly_score_threshold=7" in crs4.actions
    assert "tx.crs_setup_version=4280" in crs4.actions and crs4.score_variable == "tx.blocking_inbound_anomaly_score"
    crs3 = setup_for(detect_version(str(tmp_path / "none")), 2, 5)
    assert "setvar:tx.paranoia_level=2" in crs3.actions and "blocking_paranoia" not in crs3.actions
    assert crs3.score_variable == "tx.anomaly_score" and "tx.crs_setup_version=300" in crs3.actions


# -- CRS 4 plumbing through the engine ----------------------------------------------------------

def test_crs4_paranoia_2_runs_the_level_2_rules_and_the_score_is_the_real_one(tmp_path):
    tree = str(crs4_tree(tmp_path))
    level1, level2 = Waf(WafConfig(crs=tree, paranoia=1)), Waf(WafConfig(crs=tree, paranoia=2))
    assert level1.version.major == 4
    clean = judge(level1, b"q=hello")
    assert (clean.status, clean.score, clean.rules) == (None, 0, [])
    assert clean.rules == [] and 901001 not in clean.rules       # the setup stamp is there: 901001 stays quiet
    low = judge(level1, b"q=levelone")                           # below the threshold: passes, scored 3
    assert (low.status, low.score, low.rules) == (None, 3, [934100])
    two = judge(level1, b"q=leveltwo")                           # a paranoia 2 word at paranoia 1: unseen
    assert (two.status, two.score, two.rules) == (None, 0, [])
    blocked = judge(level2, b"q=leveltwo")
    assert (blocked.status, blocked.score, blocked.rules) == (403, 5, [934200, 949110])
    both = judge(level2, b"q=levelone&r=leveltwo")
    assert (both.status, both.score) == (403, 8) and both.summary().startswith("score 8, rules 934100,934200,949110")


def test_crs4_threshold_comes_from_the_edge(tmp_path):
    tree = str(crs4_tree(tmp_path))
    assert judge(Waf(WafConfig(crs=tree, anomaly_threshold=3)), b"q=levelone").status == 403
    assert judge(Waf(WafConfig(crs=tree, paranoia=2, anomaly_threshold=9)), b"q=levelone&r=leveltwo").status is None


@needs_crs
def test_crs3_keeps_its_variables():
    level1 = Waf(WafConfig(paranoia=1))
    level2 = Waf(WafConfig(paranoia=2))
    assert level1.version.major == 3
    assert judge(level1, b"q=a%3Cb").status is None                    # 942130 is a paranoia 2 rule
    finding = judge(level2, b"q=a%3Cb")
    assert finding.status == 403 and 942130 in finding.rules and finding.score >= 5


def test_the_tree_identity_follows_the_rules(tmp_path):
    tree = crs4_tree(tmp_path)
    before = tree_identity(str(tree))
    assert tree_identity(str(tree)) == before
    (tree / "rules" / "REQUEST-950-NEW.conf").write_text("# new\n")
    assert tree_identity(str(tree)) != before


# -- the edge: CRS 4 tree, the trace's score ----------------------------------------------------

def waf_edge(edge, o, tree, log, waf: str = "", **kw):
    return edge(f"pools: {{p: {{origins: [{o.url}]}}}}\naccess_log: {log}\n"
                f"shield:\n  waf: {{crs: {tree}{waf}}}\n", **kw)


@pytest.mark.parametrize("paranoia, status, waf", [
    (1, 200, "score 0, rules -"),
    (2, 403, "score 5, rules 934200,949110"),
])
def test_the_edge_sets_crs4_paranoia_and_logs_its_score(edge, tmp_path, paranoia, status, waf):
    o = RecordingOrigin()
    log = tmp_path / "access.log"
    try:
        e = waf_edge(edge, o, crs4_tree(tmp_path / "crs"), log, f", paranoia: {paranoia}")
        with httpx.Client() as c:
            assert c.get(f"{e.url}/search?q=leveltwo", headers=BROWSER).status_code == status
            assert c.get(f"{e.url}/search?q=levelone", headers=BROWSER).status_code == 200
        lines = log_lines(log, 2)
        assert [line["edge"]["waf"] for line in lines] == [waf, "score 3, rules 934100"]
        assert len(o.requests) == (2 if status == 200 else 1)
    finally:
        o.stop()


# -- the bytes the client sent -----------------------------------------------------------------

def test_the_engine_reads_the_exact_bytes(tmp_path):
    waf = Waf(WafConfig(crs=str(crs4_tree(tmp_path, BYTE_RULES))))
    quote = "\u2019".encode()
    assert judge(waf, b"q=it" + quote).rules == [4100]
    assert judge(waf, b"q=x", fields=[(b"Host", b"shop.example"), (b"X-Quote", b"it" + quote + b"s")]).rules == [4101]
    assert judge(waf, b"q=x", fields=[(b"Host", b"shop.example"), (b"X-" + quote, b"1")]).rules == [4102]
    assert judge(waf, b"q=x", body=b"text=it" + quote).rules == [4103]
    raw = judge(waf, b"q=\xff\xfe", fields=[(b"Host", b"shop.example"), (b"X-Raw", b"\xff\x00\xc3")], body=b"\xff")
    assert (raw.status, raw.rules) == (None, [4106])      # bytes that are no UTF-8 at all reach it as sent


def test_exact_bytes_through_the_edge_in_the_url_a_header_and_the_body(edge, tmp_path):
    o = RecordingOrigin()
    log = tmp_path / "access.log"
    try:
        e = waf_edge(edge, o, crs4_tree(tmp_path / "crs", BYTE_RULES), log)
        quote = "\u2019".encode()
        head = b"Host: shop.example\r\nUser-Agent: Mozilla/5.0\r\nAccept: */*\r\n"
        body = b"text=it" + quote + b"s"
        for request in (b"GET /it" + quote + b"s?a=b HTTP/1.1\r\n" + head + b"Connection: close\r\n\r\n",
                        b"GET /plain HTTP/1.1\r\n" + head + b"X-Quote: it" + quote + b"s\r\nConnection: close\r\n\r\n",
                        b"POST /form HTTP/1.1\r\n" + head + b"Content-Type: application/x-www-form-urlencoded\r\n"
                        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body,
                        b"GET /plain HTTP/1.1\r\n" + head + b"Connection: close\r\n\r\n"):
            assert status_of(exchange(e.host, e.port, request)) == 200
        lines = log_lines(log, 4)
        assert [line["edge"]["waf"] for line in lines] == [
            "score 0, rules 4100", "score 0, rules 4101", "score 0, rules 4103", "score 0, rules -"]
        sent = o.wait_for_requests(4)
        assert sent[0].startswith(b"GET /it" + quote + b"s?a=b HTTP/1.1\r\n")        # and forwarded as sent
        assert b"\r\nX-Quote: it" + quote + b"s\r\n" in sent[1] and sent[2].endswith(body)
    finally:
        o.stop()


# -- HTTP/2: the :authority is the engine's Host ------------------------------------------------

def test_engine_fields_give_http2_a_host():
    fields = [(b"user-agent", b"x")]
    assert engine_fields("HTTP/2.0", fields, b"shop.example") == [(b"Host", b"shop.example"), (b"user-agent", b"x")]
    assert engine_fields("HTTP/3", fields, b"shop.example")[0] == (b"Host", b"shop.example")
    assert engine_fields("HTTP/1.1", fields, b"shop.example") == fields            # HTTP/1 without Host: as sent
    assert engine_fields("HTTP/2.0", fields, b"") == fields
    own = [(b"host", b"a.example"), (b"user-agent", b"x")]
    assert engine_fields("HTTP/2.0", own, b"shop.example") == own                  # a Host the client sent stays alone


def curl(e, tls, version: str, path: str) -> tuple[str, int]:
    """curl over HTTP/2 (it offers only h2 first; httpx offers http/1.1 first, which the edge
    picks) or HTTP/1.1, with a browser's head: (HTTP version, status)."""
    args = ["curl", "-s", "-o", "/dev/null", f"--{version}", "--cacert", str(tls.ca), "--max-time", "20",
            "-w", "%{http_version} %{http_code}"]
    for name, value in BROWSER.items():
        args += ["-H", f"{name}: {value}"]
    out = subprocess.run(args + [f"https://127.0.0.1:{e.port}{path}"], capture_output=True, check=False,
                         timeout=30, text=True).stdout
    got, code = out.split()
    return got, int(code)


@needs_crs
def test_http2_scores_like_http1_with_debians_crs(edge, tls, tmp_path):
    o = RecordingOrigin()
    log = tmp_path / "access.log"
    try:
        e = edge(f"pools: {{p: {{origins: [{o.url}]}}}}\naccess_log: {log}\nshield:\n  waf: {{}}\n", cert=str(tls.pem))
        answers = [curl(e, tls, "http2", "/products/42?sort=price"),
                   curl(e, tls, "http2", "/search?q=%3Cscript%3Ealert(1)%3C/script%3E"),
                   curl(e, tls, "http1.1", "/products/42?sort=price")]
        assert answers == [("2", 200), ("2", 403), ("1.1", 200)]
        lines = log_lines(log, 3)
        assert [line["edge"]["waf"] for line in lines[::2]] == ["score 0, rules -", "score 0, rules -"]
        assert "941100" in lines[1]["edge"]["waf"] and "920280" not in lines[1]["edge"]["waf"]
        for request in o.wait_for_requests(2):      # the origin gets one Host, as it did before
            assert len(re.findall(rb"(?im)^host:", request)) == 1 and b"\r\nHost: shop.example\r\n" in request
    finally:
        o.stop()


# -- edge waf update: a CRS release from GitHub, its signature checked (responses stands in) -----

class Signer:
    """A throwaway OpenPGP key in a keyring of its own (gpg, ed25519: instant), standing in
    for the CRS project's."""

    def __init__(self, home: Path) -> None:
        self.home = home
        home.mkdir(mode=0o700)
        self.gpg("--quick-gen-key", "CRS test signer <crs@example.test>", "ed25519", "sign", "never")
        listing = self.gpg("--with-colons", "--list-keys").decode()
        self.fingerprint = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
        self.public = self.gpg("--armor", "--export", self.fingerprint)

    def gpg(self, *args: str, data: bytes | None = None) -> bytes:
        return subprocess.run(["gpg", "--batch", "--quiet", "--homedir", str(self.home), "--passphrase", "",
                               "--pinentry-mode", "loopback", *args], input=data, capture_output=True,
                              check=True, timeout=60).stdout

    def sign(self, data: bytes) -> bytes:
        return self.gpg("--armor", "--detach-sign", "--output", "-", data=data)

    def stop(self) -> None:
        subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "all"], capture_output=True, check=False)


@pytest.fixture(scope="module")
def signers(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpg")
    made = [Signer(root / "crs"), Signer(root / "other")]
    yield made
    for s in made:
        s.stop()


def release_archive(root: Path, version: str, extra: str = "", hostile: tarfile.TarInfo | None = None) -> bytes:
    """A CRS release as the project packs it: one top folder, rules/ and crs-setup.conf.example."""
    tree = crs4_tree(root / f"src-{version}", extra, header=f"# OWASP CRS ver.{version}\n")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(tree, arcname=f"coreruleset-{version}")
        if hostile is not None:
            tar.addfile(hostile, io.BytesIO(b"x" * hostile.size) if hostile.isfile() else None)
    return buf.getvalue()


def publish(rsps, version: str, archive: bytes, signature: bytes, archive_status: int = 200, **archive_kw) -> None:
    url = crs_update.asset_url(version)
    assert url == (f"https://github.com/coreruleset/coreruleset/releases/download/v{version}/"
                   f"coreruleset-{version}-minimal.tar.gz")
    rsps.add(responses.GET, url + ".asc", body=signature)
    rsps.add(responses.GET, url, body=archive, status=archive_status, **archive_kw)


def run_update(out: Path, key: Path, *more: str):
    return CliRunner().invoke(cli, ["waf", "update", "--out", str(out), "--key", str(key), *more])


def key_file(tmp_path: Path, signer: Signer) -> Path:
    path = tmp_path / "security.asc"
    path.write_bytes(signer.public)
    return path


def test_waf_update_installs_a_signed_release_and_a_reload_loads_it(edge, signers, tmp_path, monkeypatch):
    crs, _ = signers
    monkeypatch.setattr(crs_update, "CRS_FINGERPRINT", crs.fingerprint)      # the pinned key: ours here
    key, out = key_file(tmp_path, crs), tmp_path / "waf" / "crs"
    first = release_archive(tmp_path, "4.27.0")
    with responses.RequestsMock() as rsps:
        publish(rsps, "4.27.0", first, crs.sign(first))
        result = run_update(out, key, "--version", "4.27.0")
    assert result.exit_code == 0, result.output
    assert "CRS 4.27.0, " in result.output and str(out) in result.output and "signed by CRS test signer" in result.output
    assert out.is_symlink() and os.readlink(out).startswith(".crs-4.27.0-")
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["crs", os.readlink(out)])    # no leftovers
    assert {p.name for p in (out / "rules").iterdir()} == {"REQUEST-901-INITIALIZATION.conf",
                                                            "REQUEST-934-APPLICATION-ATTACK-GENERIC.conf",
                                                            "REQUEST-949-BLOCKING-EVALUATION.conf"}
    # a running edge on shield.waf.crs: DIR; the next release blocks a new word once reloaded
    o = RecordingOrigin()
    try:
        token, admin = token_file(tmp_path), free_port()
        config = tmp_path / "edge.yaml"
        config.write_text(config_text({"p": [o.url]}, admin, token, extra=f"shield:\n  waf: {{crs: {out}}}\n"))
        r = Running(edge, config)
        assert httpx.get(f"{r.url}/?q=newword", headers=BROWSER).status_code == 200
        second = release_archive(tmp_path, "4.28.0", 'SecRule ARGS "@contains newword" '
                                 '"id:934300,phase:2,pass,log,setvar:tx.inbound_anomaly_score_pl1=+5"\n')
        with responses.RequestsMock() as rsps:
            rsps.add(responses.GET, crs_update.LATEST, json={"tag_name": "v4.28.0"})
            publish(rsps, "4.28.0", second, crs.sign(second))
            result = CliRunner().invoke(cli, ["waf", "update", "-c", str(config), "--key", str(key)])
        assert result.exit_code == 0 and "CRS 4.28.0" in result.output, result.output
        assert os.readlink(out).startswith(".crs-4.28.0-")
        assert sorted(p.name for p in out.parent.iterdir()) == sorted(["crs", os.readlink(out)])   # the old one went
        assert httpx.get(f"{r.url}/?q=newword", headers=BROWSER).status_code == 200     # not before a reload
        assert r.reload().status_code == 200
        assert httpx.get(f"{r.url}/?q=newword", headers=BROWSER).status_code == 403
        assert httpx.get(f"{r.url}/?q=hello", headers=BROWSER).status_code == 200
    finally:
        o.stop()


def installed(tmp_path: Path, signer: Signer, monkeypatch) -> tuple[Path, Path, str]:
    """4.27.0 installed at DIR; the key file; what DIR points to."""
    monkeypatch.setattr(crs_update, "CRS_FINGERPRINT", signer.fingerprint)
    key, out = key_file(tmp_path, signer), tmp_path / "waf" / "crs"
    archive = release_archive(tmp_path, "4.27.0")
    with responses.RequestsMock() as rsps:
        publish(rsps, "4.27.0", archive, signer.sign(archive))
        assert run_update(out, key, "--version", "4.27.0").exit_code == 0
    return out, key, os.readlink(out)


def refused(out: Path, key: Path, before: str, archive: bytes, signature: bytes, **archive_kw) -> str:
    with responses.RequestsMock() as rsps:
        publish(rsps, "4.28.0", archive, signature, **archive_kw)
        result = run_update(out, key, "--version", "4.28.0")
    assert result.exit_code == 1 and "nothing was changed" in result.output, result.output
    assert os.readlink(out) == before and (out / "rules" / "REQUEST-901-INITIALIZATION.conf").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["crs", before])      # no leftovers
    return result.output


def test_waf_update_refuses_a_bad_signature(signers, tmp_path, monkeypatch):
    crs, other = signers
    out, key, before = installed(tmp_path, crs, monkeypatch)
    archive = release_archive(tmp_path, "4.28.0")
    tampered = archive[:-40] + bytes(40)
    assert "signature does not verify" in refused(out, key, before, tampered, crs.sign(archive))
    assert "signature does not verify" in refused(out, key, before, archive, other.sign(archive))
    assert "signature does not verify" in refused(out, key, before, archive, b"not a signature")
    (tmp_path / "other").mkdir()
    other_key = key_file(tmp_path / "other", other)               # signed by its key, but it is not the pinned one
    assert "not the CRS project's" in refused(out, other_key, before, archive, other.sign(archive))


def test_waf_update_refuses_an_interrupted_download(signers, tmp_path, monkeypatch):
    crs, _ = signers
    out, key, before = installed(tmp_path, crs, monkeypatch)
    archive = release_archive(tmp_path, "4.28.0")
    output = refused(out, key, before, archive[:len(archive) // 2], crs.sign(archive),
                     auto_calculate_content_length=False, headers={"Content-Length": str(len(archive))})
    assert "interrupted" in output
    output = refused(out, key, before, archive, crs.sign(archive), archive_status=503)
    assert "answered 503" in output
    with responses.RequestsMock() as rsps:
        rsps.add(responses.GET, crs_update.asset_url("4.28.0") + ".asc", body=requests.ConnectionError("reset"))
        result = run_update(out, key, "--version", "4.28.0")
    assert result.exit_code == 1 and "cannot fetch the signature of CRS 4.28.0" in result.output
    assert os.readlink(out) == before


def hostile(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, target, 3 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize("entry, says", [
    (hostile("coreruleset-4.28.0/../../evil.conf"), "hostile path"),
    (hostile("/etc/evil.conf"), "hostile path"),
    (hostile("coreruleset-4.28.0/rules/x.data", tarfile.SYMTYPE, "/etc/passwd"), "hostile link"),
    (hostile("coreruleset-4.28.0/rules/y.data", tarfile.SYMTYPE, "../../../outside"), "hostile link"),
    (hostile("coreruleset-4.28.0/rules/z.data", tarfile.LNKTYPE, "/etc/shadow"), "hostile link"),
    (hostile("coreruleset-4.28.0/dev", tarfile.CHRTYPE), "hostile special file"),
])
def test_waf_update_refuses_a_hostile_archive(signers, tmp_path, monkeypatch, entry, says):
    crs, _ = signers
    out, key, before = installed(tmp_path, crs, monkeypatch)
    archive = release_archive(tmp_path, "4.28.0", hostile=entry)       # signed: the key's holder is not trusted blindly
    assert says in refused(out, key, before, archive, crs.sign(archive))
    assert not (tmp_path / "evil.conf").exists() and not (tmp_path.parent / "evil.conf").exists()


def test_waf_update_refuses_rules_that_are_not_the_release_or_do_not_load(signers, tmp_path, monkeypatch):
    crs, _ = signers
    out, key, before = installed(tmp_path, crs, monkeypatch)
    mislabelled = release_archive(tmp_path / "a", "4.26.0")
    assert "holds CRS 4.26.0, not CRS 4.28.0" in refused(out, key, before, mislabelled, crs.sign(mislabelled))
    broken = release_archive(tmp_path / "b", "4.28.0", "SecNoSuchDirective On\n")
    assert "the rules do not load" in refused(out, key, before, broken, crs.sign(broken))


def test_waf_update_will_not_replace_a_folder_it_did_not_make(tmp_path):
    out = tmp_path / "crs"
    (out / "rules").mkdir(parents=True)
    result = CliRunner().invoke(cli, ["waf", "update", "--version", "4.28.0", "--out", str(out)])
    assert result.exit_code == 1 and "is not a link made by `edge waf update`" in result.output
    assert CliRunner().invoke(cli, ["waf", "update"]).exit_code == 2          # where to: --out or -c
    assert "is not a CRS 4 release" in CliRunner().invoke(
        cli, ["waf", "update", "--version", "3.3.4", "--out", str(tmp_path / "x")]).output
