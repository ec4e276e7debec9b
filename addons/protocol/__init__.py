"""Well-formed requests only: HTTP/1 and HTTP/2 request-head rules, one framing per request."""

from addons.protocol.addon import Protocol

__all__ = ["Protocol"]
