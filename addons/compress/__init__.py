"""Compression: gzip, br and zstd negotiated on Accept-Encoding."""

from addons.compress.addon import Compress

__all__ = ["Compress"]
