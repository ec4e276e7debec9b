"""The `edge` command line: config loading, launching the master, demo origins."""
