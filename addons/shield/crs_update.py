"""`edge waf update`: install an official OWASP CRS release for `shield.waf.crs`.

The CRS project publishes each release on its GitHub releases page as
`coreruleset-X.Y.Z-minimal.tar.gz` (the rules without the tests) with a detached OpenPGP
signature beside it (`.asc`), made with the project's key (fingerprint 3600 6F0E 0BA1 6783
2158 8211 38EE ACA1 AB8A 6E72, SECURITY.md of the CRS repository); it publishes no checksum
file. So the signature is what is checked: GnuPG (python-gnupg) in a keyring of its own that
holds only that key, the key's fingerprint pinned here (the key itself is fetched from the
project's site, or given with --key). Then the archive is unpacked into a new folder beside
DIR, refusing the whole archive if any entry is not a plain file or folder inside it; the
rules must load in the engine; and DIR, a symbolic link, is swapped to the new folder in one
rename. An edge rebuilds its WAF from the new rules on its next reload (`edge reload`,
SIGHUP): the WAF's key includes the tree it resolves to. Network I/O lives here only.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

import requests

RELEASES = "https://github.com/coreruleset/coreruleset/releases"
LATEST = "https://api.github.com/repos/coreruleset/coreruleset/releases/latest"
KEY_URL = "https://coreruleset.org/security.asc"
CRS_FINGERPRINT = "36006F0E0BA167832158821138EEACA1AB8A6E72"
CHUNK = 1 << 16
MAX_ARCHIVE = 64 << 20          # a CRS 4 minimal archive is well under 1 MB
MAX_UNPACKED = 256 << 20
MAX_MEMBERS = 10_000
_VERSION = re.compile(r"v?(4\.\d+\.\d+)")
PREFIX = ".crs-"                # the folders DIR points to, beside it


class UpdateError(Exception):
    """The update failed; the installed rules are untouched."""


def _get(url: str, what: str, stream: bool = False, **kw) -> requests.Response:
    try:
        response = requests.get(url, timeout=60, stream=stream, **kw)
    except requests.RequestException as e:
        raise UpdateError(f"cannot fetch {what}: {e}") from None
    if response.status_code == 404:
        raise UpdateError(f"{what} is not published ({url})")
    if response.status_code != 200:
        raise UpdateError(f"{what}: {url} answered {response.status_code}")
    return response


def latest_version() -> str:
    """The newest release's version, from GitHub's releases API."""
    try:
        tag = _get(LATEST, "the latest CRS release").json()["tag_name"]
    except (ValueError, KeyError, TypeError):
        raise UpdateError("GitHub's answer for the latest CRS release is not in the expected form") from None
    return release_version(str(tag))


def release_version(text: str) -> str:
    """4.28.0 from `v4.28.0` or `4.28.0`; CRS 4 releases only (the edge sets up CRS 3 from Debian)."""
    m = _VERSION.fullmatch(text.strip())
    if not m:
        raise UpdateError(f"{text!r} is not a CRS 4 release like 4.28.0")
    return m[1]


def asset_url(version: str) -> str:
    return f"{RELEASES}/download/v{version}/coreruleset-{version}-minimal.tar.gz"


def _download(url: str, to: Path, what: str, limit: int) -> None:
    """Stream `url` into `to`; a body cut short of its Content-Length, or over `limit`, fails."""
    try:
        with _get(url, what, stream=True) as response, open(to, "wb") as f:
            expected = response.headers.get("Content-Length")
            got = 0
            for chunk in response.iter_content(CHUNK):
                got += len(chunk)
                if got > limit:
                    raise UpdateError(f"{what} is larger than {limit} bytes")
                f.write(chunk)
    except requests.RequestException as e:
        raise UpdateError(f"the download of {what} was interrupted: {e}") from None
    if expected is not None and expected.isdigit() and got != int(expected):
        raise UpdateError(f"the download of {what} was interrupted: {got} of {expected} bytes")


def verify_signature(archive: Path, signature: Path, key: bytes, fingerprint: str, work: Path) -> str:
    """Check the detached signature with GnuPG in a keyring of its own that holds only `key`,
    which must be the one with `fingerprint`. Returns who signed."""
    import gnupg                                # python-gnupg, driving Debian's gpg
    home = work / "gnupg"
    home.mkdir(mode=0o700)
    try:
        gpg = gnupg.GPG(gnupghome=str(home))
    except (OSError, ValueError) as e:
        raise UpdateError(f"GnuPG is needed to check the CRS signature (apt-get install gpg): {e}") from None
    imported = gpg.import_keys(key)
    if fingerprint.upper() not in {f.upper() for f in imported.fingerprints}:
        raise UpdateError(f"the signing key is not the CRS project's (expected fingerprint {fingerprint}, "
                          f"got {', '.join(imported.fingerprints) or 'no key'})")
    with open(signature, "rb") as f:
        verified = gpg.verify_file(f, str(archive))
    if not verified.valid or (verified.pubkey_fingerprint or "").upper() != fingerprint.upper():
        raise UpdateError(f"the signature does not verify: {verified.status or 'not a signature'} "
                          f"(nothing signed by {fingerprint} matches the download)")
    return verified.username or fingerprint


def safe_members(tar: tarfile.TarFile) -> list[tuple[tarfile.TarInfo, str]]:
    """Every entry with its path below the archive's top folder, or UpdateError if any entry
    is not a plain file or folder inside it (no links, devices, absolute paths or ..)."""
    members, total = [], 0
    for i, m in enumerate(tar):
        if i >= MAX_MEMBERS:
            raise UpdateError(f"the archive holds more than {MAX_MEMBERS} entries")
        parts = m.name.replace("\\", "/").split("/")
        if m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
            kind = "link" if (m.issym() or m.islnk()) else "path" if m.isfile() or m.isdir() else "special file"
            raise UpdateError(f"the archive is refused: hostile {kind} {m.name!r}")
        total += m.size
        if total > MAX_UNPACKED:
            raise UpdateError(f"the archive unpacks to more than {MAX_UNPACKED} bytes")
        inner = "/".join(p for p in parts[1:] if p not in ("", "."))
        if inner:
            members.append((m, inner))
    return members


def unpack(archive: Path, into: Path) -> None:
    """The archive's top folder's content into `into`, by content: names are joined below
    `into` only after safe_members checked them, and files are written afresh (0644/0755)."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member, inner in safe_members(tar):
                target = into / inner
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "xb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
                os.chmod(target, 0o644)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UpdateError(f"the archive cannot be unpacked: {e}") from None


