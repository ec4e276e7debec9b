"""Reload (SIGHUP, `edge reload`, a file watch), graceful shutdown and log reopening: the
addon in addon.py, its decisions in rules.py (imported alone by `edge reload`, without mitmproxy)."""
