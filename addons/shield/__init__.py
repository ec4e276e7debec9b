"""Traffic cleaning: IP lists, connection and rate limits, slow clients, size limits, WAF, bots."""

from addons.shield.addon import Shield

__all__ = ["Shield"]
