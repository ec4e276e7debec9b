"""The WAF: ModSecurity v3 (the `libmodsecurity` bindings) running the OWASP Core Rule Set.

The CRS comes from Debian's modsecurity-crs (CRS 3) or a CRS 4 release (`edge waf update`):
rules/*.conf and their .data files; our own main file sets the engine up (what crs-setup.conf
and ModSecurity's recommended conf would), with the paranoia level and anomaly threshold from
the edge config in the variables of the tree's CRS generation (crs.py), then includes the
request rules. Left out: REQUEST-910 (IP reputation needs GeoIP support the wheel lacks; the shield has
its own lists) and the RESPONSE rules (responses are not inspected). Each request is fed exactly
as received, as bytes: connection, request line, header fields in wire order (HTTP/2's
:authority as the Host), body: its first
`waf.body_limit` bytes (SecRequestBodyLimitAction ProcessPartial, as the CRS assumes; the shield
judges a longer body on that prefix before the rest streams to the origin).
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
from dataclasses import dataclass, field

from addons.config import WafConfig
from addons.shield.crs import CrsError, detect_version, setup_for

SCORE_RULE = 4_900_001          # our own phase-2 rule that reports the anomaly score
BLOCKING_RULES = (949110, 949111)   # the CRS's threshold rules (CRS 4's phase 1 one too): when they deny, ours does not run
# the body processors' errors for a body cut at the limit (ProcessPartial): JSON and multipart name
# the truncation; libxml2 says only that the document failed (any XML error above the limit passes)
TRUNCATED = r"(?:premature EOF|Final boundary missing|XML: Failed to parse document)"
_SCORE = re.compile(r"(?:edge anomaly score |Total Score: )(\d+)")

MAIN_CONF = """\
SecRuleEngine On
SecRequestBodyAccess On
SecRequestBodyLimit {body_limit}
SecRequestBodyNoFilesLimit {body_limit}
SecRequestBodyLimitAction ProcessPartial
SecResponseBodyAccess Off
SecArgumentSeparator &
SecCookieFormat 0
SecAuditEngine Off
SecPcreMatchLimit 100000
SecPcreMatchLimitRecursion 100000
SecRule REQUEST_HEADERS:Content-Type "^(?:application(?:/soap\\+|/)|text/)xml" \\
    "id:200000,phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=XML"
SecRule REQUEST_HEADERS:Content-Type "^application/json" \\
    "id:200001,phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=JSON"
SecRule REQBODY_ERROR "!@eq 0" \\
    "id:200002,phase:2,t:none,log,deny,status:400,msg:'Failed to parse request body.',chain"
    SecRule INBOUND_DATA_ERROR "@eq 0" "t:none"
SecRule REQBODY_ERROR "!@eq 0" \\
    "id:200003,phase:2,t:none,log,deny,status:400,msg:'Failed to parse the inspected part of the request body.',chain"
    SecRule INBOUND_DATA_ERROR "@eq 1" "t:none,chain"
    SecRule REQBODY_ERROR_MSG "!@rx {truncated}" "t:none"
SecDefaultAction "phase:1,log,auditlog,pass"
SecDefaultAction "phase:2,log,auditlog,pass"
{setup}
{includes}
SecAction "id:{score_rule},phase:2,pass,log,t:none,msg:'edge anomaly score %{{{score_variable}}}'"
"""


_BOUNDARY = re.compile(r'(?i)^\s*multipart/[^;]*;(?:.*;)?\s*boundary\s*=\s*(?:"([^"]+)"|([^\s;"]+))')


def multipart_boundary(content_type: str | None) -> bytes | None:
    """The boundary of a multipart body from its Content-Type, or None."""
    m = _BOUNDARY.match(content_type or "")
    return (m[1] or m[2]).encode("latin-1") if m else None


def close_multipart(body: bytes, boundary: bytes, limit: int) -> bytes | None:
    """At most `limit` bytes: the start of a multipart body cut there, closed with the final
    delimiter, so that the engine reads the parts before the cut (a form's fields ahead of a
    large file) and the cut part's start. Fed as it is, the engine's parser would find the
    final boundary missing and read no part at all. A part cut inside its header is left
    out; None if no part header is complete."""
    delimiter = b"\r\n--" + boundary
    closing = delimiter + b"--\r\n"
    if limit <= len(closing):
        return None
    head = body[:limit - len(closing)]
    last = head.rfind(delimiter)
    start = last + 2 if last >= 0 else 0
    if not head.startswith(delimiter[2:], start):
        return None
    if b"\r\n\r\n" not in head[start:]:            # cut in this part's header: left out
        if last < 0:
            return None
        head = head[:last]
    return head + closing


def engine_fields(version: str, fields, authority: bytes):
    """The header fields the engine reads: as sent, and for HTTP/2 and 3 (whose Host is the
    :authority pseudo-header, kept apart from the fields) a Host from the :authority when
    the client sent no Host field. Without it the CRS counts every such request as one
    without a Host (920280). Only the engine sees it: the fields forwarded are unchanged."""
    fields = list(fields)
    if (authority and not version.startswith("HTTP/1")
            and not any(name.lower() == b"host" for name, _ in fields)):
        fields.insert(0, (b"Host", authority))
    return fields


def compile_filters(expressions) -> list:
    """mitmproxy filter expressions (`~u ^/upload`, `~d api.example & ~m POST`) for waf.skip."""
    from mitmproxy import flowfilter
    out = []
    for expr in expressions:
        try:
            out.append(flowfilter.parse(expr))
        except ValueError as e:
            raise WafError(f"waf.skip: {expr!r} is not a mitmproxy filter expression: {e}") from None
    return out


def _quiet(message: str) -> None:
    pass


class WafError(Exception):
    """The engine could not be set up; said for the user."""


@dataclass
class Inspection:
    """One request's engine transaction between the phases."""
    txn: object
    boundary: bytes | None = None       # a multipart body's: a prefix of it is closed (close_multipart)


