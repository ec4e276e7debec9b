"""Event dispatch that visits only the addons with a hook for the event.

mitmproxy's AddonManager walks every addon for every event (and every flow event is followed by
an `update` event that only user interfaces handle), each visit wrapped in its error guard.
On a lean master that walk is a large share of the cost of a request (see bench/). This
manager keeps, per event name, the hook functions of each top-level addon, and invalidates
that index whenever the chain changes. Semantics are mitmproxy's: chain order, one error guard
per top-level addon, AddonHalt stops the event. Addons must not change their `addons` list
after registration (edge's never do).
"""

from __future__ import annotations

import inspect

from mitmproxy import addonmanager, exceptions, flow, hooks


_UPDATE = hooks.UpdateHook([])       # stands for the event in the index look-up


class IndexedAddonManager(addonmanager.AddonManager):
    def __init__(self, master) -> None:
        super().__init__(master)
        self._index: dict[str, list[list]] = {}

    def register(self, addon):
        self._index.clear()
        return super().register(addon)

    def add(self, *addons) -> None:
        self._index.clear()
        super().add(*addons)

    def remove(self, addon) -> None:
        self._index.clear()
        super().remove(addon)

    def clear(self) -> None:
        self._index.clear()
        super().clear()

    def _hooks(self, event: hooks.Hook) -> list[list]:
        found = self._index.get(event.name)
        if found is None:
            found = [funcs for top in self.chain if (funcs := [f for _, f in self._iter_hooks(top, event)])]
            self._index[event.name] = found
        return found

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        """mitmproxy's: the event, then `update` for a flow event, which only user interfaces
        handle; when no addon has an `update` hook (the lean master) it is not even built (a
        hook object and its argument list for every flow event: several per request)."""
        await self.trigger_event(event)
        if self._hooks(_UPDATE):
            message = event.args()[0]
            if isinstance(message, flow.Flow):
                await self.trigger_event(hooks.UpdateHook([message]))

    async def trigger_event(self, event: hooks.Hook) -> None:
        groups = self._hooks(event)
        if not groups:
            return
        args = event.args()
        for funcs in groups:
            try:
                with addonmanager.safecall():
                    for func in funcs:
                        res = func(*args)
                        if res is not None and inspect.isawaitable(res):
                            await res
            except exceptions.AddonHalt:
                return
