"""`edge forward report` and `edge forward ca init`: the forward proxy's tools beside the proxy.

Click commands added to the `forward` group (edgecli/forward.py). Each imports what it needs when
it runs, so `edge --help` stays fast.
"""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from edgecli.main import Problem

CA_BASENAME = "mitmproxy"                   # mitmproxy's confdir names: mitmproxy-ca.pem and the rest
CA_SECRET_FILES = (f"{CA_BASENAME}-ca.pem", f"{CA_BASENAME}-ca.p12")             # hold the private key
CA_PUBLIC_FILES = (f"{CA_BASENAME}-ca-cert.pem", f"{CA_BASENAME}-ca-cert.cer", f"{CA_BASENAME}-ca-cert.p12",
                   f"{CA_BASENAME}-dhparam.pem")


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """`24h`, `30m`, `7d` back from now, or an ISO 8601 time (UTC when it names no zone)."""
    from addons.config import parse_duration
    try:
        return (now or datetime.now(UTC)) - timedelta(seconds=parse_duration(value))
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected a duration like 30m, 24h or 7d, or an ISO 8601 time") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)


def activity_log_of(config_path: str) -> str:
    """The `activity_log:` a forward config names, relative to the config file."""
    import yaml

    from addons.config import _config_path
    try:
        with open(config_path, encoding="utf-8") as file:
            config = yaml.safe_load(file)
    except (OSError, yaml.YAMLError) as error:
        raise Problem(f"{config_path}: cannot read the config: {error}") from None
    path = config.get("activity_log") if isinstance(config, dict) else None
    if not isinstance(path, str) or not path:
        raise Problem(f"{config_path}: names no activity_log; give --log PATH")
    return _config_path(path, config_path)


@click.command("report")
@click.option("--since", metavar="DURATION|TIME", help="Only entries of the last 30m, 24h, 7d..., or since an ISO time.")
@click.option("--log", "log_path", metavar="PATH", help="The activity log [the config's activity_log].")
@click.option("-c", "--config", "config_path", metavar="FILE", help="The forward config naming the activity log.")
@click.option("--html", "html_path", metavar="FILE", help="Also write the report as one self-contained HTML page.")
@click.option("--top", default=10, show_default=True, type=click.IntRange(1, 1000), help="Rows per table.")
@click.pass_context
def report(ctx: click.Context, since: str | None, log_path: str | None, config_path: str | None,
           html_path: str | None, top: int) -> None:
    """Top domains and users by requests and bytes, blocked attempts by rule, from the activity log."""
    from addons.forward.report import read_log, render_html, render_text
    config_path = config_path or (ctx.parent.params.get("config_path") if ctx.parent else None)
    if log_path is None:
        if config_path is None:
            raise Problem("which activity log? give --log PATH or -c FILE")
        log_path = activity_log_of(config_path)
    start = parse_since(since) if since else None
    try:
        counted = read_log(log_path, start)
    except OSError as error:
        raise Problem(f"{log_path}: {error.strerror or error}") from None
    click.echo(render_text(counted, top), nl=False)
    if html_path:
        try:
            Path(html_path).write_text(render_html(counted, top), encoding="utf-8")
        except OSError as error:
            raise Problem(f"{html_path}: {error.strerror or error}") from None
        click.echo(f"wrote {html_path}")


@click.group("ca")
def ca() -> None:
    """The interception CA: the proxy signs the certificates of decrypted sites with it."""


@ca.command("init")
@click.option("--out", default="ca", show_default=True, metavar="DIR", help="Where the CA's files go.")
@click.option("--force", is_flag=True, help="Replace an existing CA (every user must install the new one).")
@click.option("--cn", default="edge forward proxy CA", show_default=True, help="The CA's common name.")
@click.option("--org", default="edge", show_default=True, help="The CA's organisation name.")
def ca_init(out: str, force: bool, cn: str, org: str) -> None:
    """Generate the interception CA in mitmproxy's confdir layout and say how users install it."""
    from mitmproxy.certs import CertStore
    directory = Path(out)
    existing = [name for name in CA_SECRET_FILES if (directory / name).exists()]
    if existing and not force:
        raise Problem(f"{directory / existing[0]} exists: a CA is there already (--force replaces it, "
                      "and every user must then install the new one)")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in CA_SECRET_FILES + CA_PUBLIC_FILES:      # written anew: a kept file would keep its old mode
        (directory / name).unlink(missing_ok=True)
    CertStore.create_store(directory, CA_BASENAME, 2048, organization=org, cn=cn)
    for name in CA_SECRET_FILES:
        os.chmod(directory / name, 0o600)
    click.echo(install_text(directory))


def install_text(directory: Path) -> str:
    """What was written, the fingerprint to check, and how each platform trusts the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    cert_pem = directory / f"{CA_BASENAME}-ca-cert.pem"
    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    fingerprint = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest().upper()
    pairs = ":".join(fingerprint[i:i + 2] for i in range(0, len(fingerprint), 2))
    secret, crt, cer = directory / CA_SECRET_FILES[0], cert_pem, directory / f"{CA_BASENAME}-ca-cert.cer"
    return f"""\
Wrote the interception CA to {directory}/ ({cert.subject.rfc4514_string()}, valid until {cert.not_valid_after_utc:%Y-%m-%d}):
  {secret}  certificate + private key (mode 0600): the proxy's, keep it secret
  {crt}  the certificate alone: give this to users ({cer.name} and {CA_BASENAME}-ca-cert.p12: the same in other formats)
SHA-256 fingerprint (users can check it): {pairs}

In the forward config:  intercept: {{ca: {secret}}}

How users install {crt.name}:
  Debian/Ubuntu: sudo cp {crt} /usr/local/share/ca-certificates/edge-forward-ca.crt && sudo update-ca-certificates
  Fedora/RHEL:   sudo cp {crt} /etc/pki/ca-trust/source/anchors/edge-forward-ca.pem && sudo update-ca-trust
  macOS:         sudo security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain {crt}
  Windows:       certutil -addstore Root {cer}   (or Group Policy: Trusted Root Certification Authorities)
  Firefox:       Settings > Privacy & Security > Certificates > View Certificates > Authorities > Import
                 (or the enterprise policy Certificates.ImportEnterpriseRoots / Certificates.Install)
  Android:       Settings > Security > Install a certificate > CA certificate, with {cer.name}
                 (apps since Android 7 trust only the system store unless they opt in)
  iOS:           open {cer.name}, install the profile, then Settings > General > About >
                 Certificate Trust Settings: turn on full trust
Anyone holding {secret.name} can impersonate every website to these users: keep it on the proxy only."""

