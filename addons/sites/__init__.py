"""Sites: one edge in front of many hostnames, routed by host and path (table.py)."""

from addons.sites.addon import SiteAnswers, Sites

__all__ = ["Sites", "SiteAnswers"]