@dataclass
class Finding:
    """What the engine made of one request: JSON-safe, for the trace."""
    status: int | None = None           # set when the engine wants the request refused
    score: int = 0
    rules: list[int] = field(default_factory=list)
    partial: int | None = None          # the body was longer: only its first `partial` bytes were read

    def summary(self) -> str:
        read = f", partial: first {self.partial} bytes" if self.partial is not None else ""
        return f"score {self.score}, rules {','.join(map(str, self.rules)) or '-'}{read}"


class Waf:
    def __init__(self, config: WafConfig) -> None:
        try:
            from libmodsecurity import ModSecurity, RulesSet     # only when a WAF is configured
        except ImportError:
            raise WafError("the WAF needs the libmodsecurity package (pip install libmodsecurity)") from None
        rules_dir = os.path.join(config.crs, "rules")
        files = sorted(f for f in glob.glob(os.path.join(rules_dir, "REQUEST-*.conf"))
                       if not os.path.basename(f).startswith("REQUEST-910-"))
        if not files:
            raise WafError(f"no CRS request rules in {rules_dir}")
        includes = [f"Include {f}" for f in files]
        if config.exclusions:
            includes.append(f"Include {os.path.abspath(config.exclusions)}")
        self.engine = ModSecurity()
        self.engine.set_connector_information("edge (mitmproxy addons)")
        self.engine.set_log_callback(_quiet)      # verdicts go to the trace, not to stderr
        try:
            self.version = detect_version(config.crs)
        except CrsError as e:
            raise WafError(str(e)) from None
        setup = setup_for(self.version, config.paranoia, config.anomaly_threshold)
        self.rules = RulesSet()
        with tempfile.TemporaryDirectory(prefix="edge-waf-") as work:
            main = os.path.join(work, "main.conf")
            with open(main, "w") as f:
                f.write(MAIN_CONF.format(body_limit=config.body_limit, setup=setup.actions,
                                         includes="\n".join(includes), score_rule=SCORE_RULE,
                                         score_variable=setup.score_variable, truncated=TRUNCATED))
            count = self.rules.load_from_uri(main)
        self.body_limit = config.body_limit
        if count < 0:
            raise WafError(f"the rules did not load: {self.rules.get_parser_error().strip()}")
        self.count = count

    def begin(self, client: tuple[str, int], server: tuple[str, int], method: bytes, target: bytes,
              version: str, fields, authority: bytes = b"") -> tuple[object, Finding | None]:
        """Phases 0-1: connection, request line, headers, as the bytes the client sent (the
        binding takes bytes as they are; a str would reach the engine UTF-8 encoded). The
        transaction, and a finding if the engine already wants the request refused."""
        from libmodsecurity import Transaction
        txn = Transaction(self.engine, self.rules)
        txn.process_connection(client[0], client[1], server[0], server[1])
        txn.process_uri(target, method, version.removeprefix("HTTP/").encode("latin-1"))
        inspection = Inspection(txn)
        for name, value in engine_fields(version, fields, authority):
            txn.add_request_header(name, value)
            if name.lower() == b"content-type":
                inspection.boundary = multipart_boundary(value.decode("latin-1"))
        txn.process_request_headers()
        return inspection, self._refusal(txn)

    def finish(self, inspection: Inspection, body: bytes) -> Finding:
        """Phase 2: the body (or the first body_limit bytes of it: ProcessPartial), then the
        anomaly score against the threshold. A longer multipart body is closed at the cut;
        of any other, one byte past the limit is passed on, so that the engine knows the
        body went on (INBOUND_DATA_ERROR: a body processor's error on the cut is not the
        client's, rule 200003)."""
        txn = inspection.txn
        fed = body[:self.body_limit + 1]
        if len(body) > self.body_limit and inspection.boundary is not None:
            fed = close_multipart(body, inspection.boundary, self.body_limit) or fed
        if fed:
            txn.append_request_body(fed)
        txn.process_request_body()
        finding = self._refusal(txn) or Finding()
        finding.score, finding.rules = self._matches(txn)
        finding.partial = self.body_limit if len(body) > self.body_limit else None
        return finding

    def _refusal(self, txn) -> Finding | None:
        intervention = txn.intervention()
        if intervention is None or not intervention.disruptive:
            return None
        score, rules = self._matches(txn)
        return Finding(intervention.status if intervention.status >= 400 else 403, score, rules)

    @staticmethod
    def _matches(txn) -> tuple[int, list[int]]:
        score, rules = 0, []
        for message in txn.get_rule_messages():
            if message.rule_id == SCORE_RULE or message.rule_id in BLOCKING_RULES:
                m = _SCORE.search(message.message)
                score = int(m[1]) if m else score
            if message.rule_id != SCORE_RULE and message.rule_id not in rules:
                rules.append(message.rule_id)
        return score, rules