def _check_rules(tree: Path, version: str) -> str:
    """The unpacked tree is the release asked for and the engine loads it."""
    from addons.config import WafConfig
    from addons.shield.crs import CrsError, detect_version
    from addons.shield.waf import Waf, WafError
    if not (tree / "rules").is_dir():
        raise UpdateError("the archive holds no rules/ folder")
    try:
        found = detect_version(str(tree))
        if f"{found.major}.{found.minor}.{found.patch}" != version:
            raise UpdateError(f"the archive holds {found}, not CRS {version}")
        waf = Waf(WafConfig(crs=str(tree)))
    except (CrsError, WafError) as e:
        raise UpdateError(f"the rules do not load: {e}") from None
    return f"{found}, {waf.count} rules"


def _swap(out: Path, tree: Path) -> Path | None:
    """Point the link `out` at `tree` in one rename; the folder it pointed to before."""
    previous = None
    if out.is_symlink():
        previous = out.parent / os.readlink(out)
    elif out.exists():
        raise UpdateError(f"{out} exists and is not a link made by `edge waf update`: move it away or choose another --out")
    link = out.parent / f"{PREFIX}link-{os.getpid()}"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(tree.name, link)             # relative: the pair can be moved together
    os.replace(link, out)                   # atomic: readers see the old tree or the new one
    return previous


def update(out: str | os.PathLike, version: str | None = None, key: bytes | None = None) -> str:
    """Download, verify and install a CRS 4 release (the latest without `version`) so that
    `out` points at it, signed by the key with CRS_FINGERPRINT. Returns what was installed."""
    out = Path(out).absolute()
    version = release_version(version) if version else latest_version()
    if out.exists() and not out.is_symlink():
        raise UpdateError(f"{out} exists and is not a link made by `edge waf update`: move it away or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    url = asset_url(version)
    key = key if key is not None else _get(KEY_URL, "the CRS project's signing key").content
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f"{PREFIX}download-") as work:
        work = Path(work)
        archive, signature = work / "crs.tar.gz", work / "crs.tar.gz.asc"
        _download(url + ".asc", signature, f"the signature of CRS {version}", 1 << 20)
        _download(url, archive, f"CRS {version}", MAX_ARCHIVE)
        signer = verify_signature(archive, signature, key, CRS_FINGERPRINT, work)
        tree = Path(tempfile.mkdtemp(dir=out.parent, prefix=f"{PREFIX}{version}-"))
        try:
            unpack(archive, tree)
            what = _check_rules(tree, version)
            os.chmod(tree, 0o755)
            previous = _swap(out, tree)
        except BaseException:
            shutil.rmtree(tree, ignore_errors=True)
            raise
    if previous is not None and previous.name.startswith(PREFIX) and previous.resolve() != tree.resolve():
        shutil.rmtree(previous, ignore_errors=True)     # an edge holds its rules in memory once loaded
    return f"{what} installed at {out} (signed by {signer}); `edge reload` loads it into a running edge"
