"""Routing: which pool, which origin."""

from addons.route.addon import Route

__all__ = ["Route"]
