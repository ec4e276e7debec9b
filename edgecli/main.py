"""The `edge` command line: run, demo, check.

Start-up time matters (`edge run` should answer within about a second, `edge --help` at once):
modules are imported by the commands that use them, so a command loads only what it needs
(mitmproxy and the addons for run and demo; the WAF engine only where one is configured).
bench/startup.py measures it.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from addons.config import EdgeConfig
    from edgecli import launch as launcher

EXAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "data" / "edge.example.yaml"


def default_confdir() -> str:
    return os.path.join(click.get_app_dir("edge"), "mitmproxy")


class Problem(click.ClickException):
    """Something the user can fix: one line, exit 1."""

    def show(self, file=None) -> None:
        click.echo(f"edge: {self.message}", err=True)


class ConfigProblem(Problem):
    """A bad config file: FILE:LINE: key: problem, one line per mistake, exit 2."""
    exit_code = 2

    def show(self, file=None) -> None:
        for line in self.message.splitlines():
            click.echo(f"edge: {line}", err=True)


def read_config(path: str, engines: bool = True) -> EdgeConfig:
    """The config at `path`, or ConfigProblem with every mistake. `engines`: also open what it
    names (the geo database, the WAF's rules) to check them; run and demo leave that to the
    edge they start (see start), which then loads each once, not twice."""
    from addons.config import ConfigError, load_config
    try:
        config = load_config(path)
    except ConfigError as e:
        raise ConfigProblem(str(e)) from None
    if not engines:
        return config
    if config.geo is not None:
        from addons.geo.locate import GeoDatabaseError, describe, embedded_database
        try:
            describe(config.geo.database or embedded_database())
        except GeoDatabaseError as e:
            raise engine_problem(path, e) from None
    if config.shield is not None and config.shield.waf is not None:
        from addons.shield.waf import Waf, WafError, compile_filters
        try:
            compile_filters(config.shield.waf.skip)
            Waf(config.shield.waf)
        except WafError as e:
            raise engine_problem(path, e) from None
    return config


def engine_problem(path: str, e: Exception) -> ConfigProblem:
    """The geo database or the WAF named by the config cannot be loaded."""
    from addons.geo.locate import GeoDatabaseError
    return ConfigProblem(f"{path}: {'routing.geo.database' if isinstance(e, GeoDatabaseError) else 'shield.waf'}: {e}")


def start(launch: launcher.Launch) -> None:
    from addons.geo.locate import GeoDatabaseError
    from addons.shield.waf import WafError
    from edgecli import launch as launcher
    try:
        launcher.run(launch)
    except launcher.LaunchError as e:
        raise Problem(str(e)) from None
    except (GeoDatabaseError, WafError) as e:        # the edge loads them (read_config did not)
        raise engine_problem(launch.config.source, e) from None


def _listen_option(ctx, param, value):
    if value is None:
        return None
    from addons.config import parse_hostport
    try:
        return parse_hostport(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _workers_option(ctx, param, value):
    if value is None:
        return None
    from addons.config import parse_workers
    try:
        return parse_workers(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _announce(config: EdgeConfig, web: bool):
    def on_ready(master, addr) -> None:
        bound = master.addons.get("proxyserver").listen_addrs()
        kinds = [lst.tls for lst in config.all_listeners] if config.listeners else [None] * len(bound)
        where = ", ".join(("https://" if tls else "http://" if tls is False else "") + _hostport(a[0], a[1])
                          for a, tls in zip(bound, kinds))
        click.echo(f"edge: listening on {where or _hostport(*addr)}, default pool {config.default_pool!r} "
                   f"({', '.join(o.url for o in config.pools[config.default_pool].origins)})", err=True)
        if web:
            click.echo(f"edge: mitmweb at {master.web_url}", err=True)
    return on_ready


def _print_version(ctx: click.Context, param, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    import platform
    from importlib import metadata

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "(not installed)"
    click.echo(f"edge {version('edge')} (mitmproxy {version('mitmproxy')}, Python {platform.python_version()})")
    ctx.exit()


class EdgeGroup(click.Group):
    """The `edge` group, whose commands kept in modules of their own (`edge forward`) are
    imported when named or listed: those modules import this one, so importing them here
    would make a cycle."""

    ELSEWHERE = {"forward": ("edgecli.forward", "forward")}

    def list_commands(self, ctx) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.ELSEWHERE})

    def get_command(self, ctx, name):
        if name in self.ELSEWHERE and name not in self.commands:
            module, attribute = self.ELSEWHERE[name]
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)


@click.group(cls=EdgeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Print edge's version (and mitmproxy's, Python's) and exit.")
def cli() -> None:
    """edge: a reverse-proxy edge (origin masking, balancing, cache, shield) built from mitmproxy addons."""


@cli.command()
@click.option("--origin", "origins", multiple=True, metavar="URL",
              help="An origin server (repeatable); together they form one pool of equal weight.")
@click.option("--listen", callback=_listen_option, metavar="HOST:PORT", help="Where clients connect [127.0.0.1:8080].")
@click.option("-c", "--config", "config_path", metavar="FILE", help="The edge YAML config.")
@click.option("--web", is_flag=True, help="Run under mitmweb (UI on 127.0.0.1 only) to inspect flows.")
@click.option("--web-port", default=8081, show_default=True, help="mitmweb's UI port with --web.")
@click.option("--access-log", metavar="PATH|-", help="JSON access log: a file, or - for stdout.")
@click.option("--cert", metavar="PEM", help="Terminate TLS with this PEM (certificate chain, then key).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Set a mitmproxy option (repeatable).")
@click.option("--admin", callback=_listen_option, metavar="HOST:PORT",
              help="Serve the status endpoint that `edge status` reads here [admin: in the config; off].")
@click.option("--confdir", default=default_confdir, show_default="~/.config/edge/mitmproxy",
              help="mitmproxy's private state (its CA) lives here.")
@click.option("--workers", callback=_workers_option, metavar="N|auto",
              help="Processes sharing the listeners, under a supervisor [workers: in the config; 1].")
def run(origins, listen, config_path, web, web_port, access_log, cert, settings, admin, confdir, workers) -> None:
    """Run the edge in front of your origins."""
    from addons.config import config_from_origins
    from edgecli import launch as launcher
    if config_path and origins:
        raise click.UsageError("give either --origin URL ... or -c FILE, not both")
    if config_path:
        config = read_config(config_path, engines=False)
    elif origins:
        try:
            config = config_from_origins(list(origins))
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--origin") from None
    else:
        raise click.UsageError("give --origin URL (or -c FILE); `edge demo` runs one with demo origins")
    config = _overridden(config, listen, access_log, admin, workers)
    from addons.workers import runtime
    try:
        worker = runtime.current()          # one of a supervisor's (edgecli/supervisor.py); None: not
    except runtime.RuntimeEnvError as e:
        raise Problem(str(e)) from None
    try:
        if config.workers > 1 and web:
            raise launcher.LaunchError("--web runs one process: not with workers (give --workers 1)")
        if config.workers > 1 and any(lst.address[1] == 0 for lst in config.all_listeners):
            raise launcher.LaunchError("workers share a port: listen on a port other than 0")
        for listener in config.all_listeners if not worker else ():    # the supervisor checked
            launcher.check_listen(*listener.address)
        if config.admin and not worker:
            launcher.check_listen(*config.admin)
        if cert:
            if config.certificates or config.acme:
                raise launcher.LaunchError("give --cert or the config's certificates:/acme:, not both")
            launcher.check_cert(cert)
    except launcher.LaunchError as e:
        raise Problem(str(e)) from None
    if config.workers > 1 and not worker:
        raise SystemExit(_supervise(config, confdir))
    reread = (lambda: _overridden(read_config(config_path), listen, access_log, admin, workers)) if config_path else None
    announce = None if worker is not None and worker.index != 0 else _announce(config, web)   # worker 0 says it
    start(launcher.Launch(config=config, confdir=confdir, web=web, web_port=web_port, cert=cert,
                          settings=settings, on_ready=announce, reread=reread))


def _supervise(config: EdgeConfig, confdir: str) -> int:
    """`edge run` with workers: this process supervises the same command run N times. The
    admin token is made here first, so that every worker reads the same one."""
    import sys
    from addons.lifecycle.rules import generated_token
    from edgecli.supervisor import supervise
    if config.admin and config.admin_token_file is None:
        try:
            generated_token(confdir)
        except OSError as e:
            raise Problem(f"cannot write the admin token under {confdir}: {e.strerror}") from None
    return supervise(config, confdir, sys.argv[1:])


def _overridden(config: EdgeConfig, listen, access_log, admin, workers=None) -> EdgeConfig:
    """The command line's settings over the file's: at start, and at every reload."""
    if listen:
        config = dataclasses.replace(config, listen=listen, listeners=())    # one plain listener
    if access_log:
        config = dataclasses.replace(config, access_log=access_log)
    if admin:
        config = dataclasses.replace(config, admin=admin)
    if workers:
        config = dataclasses.replace(config, workers=workers)
    return config


@cli.command()
@click.option("-c", "--config", "config_path", default=str(EXAMPLE_CONFIG), show_default="data/edge.example.yaml",
              metavar="FILE", help="The config whose origins the demo impersonates.")
@click.option("--web", is_flag=True, help="Run under mitmweb to inspect flows.")
@click.option("--confdir", default=default_confdir, show_default="~/.config/edge/mitmproxy")
def demo(config_path, web, confdir) -> None:
    """Start demo origins (eu, us, ap) on loopback, each its own process, and the edge in front
    of them; kill one to watch the edge fail over."""
    from edgecli import launch as launcher
    from edgecli.origins import OriginError, OriginProcess
    config = read_config(config_path, engines=False)
    servers: list[OriginProcess] = []
    try:
        for pool in config.pools.values():
            for i, origin in enumerate(pool.origins):
                name = pool.name if len(pool.origins) == 1 else f"{pool.name}-{i + 1}"
                servers.append(OriginProcess(name, origin.host, origin.port).start())
        for server in servers:
            try:
                server.ready()
            except OriginError as e:
                raise Problem(f"demo origin {server.name} cannot listen on {_hostport(server.host, server.port)}: "
                              f"{e}") from None
        try:
            launcher.check_listen(*config.listen)
            if config.admin:
                launcher.check_listen(*config.admin)
        except launcher.LaunchError as e:
            raise Problem(str(e)) from None
        host, port = config.listen
        base = f"http://{host}:{port}"
        status = "edge status" if config.admin in (None, (DEFAULT_ADMIN_HOST, DEFAULT_ADMIN_PORT)) else \
            f"edge status --admin http://{_hostport(*config.admin)}"
        click.echo("\n".join([
            f"edge demo: origins {', '.join(f'{s.name}={s.url} (pid {s.pid})' for s in servers)}; edge on {base}",
            "try:",
            f"  curl -i {base}/            # hello from eu, Server: edge, no X-Powered-By",
            f"  curl -i {base}/redirect    # Location rewritten to the edge",
            f"  curl -i {base}/leaky       # internal IPs, Via and origin links removed or rewritten",
            f"  curl -i {base}/login       # Set-Cookie Domain rewritten to the public host",
            f"  curl -s {base}/echo        # what the origin saw: X-Forwarded-For, Forwarded, Host",
            f"  curl -s {base}/echo -H 'X-Forwarded-For: 223.5.5.5'   # a client in China: pool ap",
            f"  {status:<26} # pools, origins, health, requests in flight",
            *_failover_lines(config, servers, base, status),
            "Ctrl-C stops everything (the origins too).",
        ]), err=True)
        start(launcher.Launch(config=config, confdir=confdir, web=web, on_ready=_announce(config, web)))
    finally:
        for s in servers:
            s.stop()


DEFAULT_ADMIN_HOST, DEFAULT_ADMIN_PORT = "127.0.0.1", 9090      # where `edge status` looks by default


def _failover_lines(config: EdgeConfig, servers, base: str, status: str) -> list[str]:
    """The try-list's failover lesson: which origin to kill, and who answers then."""
    pool = config.pools[config.default_pool]
    victim = next((s for s in servers if (s.host, s.port) == (pool.origins[0].host, pool.origins[0].port)), None)
    if victim is None:
        return []
    if len(pool.origins) > 1:
        then = f"the other origins of pool {pool.name} answer, without an error in between"
    elif pool.fallback:
        then = f"pool {pool.fallback} answers ({pool.name}'s fallback), without an error in between"
    else:
        then = f"pool {pool.name} has nothing else: the edge's own error page"
    return ["failover: every origin is its own process",
            f"  kill {victim.pid:<22}# origin {victim.name} dies",
            f"  curl -i {base}/            # {then}",
            f"  {status:<26} # origin {victim.name} {victim.url}: down"]


@cli.command()
@click.argument("url")
@click.option("--edge", "edge_url", default="http://127.0.0.1:8080", show_default=True, metavar="URL",
              help="Where the running edge listens (its scheme is the scheme of the purged key).")
@click.option("--insecure", is_flag=True, help="With an https --edge: do not verify its certificate.")
def purge(url, edge_url, insecure) -> None:
    """Drop URL (all its variants) from a running edge's cache, by sending it PURGE."""
    import http.client
    import ssl
    from urllib.parse import urlsplit
    target, edge = urlsplit(url), urlsplit(edge_url)
    if not target.hostname or edge.scheme not in ("http", "https") or not edge.hostname:
        raise click.BadParameter("expected absolute URLs like http://shop.example/page", param_hint="URL/--edge")
    if edge.scheme == "https":
        context = ssl._create_unverified_context() if insecure else ssl.create_default_context()
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(edge.hostname, edge.port or 443,
                                                                        timeout=10, context=context)
    else:
        conn = http.client.HTTPConnection(edge.hostname, edge.port or 80, timeout=10)
    path = (target.path or "/") + (f"?{target.query}" if target.query else "")
    try:
        conn.request("PURGE", path, headers={"Host": target.netloc})
        status = conn.getresponse().status
    except OSError as e:
        raise Problem(f"cannot reach the edge at {edge_url}: {e.strerror or e}") from None
    finally:
        conn.close()
    if status == 200:
        click.echo(f"purged {url}")
    elif status == 404:
        click.echo(f"not cached: {url}")
    elif status == 403:
        raise Problem("the edge refused: this address is not in cache.purge_from")
    else:
        raise Problem(f"the edge answered {status}")


@cli.command()
@click.option("--admin", "admin_url", default="http://127.0.0.1:9090", show_default=True, metavar="URL",
              help="The running edge's admin endpoint (admin: in its config, or edge run --admin).")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
@click.option("--cluster", "cluster", is_flag=True, help="List the cluster's members, with the age of their last beat.")
def status(admin_url, as_json, cluster) -> None:
    """Print each pool's origins of a running edge: weight, health, requests in flight."""
    import http.client
    import json
    from urllib.parse import urlsplit
    from addons.admin import format_status
    parts = urlsplit(admin_url)
    if parts.scheme != "http" or not parts.hostname:
        raise click.BadParameter("expected http://HOST:PORT", param_hint="--admin")
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=10)
    try:
        conn.request("GET", "/status")
        response = conn.getresponse()
        body = response.read()
    except OSError as e:
        raise Problem(f"cannot reach the edge's admin endpoint at {admin_url}: {e.strerror or e} "
                      "(is the edge running, with admin: set in its config or --admin?)") from None
    finally:
        conn.close()
    if response.status != 200:
        raise Problem(f"the admin endpoint answered {response.status}")
    snapshot = json.loads(body)
    if cluster:
        from addons.cluster.members import format_cluster
        if "cluster" not in snapshot:
            raise Problem("this edge is not in a cluster (no cluster: section in its config)")
        part = snapshot["cluster"]
        click.echo(json.dumps(part, indent=1) if as_json else format_cluster(part))
        return
    click.echo(json.dumps(snapshot, indent=1) if as_json else format_status(snapshot))


