"""Issue 14's WAF figures: the CRS project's own regression tests replayed through a real
`edge run`, and what the WAF costs per request.

    .venv/bin/python bench/waf_crs.py replay --crs /tmp/crs4          # CRS 4 tree with tests/regression
    .venv/bin/python bench/waf_crs.py cost --crs /tmp/crs4            # CPU per request: none, Debian CRS 3, CRS 4

The CRS 4 tree is the CRS repository's (rules/, crs-setup.conf.example, tests/regression),
got by hand for the measurement and never committed, e.g.
    git --git-dir=MIRROR archive v4.28.0 rules crs-setup.conf.example tests/regression | tar -x -C /tmp/crs4

Replay: every stage of tests/regression/tests/REQUEST-*/*.yaml (go-ftw format) is sent as
bytes on its own connection: `encoded_request` decoded as it is; otherwise built as go-ftw
2.x builds it (read from its source, ftwhttp/request.go): the request line, the headers
sorted by name, the body (`data`, its `repeat` template evaluated), and unless
`autocomplete_headers: false` a form Content-Type for a body without one, its parameters
escaped, CRLF line ends in a multipart body, Connection: close and Content-Length. The
edge runs the tree at the paranoia level measured, mode detect (every rule runs, as in the
reference's DetectionOnly), and logs the rules that matched in the access log's `waf`; a
marker request before each stage tells whose lines follow. The CRS project's test setup
(tests/docker-compose.yml: ARG_LENGTH 400, TOTAL_ARG_LENGTH 6400, MAX_FILE_SIZE 64100,
COMBINED_FILE_SIZES 65535) is given to the engine by a REQUEST-900 file put in a copy of
the tree. The outputs are the tests' own (calibrated on ModSecurity 2.9 with Apache), with the
overrides of tests/regression/nginx-overrides.yaml (the CRS project's run on libmodsecurity 3
with nginx) that are the engine's or the setup's (ENGINE_OVERRIDES; nginx's own request
handling is not the edge's). A stage counts at paranoia P when the rules it names are at paranoia <= P
(the reference at P would not run the others). Skipped, and counted: RESPONSE-* tests (the
edge does not inspect responses), stages whose output checks only a status or the response
body (they test the reference's web server or backend), and stages the edge itself refused
before the WAF saw them (listed: the request did not reach the origin either).

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import socket
import statistics
import sys
import tempfile
import time
import urllib.parse
from collections import defaultdict
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from origins import Edge, Origins  # noqa: E402

DEBIAN_CRS = "/usr/share/modsecurity-crs"
TEST_SETUP = ('SecAction "id:900300,phase:1,pass,nolog,t:none,setvar:tx.arg_length=400,'
              'setvar:tx.total_arg_length=6400,setvar:tx.max_file_size=64100,setvar:tx.combined_file_sizes=65535"\n')
CLASSES = {"911": "method", "913": "scanner", "920": "protocol", "921": "protocol attack", "922": "multipart",
           "930": "LFI", "931": "RFI", "932": "RCE", "933": "PHP", "934": "generic", "941": "XSS", "942": "SQLi",
           "943": "session fixation", "944": "Java", "949": "blocking", "999": "exceptions"}
_PL = re.compile(r"-=\s*Paranoia Level (\d)")
_ID = re.compile(r"\bid:(\d{6})")
_RULES = re.compile(r"rules (\S+)")


def paranoia_of_rules(tree: Path) -> dict[int, int]:
    """Each rule id's paranoia level, from the `-= Paranoia Level N =-` sections of the files."""
    levels = {}
    for conf in sorted((tree / "rules").glob("REQUEST-*.conf")):
        level = 1
        for line in conf.read_text(errors="replace").splitlines():
            if m := _PL.search(line):
                level = int(m[1])
            for rule in _ID.findall(line):
                levels.setdefault(int(rule), max(level, 1) if level else 0)
    return levels


