"""Streaming: which bodies are relayed as they arrive instead of being held whole."""

from addons.stream.addon import Stream

__all__ = ["Stream"]