@cli.command()
@click.option("--admin", "admin_url", default="http://127.0.0.1:9090", show_default=True, metavar="URL",
              help="The running edge's admin endpoint (admin: in its config, or edge run --admin).")
@click.option("--token-file", metavar="FILE", help="The admin token: admin.token_file of the config, else "
              "the one the edge wrote under its confdir [~/.config/edge/mitmproxy/admin-token].")
def reload(admin_url, token_file) -> None:
    """Make a running edge read its config file again and apply it in place (like kill -HUP);
    exit 2 with FILE:LINE: key: problem if it refused the file (the running config stays)."""
    import http.client
    import json
    from urllib.parse import urlsplit
    from addons.lifecycle.rules import TOKEN_FILE
    token_file = token_file or os.path.join(default_confdir(), TOKEN_FILE)
    try:
        with open(token_file, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise Problem(f"cannot read the admin token {token_file}: {e.strerror} (a running edge with admin: "
                      "in its config names its token file at start; give it with --token-file, or send "
                      "the edge SIGHUP)") from None
    parts = urlsplit(admin_url)
    if parts.scheme != "http" or not parts.hostname:
        raise click.BadParameter("expected http://HOST:PORT", param_hint="--admin")
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=30)
    try:
        conn.request("POST", "/reload", headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        body = response.read()
    except OSError as e:
        raise Problem(f"cannot reach the edge's admin endpoint at {admin_url}: {e.strerror or e}") from None
    finally:
        conn.close()
    try:
        answer = json.loads(body)
    except ValueError:
        answer = {}
    if response.status == 200:
        click.echo(f"edge: {answer.get('message', 'reloaded')}")
    elif response.status == 401:
        raise Problem(f"the admin endpoint refused the token in {token_file}")
    elif response.status == 409:
        raise ConfigProblem(f"reload refused, the running config stays: {answer.get('error', '?')}")
    else:
        raise Problem(f"the admin endpoint answered {response.status}")


@cli.command()
@click.option("-c", "--config", "config_path", required=True, metavar="FILE", help="The config to check.")
def check(config_path) -> None:
    """Validate a config file: exit 2 with FILE:LINE: key: problem, a line for each mistake."""
    config = read_config(config_path)
    n = sum(len(p.origins) for p in config.pools.values())
    click.echo(f"{config_path}: ok ({len(config.pools)} pools, {n} origins, default pool {config.default_pool!r})")


@cli.group()
def geoip() -> None:
    """Where clients are: look an address up, or install a current MaxMind database."""


@geoip.command()
@click.argument("ip")
@click.option("-c", "--config", "config_path", default=str(EXAMPLE_CONFIG), show_default="data/edge.example.yaml",
              metavar="FILE", help="The config whose routing.geo rules decide.")
def lookup(ip, config_path) -> None:
    """Print where IP is and which pool the edge would send it to, and why."""
    import ipaddress
    from addons.geo.locate import Locator, describe
    from addons.geo.steer import Steering, steer
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise click.BadParameter(f"{ip!r} is not an IP address", param_hint="IP") from None
    config = read_config(config_path)
    if config.geo is None:
        raise Problem(f"{config_path} has no routing.geo section: every client goes to {config.default_pool!r}")
    locator = Locator(config.geo.database)
    place = locator.locate(ip)
    where = "not in the database (or a private address)"
    if place is not None:
        coords = f" ({place.lat:.2f}, {place.lon:.2f})" if place.lat is not None else ""
        where = f"country {place.country or '-'}, continent {place.continent or '-'}{coords}"
    pool, why = steer(Steering.from_config(config).options(place), lambda name: True, config.default_pool)
    click.echo(f"{ip}: {where}\n  database {describe(locator.path)}\n  pool {pool}: {why}\n"
               f"  (offline: every pool counted healthy; a running edge skips pools with nothing available)")


@geoip.command()
@click.option("--license-key", required=True, envvar="MAXMIND_LICENSE_KEY", metavar="KEY",
              help="Your MaxMind licence key (or MAXMIND_LICENSE_KEY).")
@click.option("--account-id", envvar="MAXMIND_ACCOUNT_ID", metavar="ID",
              help="Your MaxMind account id (or MAXMIND_ACCOUNT_ID); without it the key-only endpoint is used.")
@click.option("--edition", default="GeoLite2-City", show_default=True, help="GeoLite2-City, GeoLite2-Country, GeoIP2-City...")
@click.option("--out", metavar="PATH", help="Where to install the .mmdb [routing.geo.database of -c FILE].")
@click.option("-c", "--config", "config_path", metavar="FILE", help="Install where this config's routing.geo.database points.")
def update(license_key, account_id, edition, out, config_path) -> None:
    """Download a current database, check its SHA-256 and swap it in atomically; a running edge
    reloads it within seconds."""
    from addons.geo.update import UpdateError, update as install
    if out is None and config_path:
        config = read_config(config_path)
        out = config.geo.database if config.geo else None
    if out is None:
        raise click.UsageError("give --out PATH, or -c FILE whose routing.geo.database names the file")
    try:
        click.echo(install(license_key, out, edition, account_id))
    except UpdateError as e:
        raise Problem(f"geoip update: {e} (nothing was changed)") from None


@cli.group()
def waf() -> None:
    """The WAF's rules: install an official OWASP CRS 4 release."""


@waf.command("update")
@click.option("--version", "version", metavar="X.Y.Z", help="The CRS release to install [the latest].")
@click.option("--out", metavar="DIR", help="The link to point at the rules [shield.waf.crs of -c FILE].")
@click.option("-c", "--config", "config_path", metavar="FILE", help="Install where this config's shield.waf.crs points.")
@click.option("--key", "key_file", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="The CRS project's public key (security.asc) [fetched from the project's site]; "
                   "its fingerprint is checked either way.")
def waf_update(version, out, config_path, key_file) -> None:
    """Download a CRS release, check its OpenPGP signature with the CRS project's key, unpack
    it beside DIR and point DIR at it in one rename; `edge reload` loads it into a running edge."""
    from addons.shield.crs_update import UpdateError, update as install
    if out is None and config_path:
        config = read_config(config_path)
        out = config.shield.waf.crs if config.shield and config.shield.waf else None
    if out is None:
        raise click.UsageError("give --out DIR, or -c FILE whose shield.waf.crs names the folder")
    key = None
    if key_file:
        with open(key_file, "rb") as f:
            key = f.read()
    try:
        click.echo(install(out, version, key))
    except UpdateError as e:
        raise Problem(f"waf update: {e} (nothing was changed)") from None


SERVING_COMMANDS = {"run", "demo", "forward"}


def main() -> None:
    """The `edge` program. Serving commands re-run Python with -O: mitmproxy checks the type
    of every attribute it sets in `assert`s, about 16 % of its time per request (perf-notes).
    edge never validates with assert. EDGE_DEBUG=1 keeps the checks."""
    import sys
    if (sys.flags.optimize == 0 and not os.environ.get("EDGE_DEBUG")
            and SERVING_COMMANDS.intersection(sys.argv[1:2])):
        # -P: the working directory is not put first on sys.path (an `addons/` or `edgecli/`
        # folder where the operator happens to stand must not run instead of the edge)
        os.execv(sys.executable, [sys.executable, "-O", "-P", "-m", "edgecli", *sys.argv[1:]])
    cli()
