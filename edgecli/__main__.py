from edgecli.main import cli

cli(prog_name="edge")
