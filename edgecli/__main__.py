from edgecli.main import cli

cli()
