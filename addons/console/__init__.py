"""mitmweb as the edge's console: verdicts, decisions and public URLs on flows (verdict.py)."""

from addons.console.addon import Console, ListenerStatus

__all__ = ["Console", "ListenerStatus"]
