"""`edge forward`: the edge as an organisation's outbound proxy (mitmproxy's regular mode).

Only click is imported here: `edge --help` stays fast; the proxy's modules load when it runs.
"""

from __future__ import annotations

import click

from edgecli.main import ConfigProblem, Problem, _hostport, _listen_option, default_confdir


def read_forward_config(path: str):
    """The forward config at `path`, or ConfigProblem with every mistake (exit 2)."""
    from addons.config import ConfigError
    from addons.forward.config import load_forward_config
    try:
        return load_forward_config(path)
    except ConfigError as e:
        raise ConfigProblem(str(e)) from None


def _announce(config):
    def on_ready(master, addr) -> None:
        users = "authenticated users" if config.users else "no authentication"
        intercept = "decrypting where a rule says" if config.intercept.ca else "nothing decrypted"
        click.echo(f"edge: forward proxy on {_hostport(*addr)} ({users}, {len(config.policy)} policy rules, "
                   f"{len(config.lists)} lists, {intercept})", err=True)
    return on_ready


@click.group(invoke_without_command=True)
@click.option("-c", "--config", "config_path", metavar="FILE", help="The forward-proxy YAML config (mode: forward).")
@click.option("--listen", callback=_listen_option, metavar="HOST:PORT", help="Where clients connect [listen: of the file].")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Set a mitmproxy option (repeatable).")
@click.option("--confdir", default=default_confdir, show_default="~/.config/edge/mitmproxy",
              help="mitmproxy's state directory.")
@click.pass_context
def forward(ctx, config_path, listen, settings, confdir) -> None:
    """Run the edge as a forward proxy: block, monitor, protect, cache (edge forward -c forward.yaml)."""
    if ctx.invoked_subcommand is not None:
        return
    if config_path is None:
        raise click.UsageError("edge forward needs -c FILE (see data/forward.example.yaml)")
    import dataclasses
    from edgecli import launch as launcher
    config = read_forward_config(config_path)
    if listen is not None:
        config = dataclasses.replace(config, listen=listen)
    try:
        launcher.check_listen(*config.listen)
        launcher.run_forward(launcher.ForwardLaunch(config=config, confdir=confdir, settings=settings,
                                                    on_ready=_announce(config)))
    except launcher.LaunchError as e:
        raise Problem(str(e)) from None


# `edge forward report`, `edge forward ca init`: the activity report and the interception CA
from edgecli.forward_tools import ca, report  # noqa: E402  (click and the standard library only)

forward.add_command(report)
forward.add_command(ca)
