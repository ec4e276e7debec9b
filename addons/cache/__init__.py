"""The RFC 9111 shared cache."""

from addons.cache.addon import Cache

__all__ = ["Cache"]
