"""Origin masking: forwarding headers in, origin identity out."""

from addons.scrub.addon import Scrub

__all__ = ["Scrub"]
