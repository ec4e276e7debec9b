"""The forward proxy's addons in the order each event must visit them.

`first` run before mitmproxy's NextLayer (so they choose a tunnel's layer): the Guard (who may
connect, never to the proxy itself) and the Gate (authentication, the policy, rate limits).
`then`, after mitmproxy's TLS addon: the edge's RFC 9111 cache as a shared cache of external
content (a blocked request never reaches it: the Gate answers first), the stream addon (large
bodies relayed as they come, stored by the cache while they pass), and the activity log last,
when the cache's verdict is known.
"""

from __future__ import annotations

import dataclasses
import logging

from addons.cache import Cache
from addons.config import CompressConfig, EdgeConfig
from addons.forward.addon import ActivityLog, Gate, Guard
from addons.forward.config import ForwardConfig
from addons.stream import Stream

logger = logging.getLogger("edge")


def cache_config(config: ForwardConfig) -> EdgeConfig:
    """The settings the cache and stream addons read, for a proxy without origins or pools:
    no trusted proxies (X-Forwarded-* is nobody's word), no PURGE, no compression (the
    origin's codings are the client's business)."""
    return EdgeConfig(pools={}, default_pool="", cache=config.cache, compress=CompressConfig(enabled=False),
                      buffer_limit=config.buffer_limit, source=config.source)


class ForwardChain:
    def __init__(self, config: ForwardConfig) -> None:
        self.log = ActivityLog()
        self.guard, self.gate = Guard(), Gate(self.log)
        self.cache = Cache()
        self.stream = Stream(on_streamed=self.cache.streamed)
        self.first = [self.guard, self.gate]
        self.then = [self.cache, self.stream, self.log]
        self.apply(config)

    def apply(self, config: ForwardConfig) -> None:
        edge = cache_config(config)
        self.gate.apply(config)         # first those that may refuse (the users' file, the disk cache)
        self.cache.apply(edge)
        self.config = config
        self.log.apply(config.activity_log)
        self.guard.apply(config)
        self.stream.apply(edge.buffer_limit, web=False)

    def reload(self) -> None:
        """SIGHUP: the config file read again, lists included; on a mistake the running config
        stays (and the mistakes are logged). The listen address is not changed by a reload."""
        from addons.config import ConfigError
        from addons.forward.config import load_forward_config
        try:
            config = load_forward_config(self.config.source)
            listen = self.config.listen
            self.log.reopen()
            self.apply(dataclasses.replace(config, listen=listen))
        except (ConfigError, OSError, ValueError) as e:      # ConfigError: also the disk cache's
            logger.warning("edge: forward reload refused, the running config stays:\n%s", e)
            return
        logger.info("edge: forward config reloaded from %s (%d rules, %d lists)", config.source,
                    len(config.policy), len(config.lists))

    def listening(self, address: tuple[str, int]) -> None:
        """The address the proxy is bound to (the config's port may be 0)."""
        if address != self.config.listen:
            self.config = dataclasses.replace(self.config, listen=(self.config.listen[0], address[1]))
            self.guard.apply(self.config)
            self.gate.apply(self.config)
