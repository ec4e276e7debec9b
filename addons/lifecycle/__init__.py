"""Reload (SIGHUP, `edge reload`, a file watch), graceful shutdown, log reopening."""

from addons.lifecycle.addon import Lifecycle

__all__ = ["Lifecycle"]