# The overrides in nginx-overrides.yaml that are the engine's (libmodsecurity 3 against
# ModSecurity 2.9) or the test setup's, as their reasons say; the others are nginx's own
# handling of the request (it drops X_Filename, answers 400 to some heads ...), and the edge
# is not nginx: for those the tests' own (ModSecurity 2.9 on Apache) expectations stand.
ENGINE_OVERRIDES = {920360, 920380,             # the test setup sets no ARG_NAME_LENGTH / MAX_NUM_ARGS
                    934131,                     # a transformation's behaviour in v3 (expect_error)
                    942131,                     # "v3 log bug": the chain's first part logs
                    944100, 944110, 944120, 944210,   # v3 always has REQUEST_BODY (XML bodies)
                    980170}                     # v3 logs no noauditlog rule (a response rule)


def overrides(tree: Path) -> dict[tuple[int, int], dict]:
    doc = yaml.safe_load((tree / "tests" / "regression" / "nginx-overrides.yaml").read_text())
    out = {}
    for o in doc.get("test_overrides") or []:
        if int(o["rule_id"]) not in ENGINE_OVERRIDES:
            continue
        for test_id in o.get("test_ids") or []:
            out[(int(o["rule_id"]), int(test_id))] = o.get("output") or {}
    return out


_REPEAT = re.compile(r'\{\{\s*"((?:[^"\\]|\\.)*)"\s*\|\s*repeat\s+(\d+)\s*\}\}')
_BODY_METHODS = re.compile(r"^POST|PUT|PATCH|DELETE$")         # go-ftw's, unanchored alternatives and all
_HEX = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _go_query_unescape(text: str) -> str | None:
    """Go's url.QueryUnescape: '+' is a space; None where Go reports an error (a bad %)."""
    if _HEX.search(text):
        return None
    return urllib.parse.unquote_plus(text, errors="surrogateescape")


def _go_query_escape(text: str) -> str:
    return urllib.parse.quote_plus(text, safe="-_.~", errors="surrogateescape")


def request_body(stage: dict, headers: list[tuple[str, str]]) -> bytes:
    """`data` (its only template, {{ "x" | repeat N }}, evaluated) or `encoded_data`, then
    what go-ftw's BuildRequest does to it: form parameters not yet escaped are escaped
    (key and value, Go's QueryEscape), and a multipart body gets CRLF line ends."""
    data = stage.get("data")
    if data is None and stage.get("encoded_data"):
        body = base64.b64decode(stage["encoded_data"])
    elif data is None:
        return b""
    else:
        text = _REPEAT.sub(lambda m: m[1].encode().decode("unicode_escape") * int(m[2]), str(data))
        body = text.encode("utf-8", "surrogateescape")
    types = [v for k, v in headers if k.lower() == "content-type"]
    if body and stage.get("autocomplete_headers", True) and "application/x-www-form-urlencoded" in types:
        text = body.decode("utf-8", "surrogateescape")
        if _go_query_unescape(text) == text:
            pairs = []
            for token in text.split("&"):
                key, eq, value = token.partition("=")
                pairs.append(_go_query_escape(key) + ("=" + _go_query_escape(value) if eq else ""))
            body = "&".join(pairs).encode("utf-8", "surrogateescape")
    if any("multipart/form-data;" in v for v in types):
        body = body.replace(b"\n", b"\r\n")
    return body


