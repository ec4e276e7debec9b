"""Which OWASP Core Rule Set a rules tree holds, and the variables that generation reads.

CRS 3 reads `tx.paranoia_level` and keeps its score in `tx.anomaly_score`; CRS 4 split the
paranoia level into a blocking and a detection level (`tx.blocking_paranoia_level`,
`tx.detection_paranoia_level`) and keeps the score that blocks in
`tx.blocking_inbound_anomaly_score`. Setting CRS 3's names for a CRS 4 tree is silently
ignored (paranoia 2 gives paranoia 1 results, the score reads 0), so the tree says which it is.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass

# "# OWASP ModSecurity Core Rule Set ver.3.3.4" (CRS 3), "# OWASP CRS ver.4.28.0" (CRS 4)
_HEADER = re.compile(r"^#\s*OWASP[^\n]*?\bver\.(\d+)\.(\d+)\.(\d+)", re.M)
_RULE_VER = re.compile(r"ver:'OWASP_CRS/(\d+)\.(\d+)\.(\d+)")
_SETUP = re.compile(r"tx\.crs_setup_version=(\d)(\d*)", re.I)      # 334, 4280: major, then the rest
_READ = 1 << 16                 # headers, and the setup SecAction of a crs-setup file, are near the top


class CrsError(Exception):
    """The tree is not a CRS generation the edge knows how to set up."""


@dataclass(frozen=True)
class CrsVersion:
    major: int
    minor: int
    patch: int
    source: str                 # where it was read, for `edge check` and the status
    stamp: int | None = None    # the tree's own tx.crs_setup_version, when that is what said it

    @property
    def setup_version(self) -> int:
        """What goes in tx.crs_setup_version: the number the CRS writes for its version
        (3.3.4 is 334, 4.28.0 is 4280), which only rule 901001's presence check reads."""
        return self.stamp or int(f"{self.major}{self.minor}{self.patch}")

    def __str__(self) -> str:
        return f"CRS {self.major}.{self.minor}.{self.patch}"


def _head(path: str, size: int = _READ) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(size)
    except OSError:
        return ""


def detect_version(tree: str) -> CrsVersion:
    """The CRS version of `tree` (the folder holding rules/): from the rule files' headers or
    their `ver:` actions (what actually runs), else from the tx.crs_setup_version SecAction of
    crs-setup.conf(.example) or of a rule file. A tree that says nothing is taken as CRS 3 (what
    the edge has always set up), one that says 5 or more is refused."""
    rules = sorted(glob.glob(os.path.join(tree, "rules", "*.conf")))
    for path in rules:
        text = _head(path)
        m = _HEADER.search(text) or _RULE_VER.search(text)
        if m:
            return _known(CrsVersion(int(m[1]), int(m[2]), int(m[3]), os.path.relpath(path, tree)))
    setups = [os.path.join(tree, name) for name in ("crs-setup.conf", "crs-setup.conf.example")]
    for path in setups + rules:
        m = _SETUP.search(_head(path, 1 << 20))
        if m:
            return _known(CrsVersion(int(m[1]), 0, 0, os.path.relpath(path, tree), int(m[1] + m[2])))
    return CrsVersion(3, 0, 0, "no version found: CRS 3 assumed")


def _known(version: CrsVersion) -> CrsVersion:
    if version.major not in (3, 4):
        raise CrsError(f"{version} ({version.source}): the edge sets up CRS 3 and CRS 4 only")
    return version


@dataclass(frozen=True)
class Setup:
    """The SecActions the edge writes in place of crs-setup.conf, and the score variable."""
    actions: str
    score_variable: str


def setup_for(version: CrsVersion, paranoia: int, threshold: int) -> Setup:
    """CRS 4: blocking and detection paranoia both at `paranoia:` (the edge does not run a
    detection-only level above the blocking one), the inbound threshold from
    anomaly_threshold; CRS 3: its single paranoia level, exactly as before."""
    thresholds = (f'SecAction "id:900110,phase:1,nolog,pass,t:none,'
                  f'setvar:tx.inbound_anomaly_score_threshold={threshold},'
                  f'setvar:tx.outbound_anomaly_score_threshold=4"')
    stamp = f'SecAction "id:900990,phase:1,nolog,pass,t:none,setvar:tx.crs_setup_version={version.setup_version}"'
    if version.major >= 4:
        paranoia_action = (f'SecAction "id:900000,phase:1,nolog,pass,t:none,'
                           f'setvar:tx.blocking_paranoia_level={paranoia},'
                           f'setvar:tx.detection_paranoia_level={paranoia}"')
        return Setup("\n".join((paranoia_action, thresholds, stamp)), "tx.blocking_inbound_anomaly_score")
    paranoia_action = f'SecAction "id:900000,phase:1,nolog,pass,t:none,setvar:tx.paranoia_level={paranoia}"'
    return Setup("\n".join((paranoia_action, thresholds, stamp)), "tx.anomaly_score")


def tree_identity(tree: str) -> tuple:
    """What changes when the tree is replaced (`edge waf update` swaps a link to a new folder)
    or edited: the resolved folder and its rule files' sizes and times. A reload rebuilds
    the WAF when this changed."""
    real = os.path.realpath(tree)
    stamps = []
    for path in sorted(glob.glob(os.path.join(real, "rules", "*"))):
        try:
            st = os.stat(path)
        except OSError:
            continue
        stamps.append((os.path.basename(path), st.st_size, st.st_mtime_ns))
    return real, tuple(stamps)
