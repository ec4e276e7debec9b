"""`edge geoip update`: fetch a current database from MaxMind's download service, check the
published SHA-256, unpack the .mmdb and swap it in atomically (a running edge notices the new
file and reloads it). Network I/O lives here only; the edge itself never downloads."""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import tempfile
from pathlib import Path

import requests

from addons.geo.locate import GeoDatabaseError, describe

# MaxMind's documented direct-download endpoints: the licence key alone (the long-standing
# form), or account id + licence key with HTTP basic auth (the current one).
LEGACY_URL = "https://download.maxmind.com/app/geoip_download"
ACCOUNT_URL = "https://download.maxmind.com/geoip/databases/{edition}/download"
CHUNK = 1 << 16


class UpdateError(Exception):
    """The update failed; the installed database is untouched."""


def _get(edition: str, license_key: str, account_id: str | None, suffix: str, stream: bool) -> requests.Response:
    if account_id:
        url, params, auth = ACCOUNT_URL.format(edition=edition), {"suffix": suffix}, (account_id, license_key)
    else:
        url, params, auth = LEGACY_URL, {"edition_id": edition, "license_key": license_key, "suffix": suffix}, None
    try:
        response = requests.get(url, params=params, auth=auth, timeout=60, stream=stream)
    except requests.RequestException as e:
        raise UpdateError(f"cannot reach MaxMind's download service: {e}") from None
    if response.status_code in (401, 403):
        raise UpdateError("MaxMind refused the licence key (or the account has no access to this edition)")
    if response.status_code == 404:
        raise UpdateError(f"MaxMind has no edition {edition!r}")
    if response.status_code != 200:
        raise UpdateError(f"MaxMind's download service answered {response.status_code}")
    return response


def update(license_key: str, out: str | os.PathLike, edition: str = "GeoLite2-City",
           account_id: str | None = None) -> str:
    """Download, verify and install `edition` at `out`. Returns what was installed."""
    if not re.fullmatch(r"[A-Za-z0-9-]+", edition):
        raise UpdateError(f"{edition!r} is not an edition id like GeoLite2-City")
    out = Path(out)
    published = _get(edition, license_key, account_id, "tar.gz.sha256", stream=False).text.split()
    if not published or not re.fullmatch(r"[0-9a-fA-F]{64}", published[0]):
        raise UpdateError("MaxMind's SHA-256 file is not in the expected form")
    expected = published[0].lower()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".geoip-") as work:
        archive = Path(work) / "db.tar.gz"
        digest = hashlib.sha256()
        with _get(edition, license_key, account_id, "tar.gz", stream=True) as response, open(archive, "wb") as f:
            for chunk in response.iter_content(CHUNK):
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != expected:
            raise UpdateError(f"SHA-256 mismatch: MaxMind published {expected}, the download is {digest.hexdigest()}")
        unpacked = Path(work) / out.name
        try:
            with tarfile.open(archive, "r:gz") as tar:
                member = next((m for m in tar.getmembers() if m.isfile() and m.name.endswith(f"/{edition}.mmdb")), None)
                if member is None:
                    raise UpdateError(f"the archive holds no {edition}.mmdb")
                with tar.extractfile(member) as src, open(unpacked, "wb") as dst:   # by content: no paths from the archive
                    while chunk := src.read(CHUNK):
                        dst.write(chunk)
        except tarfile.TarError as e:
            raise UpdateError(f"the archive cannot be read: {e}") from None
        try:
            what = describe(unpacked)
        except GeoDatabaseError as e:
            raise UpdateError(f"the downloaded database is not usable: {e}") from None
        os.chmod(unpacked, 0o644)
        os.replace(unpacked, out)           # atomic: readers see the old file or the new one
    return f"{what} installed at {out}"