def raw_request(stage: dict) -> bytes:
    """A go-ftw stage's input as the bytes go-ftw (2.x, ftwhttp/request.go) sends: headers
    sorted by name, then its autocompletion unless `autocomplete_headers: false`."""
    if stage.get("encoded_request"):
        return base64.b64decode(stage["encoded_request"])
    method, uri = str(stage.get("method", "GET")), str(stage.get("uri", "/"))
    version = str(stage.get("version", "HTTP/1.1"))
    headers = sorted(((str(k), "" if v is None else str(v)) for k, v in (stage.get("headers") or {}).items()),
                     key=lambda kv: kv[0].encode("utf-8", "surrogateescape"))
    auto = stage.get("autocomplete_headers", True)
    has = lambda name: any(k.lower() == name for k, _ in headers)      # noqa: E731
    if auto and (stage.get("data") or stage.get("encoded_data")) and not has("content-type"):
        headers.append(("Content-Type", "application/x-www-form-urlencoded"))
    body = request_body(stage, headers)
    if auto:
        if not has("connection"):
            headers.append(("Connection", "close"))
        if not has("content-length") and (body or _BODY_METHODS.search(method)):
            headers.append(("Content-Length", str(len(body))))
    head = f"{method} {uri} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("utf-8", "surrogateescape") + body


def stages(tree: Path):
    """(rule file prefix, rule id, test id, stage index, input, output) for every REQUEST stage."""
    fixes = overrides(tree)
    root = tree / "tests" / "regression" / "tests"
    for path in sorted(root.glob("REQUEST-*/*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if not isinstance(doc, dict):           # an empty placeholder file
            continue
        rule = int(doc.get("rule_id") or path.stem)
        for test in doc.get("tests") or []:
            for i, stage in enumerate(test.get("stages") or []):
                stage = stage.get("stage", stage)
                output = dict(stage.get("output") or {})
                fix = fixes.get((rule, int(test["test_id"])))
                if fix is not None:
                    output.update(fix)
                yield path.parent.name.split("-")[1], rule, int(test["test_id"]), i, stage.get("input") or {}, output


def send(host: str, port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send the bytes and read the answer: until the edge closes, or a quiet 0.3 s once an
    answer has begun (a request without Connection: close is kept alive). Never half-closes:
    mitmproxy takes a client's FIN as "not interested" and answers nothing."""
    got = b""
    with socket.create_connection((host, port), timeout=timeout) as s:
        try:
            s.sendall(data)
            while chunk := s.recv(65536):
                got += chunk
                s.settimeout(0.3)
                if len(got) > 1 << 20:
                    break
        except OSError:
            pass
    return got


def bench_tree(tree: Path, work: Path) -> Path:
    """A copy of the tree's rules with the CRS test setup in front (REQUEST-900 sorts first)."""
    copy = work / "crs"
    (copy / "rules").mkdir(parents=True, exist_ok=True)
    for f in (tree / "rules").iterdir():
        dst = copy / "rules" / f.name
        if not dst.exists():
            os.symlink(f, dst)
    (copy / "rules" / "REQUEST-900-BENCH-CRS-TEST-SETUP.conf").write_text(TEST_SETUP)
    if (tree / "crs-setup.conf.example").exists() and not (copy / "crs-setup.conf.example").exists():
        os.symlink(tree / "crs-setup.conf.example", copy / "crs-setup.conf.example")
    return copy


def replay_once(tree: Path, work: Path, paranoia: int, all_stages: list) -> dict:
    origins = Origins(["o"])
    log = work / f"access-{paranoia}.log"
    if log.exists():
        log.unlink()
    edge = Edge(f"pools: {{p: {{origins: [{origins.url('o')}]}}}}\naccess_log: {log}\n"
                f"shield:\n  max_body: 64MB\n  waf: {{crs: {bench_tree(tree, work)}, paranoia: {paranoia}, mode: detect}}\n",
                work)
    host, port = "127.0.0.1", edge.port
    answers = []
    try:
        for n, (_, _, _, _, stage, _) in enumerate(all_stages):
            send(host, port, f"GET /__edge_marker/{n} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: OWASP CRS test agent\r\n"
                             "Accept: */*\r\nConnection: close\r\n\r\n".encode())
            answers.append(send(host, port, raw_request(stage)))
        send(host, port, f"GET /__edge_marker/{len(all_stages)} HTTP/1.1\r\nHost: localhost\r\n"
                         "Connection: close\r\n\r\n".encode())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and f"/__edge_marker/{len(all_stages)}" not in log.read_text():
            time.sleep(0.1)
    finally:
        edge.stop()
        origins.stop()
    per_stage: dict[int, list[dict]] = defaultdict(list)
    current = None
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        m = re.search(r"/__edge_marker/(\d+)", rec.get("url", ""))
        if m:
            current = int(m[1])
            continue
        if current is not None:
            per_stage[current].append(rec)
    return {"lines": per_stage, "answers": answers}


def fired_rules(lines: list[dict]) -> set[int] | None:
    """The rule ids the WAF logged for a stage; None if no line says the WAF read it."""
    fired, read = set(), False
    for rec in lines:
        waf = rec.get("edge", {}).get("waf")
        if waf is None:
            continue
        read = True
        m = _RULES.search(waf)
        if m and m[1] != "-":
            fired |= {int(x) for x in m[1].rstrip(",").split(",") if x.isdigit()}
    return fired if read else None


def replay(tree: Path, levels: tuple[int, ...], only: str | None = None) -> None:
    all_stages = [s for s in stages(tree) if only is None or s[0] == only]
    pl = paranoia_of_rules(tree)
    checked = [s for s in all_stages if not s[5].get("expect_error") and
               ((s[5].get("log") or {}).get("expect_ids") or (s[5].get("log") or {}).get("no_expect_ids"))]
    print(f"CRS tree {tree}: {len(all_stages)} REQUEST stages; {len(checked)} check the log "
          f"({len(all_stages) - len(checked)} check only a status, the response or an engine error: skipped)")
    for paranoia in levels:
        with tempfile.TemporaryDirectory(prefix="edge-waf-bench-") as work:
            started = time.monotonic()
            result = replay_once(tree, Path(work), paranoia, checked)
            took = time.monotonic() - started
        pos = defaultdict(lambda: [0, 0])      # class -> [fired, expected]
        neg = defaultdict(lambda: [0, 0])      # class -> [false positives, negative stages]
        refused, misses, fps, turned = defaultdict(int), [], [], []
        for n, (prefix, rule, test, i, _, output) in enumerate(checked):
            log = output.get("log") or {}
            expect, absent = set(log.get("expect_ids") or []), set(log.get("no_expect_ids") or [])
            if expect and any(pl.get(x, 1) > paranoia for x in expect):
                continue
            absent = {x for x in absent if pl.get(x, 1) <= paranoia}
            if not expect and not absent:
                continue
            fired = fired_rules(result["lines"].get(n, []))
            name = f"{prefix} {CLASSES.get(prefix, '?')}"
            if fired is None:           # the edge answered before the WAF: not comparable
                refused[name] += 1
                answer = result["answers"][n]
                status = answer.split(b" ", 2)[1].decode(errors="replace") if answer.count(b" ") >= 2 else "closed"
                turned.append(f"{rule}-{test}{'+' if expect else '-'}({status})")
                continue
            if expect:
                pos[name][1] += 1
                if expect <= fired:
                    pos[name][0] += 1
                else:
                    misses.append(f"{rule}-{test}")
            if absent:
                neg[name][1] += 1
                if absent & fired:
                    neg[name][0] += 1
                    fps.append(f"{rule}-{test}")
        print(f"\nparanoia {paranoia} ({len(checked)} stages in {took:.0f} s)")
        print("| class | expected ids fired | negative tests that fired | refused by the edge before the WAF |")
        print("|---|---|---|---|")
        for name in sorted(set(pos) | set(neg) | set(refused)):
            f, e = pos[name]
            fp, nn = neg[name]
            print(f"| {name} | {f}/{e} ({100 * f / e:.1f} %) |" if e else f"| {name} | - |", end="")
            print(f" {fp}/{nn} ({100 * fp / nn:.1f} %) |" if nn else " - |", end="")
            print(f" {refused[name] or '-'} |")
        tf, te = sum(v[0] for v in pos.values()), sum(v[1] for v in pos.values())
        tfp, tn = sum(v[0] for v in neg.values()), sum(v[1] for v in neg.values())
        print(f"| all | {tf}/{te} ({100 * tf / max(te, 1):.2f} %) | {tfp}/{tn} ({100 * tfp / max(tn, 1):.2f} %) "
              f"| {sum(refused.values())} |")
        print(f"missed: {' '.join(misses[:60])}{' ...' if len(misses) > 60 else ''}")
        print(f"false positives: {' '.join(fps[:60])}{' ...' if len(fps) > 60 else ''}")
        print(f"refused by the edge (+ attack test, - negative test, its status): {' '.join(turned)}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


ORDINARY = [("GET", "/products/42?sort=price&dir=asc&q=O%27Reilly+books", None),
            ("POST", "/login", b"user=alice%40example.com&password=S3cret%21%23&remember=on")]
HEADERS = {"Host": "shop.example", "User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
           "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", "Accept-Language": "en-GB,en;q=0.5",
           "Content-Type": "application/x-www-form-urlencoded"}


def cost(tree: Path, requests: int, rounds: int) -> None:
    """CPU of the edge process per ordinary request (a GET with a query, a form POST) over
    keep-alive, without a WAF, with Debian's CRS 3 and with the CRS 4 tree, interleaved in
    rounds so that the machine's load falls on all alike; medians of the rounds."""
    origins = Origins(["o"])
    with tempfile.TemporaryDirectory(prefix="edge-waf-cost-") as work:
        setups = {"no WAF": "", "CRS 3.3 (Debian)": f"shield:\n  waf: {{crs: {DEBIAN_CRS}}}\n",
                  "CRS 4 tree": f"shield:\n  waf: {{crs: {tree}}}\n"}
        edges = {name: Edge(f"pools: {{p: {{origins: [{origins.url('o')}]}}}}\n{extra}", Path(work))
                 for name, extra in setups.items()}
        per = defaultdict(list)
        try:
            for _ in range(rounds):
                for name, edge in edges.items():
                    with httpx.Client(headers=HEADERS) as c:
                        for method, path, body in ORDINARY:      # warm: connection, rules, caches
                            c.request(method, edge.url + path, content=body)
                        before, start = cpu_seconds(edge.proc.pid), time.perf_counter()
                        for k in range(requests):
                            method, path, body = ORDINARY[k % 2]
                            r = c.request(method, edge.url + path, content=body)
                            if r.status_code >= 400 and r.status_code != 404:
                                raise SystemExit(f"{name}: {method} {path} answered {r.status_code}")
                        per[name].append(((cpu_seconds(edge.proc.pid) - before) / requests,
                                          (time.perf_counter() - start) / requests))
        finally:
            for edge in edges.values():
                edge.stop()
            origins.stop()
    base = statistics.median(c for c, _ in per["no WAF"])
    print(f"{requests} requests x {rounds} rounds per setup (GET with a query / form POST alternating, keep-alive)")
    print("| edge | CPU per request | ratio to plain forwarding | wall per request |")
    print("|---|---|---|---|")
    for name, figures in per.items():
        c, w = statistics.median(x for x, _ in figures), statistics.median(y for _, y in figures)
        print(f"| {name} | {c * 1e6:.0f} us | {c / base:.2f} | {w * 1e3:.2f} ms |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["replay", "cost", "all"])
    p.add_argument("--crs", type=Path, required=True, help="a CRS 4 tree with tests/regression")
    p.add_argument("--paranoia", type=int, nargs="+", default=[1, 2])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", help="replay only the tests of this rule file prefix (920, 942 ...)")
    a = p.parse_args()
    if a.what in ("replay", "all"):
        replay(a.crs, tuple(a.paranoia), a.only)
    if a.what in ("cost", "all"):
        cost(a.crs, a.requests, a.rounds)


if __name__ == "__main__":
    main()
