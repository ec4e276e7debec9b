"""The lifecycle addon: the running edge's config replaced in place, and its orderly end.

Reload (SIGHUP, `edge reload` through the admin endpoint's write side, or `reload: {watch:
true}`): the file is read and validated again (the same `FILE:LINE: key: problem` messages as
at start) and applied to every addon at once; a config that does not validate, that changes
the listeners or the admin address (a restart binds those), or that an addon cannot take (a
disk cache that cannot be opened) is refused and the running config stays, re-applied whole
if an addon had already taken the new one. Requests already routed finish on the origin they
were given; each addon keeps its state across a reload (cached objects, connection counts,
rate-limit buckets, origin health). A reload also reopens the access log.

Shutdown (SIGTERM, SIGINT): the listeners are closed, idle keep-alive connections are closed
at once (an HTTP/2 one after a GOAWAY), HTTP/1 responses carry `Connection: close`, and the
requests and streams in flight get `shutdown_timeout` to finish; what is left then is cut
(and logged as such). Every access-log line is written before the master stops. A second
stop signal ends the process at once, with 128 + the signal's number.

SIGUSR1 reopens the access log (logrotate without copytruncate).

A worker (`workers:` above 1, edgecli/supervisor.py) reports to its supervisor (SupervisorLink):
ready once its listeners are bound, and the outcome of each SIGHUP; `edge reload` landing in it
checks the file there and asks the supervisor to roll the reload over the workers, as does worker
0's file watch; a repeated stop signal is left to the supervisor, which kills.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable

from mitmproxy import ctx, http

from addons import internals
from addons.config import EdgeConfig, load_config
from addons.lifecycle.rules import (STOP_SIGNALS, Watch, authorized, changed_sections, forced_exit_code,
                                    generated_token, read_token, restart_needed, stamp)
from addons.tasks import Throttle, every, report
from addons.workers import runtime
from addons.workers.supervise import READY, REFUSED, RELOAD, RELOADED, REOPEN, encode_report

logger = logging.getLogger("edge")
WATCH_EVERY = 1.0       # seconds between two looks at the config file
DRAIN_POLL = 0.05       # seconds between two looks for connections that went idle while stopping
FIRST_REQUEST = 1.0     # seconds a connection with no request yet is left for its first one
CUT_WAIT = 2.0          # seconds the connections cut at shutdown_timeout are given to end


def _is_file(source: str) -> bool:
    return not source.startswith(("<", "--"))


class Lifecycle:
    def __init__(self, current: Callable[[], EdgeConfig | None], apply: Callable[[EdgeConfig], None],
                 reopen: Callable[[], None]) -> None:
        self.current, self.apply_config, self.reopen_log = current, apply, reopen
        # reads the config again: `edge run -c` gives the file with the same command-line overrides
        self.reader: Callable[[], EdgeConfig] | None = None
        self.shutdown_timeout = EdgeConfig.shutdown_timeout
        self.watching = False
        self.watch: Watch | None = None
        self.watcher: asyncio.Task | None = None
        self.token: str | None = None
        self.token_path: str | None = None
        self.token_generated = False
        self.started = False
        self.stopping: asyncio.Task | None = None
        self.draining = False
        self.refusals = Throttle()
        self.supervisor = SupervisorLink.from_env()     # a worker's report channel; None: a single edge

    def apply(self, config: EdgeConfig) -> None:
        """The lifecycle's own settings (called by the chain with every config it applies)."""
        self.shutdown_timeout = config.shutdown_timeout
        self.watching = config.reload_watch
        if config.admin is None:
            self.token, self.token_path, self.token_generated = None, None, False
        elif config.admin_token_file is not None:
            self.token, self.token_path = read_token(config.admin_token_file), config.admin_token_file
            self.token_generated = False
        elif self.started and not self.token_generated:
            self._generate_token()
        if self.started:
            self._watch()

    # -- hooks -------------------------------------------------------------------------------------

    def running(self) -> None:
        self.started = True
        config = self.current()
        if config is not None and config.admin is not None and self.token is None:
            self._generate_token()
        self._watch()

    def done(self) -> None:
        self.started = False
        if self.watcher is not None:
            self.watcher.cancel()
            self.watcher = None

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if self.draining:
            _last_on_connection(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        if self.draining:
            _last_on_connection(flow)

    # -- reload ------------------------------------------------------------------------------------

    def reload(self, trigger: str) -> tuple[bool, str, list[str]]:
        """Read the config again and apply it whole, or refuse it and keep the running one:
        (applied, what happened, the settings that changed)."""
        running = self.current()
        if running is None:
            return False, "no config is running", []
        if self.draining:
            return False, "the edge is shutting down", []
        if self.reader is None and not _is_file(running.source):
            return False, f"nothing to reload: the config came from {running.source}, not a file", []
        at = stamp(running.source) if _is_file(running.source) else None
        if self.watch is not None:
            self.watch.read(at)             # a watched file is not read again for the same change
        new, why = self._read_again(running)
        if new is None:
            return self._refused(trigger, why)
        try:
            self.apply_config(new)
        except Exception as e:          # an addon could not take it: every addon goes back
            self._restore(running)
            return self._refused(trigger, f"{new.source}: {e}")
        changed = changed_sections(running, new)
        message = f"reloaded {new.source} ({trigger}): " + (", ".join(changed) + " changed" if changed
                                                               else "nothing changed")
        logger.warning("edge: %s", message)
        return True, message, changed

    def _read_again(self, running: EdgeConfig) -> tuple[EdgeConfig | None, str]:
        """The config read again, or None and why it cannot replace the running one."""
        try:
            new = self.reader() if self.reader is not None else load_config(running.source)
        except Exception as e:          # the reader's own words: FILE:LINE: key: problem
            return None, str(e)
        why = restart_needed(running, new)
        return (new, "") if why is None else (None, f"{new.source}: {why}")

    def _refused(self, trigger: str, why: str) -> tuple[bool, str, list[str]]:
        logger.error("edge: reload (%s) refused, the running config stays: %s", trigger, why)
        return False, why, []

    def _restore(self, running: EdgeConfig) -> None:
        try:
            self.apply_config(running)
        except Exception:
            logger.exception("edge: the running config could not be restored after a failed reload")

    def _watch(self) -> None:
        """Start or stop the file watch as the config says (a reload may turn it on or off)."""
        config = self.current()
        wanted = self.watching and config is not None and _is_file(config.source) and \
            (self.supervisor is None or self.supervisor.index == 0)     # workers: worker 0 watches for all
        if wanted and self.watcher is None:
            self.watch = Watch(stamp(config.source))
            self.watcher = asyncio.get_running_loop().create_task(
                every(WATCH_EVERY, self._look, "config file watch"))
        elif not wanted and self.watcher is not None:
            self.watcher.cancel()
            self.watcher, self.watch = None, None
        if self.watching and config is not None and not _is_file(config.source):
            logger.warning("edge: reload.watch: the config came from %s, not a file: nothing to watch", config.source)

    def _look(self) -> None:
        config = self.current()
        if self.watch is not None and config is not None and self.watch.poll(stamp(config.source)):
            if self.supervisor is not None:         # rolled over the workers, one at a time
                self.watch.read(stamp(config.source))
                self.supervisor.send(RELOAD)
                return
            self.reload("file watch")

    # -- the admin endpoint's write side -------------------------------------------------------------

    def write(self, path: str, head: bytes) -> tuple[str, dict, dict]:
        """A POST to the admin endpoint: with the token, `/reload` or `/reopen` (the access log);
        without it, 401 and nothing done."""
        if not authorized(head, self.token):
            if count := self.refusals.occurred(time.monotonic()):
                logger.warning("edge: admin write refused: no or wrong token (%d since the last report)", count)
            return ("401 Unauthorized", {"error": "send Authorization: Bearer TOKEN"},
                    {"WWW-Authenticate": 'Bearer realm="edge admin"'})
        if path == "/reload" and self.supervisor is not None:
            return self._roll()
        if path == "/reload":
            applied, message, changed = self.reload("edge reload")
            if applied:
                return "200 OK", {"reloaded": True, "message": message, "changed": changed}, {}
            return "409 Conflict", {"reloaded": False, "error": message}, {}
        if path == "/reopen" and self.supervisor is not None:
            self.supervisor.send(REOPEN)        # every worker's log, not this one's only (SIGUSR1 to all)
            return "200 OK", {"reopened": True}, {}
        if path == "/reopen":
            self.reopen_log()
            return "200 OK", {"reopened": True}, {}
        return "404 Not Found", {"error": "POST /reload or /reopen"}, {}

    def _generate_token(self) -> None:
        try:
            self.token_path, self.token = generated_token(ctx.options.confdir)
            self.token_generated = True
        except OSError as e:        # the write side stays shut: fail closed
            logger.error("edge: cannot write the admin token under %s: %s; `edge reload` is refused "
                         "(set admin.token_file)", ctx.options.confdir, e.strerror)
            return
        logger.warning("edge: admin write side (edge reload): the token is in %s", self.token_path)

    # -- signals -------------------------------------------------------------------------------------

    def on_stop_signal(self, signum: int) -> None:
        if self.stopping is not None and self.supervisor is not None:
            return          # a worker: the supervisor forces the end (it got the signal too)
        if self.stopping is not None:
            logger.warning("edge: %s again: exiting now", signal.Signals(signum).name)
            for stream in (sys.stdout, sys.stderr):     # the log (and a `-` access log) are printed there
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(forced_exit_code(signum))
        logger.warning("edge: %s: stopping; requests in flight get up to %.0fs (%s again exits at once)",
                       signal.Signals(signum).name, self.shutdown_timeout, signal.Signals(signum).name)
        self.stopping = asyncio.get_running_loop().create_task(self.drain())

    def on_reload_signal(self) -> None:
        applied, message, _ = self.reload("SIGHUP")
        if self.supervisor is not None:     # its rolling reload waits for this answer
            self.supervisor.send(RELOADED if applied else REFUSED, message)

    def on_reopen_signal(self) -> None:
        self.reopen_log()

    # -- under a supervisor (workers: N) -------------------------------------------------------------

    def ready(self) -> None:
        """The listeners are bound: the supervisor starts the next worker."""
        if self.supervisor is not None:
            self.supervisor.send(READY)

    def _roll(self) -> tuple[str, dict, dict]:
        """`edge reload` landed in this worker: the file is checked here (a bad one is answered
        as by a single edge), then the supervisor reloads the workers one at a time."""
        running = self.current()
        if running is None or self.draining:
            return "409 Conflict", {"reloaded": False, "error": "the edge is shutting down"}, {}
        new, why = self._read_again(running)
        if new is None:
            logger.error("edge: reload (edge reload) refused, the running config stays: %s", why)
            return "409 Conflict", {"reloaded": False, "error": why}, {}
        self.supervisor.send(RELOAD)
        changed = changed_sections(running, new)
        message = (f"{new.source} is valid ({', '.join(changed) + ' changed' if changed else 'nothing changed'}): "
                   f"rolling reload of {self.supervisor.count} workers started (the edge's log reports each)")
        return "200 OK", {"reloaded": True, "message": message, "changed": changed}, {}

    # -- graceful shutdown ---------------------------------------------------------------------------

    async def drain(self) -> None:
        """Close the listeners, let what is in flight finish (closing each connection as it
        goes idle), cut what is left at `shutdown_timeout`, then stop the master."""
        master = ctx.master
        self.draining = True
        started = time.monotonic()
        try:
            proxyserver = master.addons.get("proxyserver")
            for server in list(proxyserver.servers):
                if server.is_running:
                    await server.stop()     # the listening sockets: accepted connections go on
            deadline = started + self.shutdown_timeout
            while proxyserver.connections and time.monotonic() < deadline:
                self._close_idle(master, proxyserver)
                await asyncio.sleep(DRAIN_POLL)
            if proxyserver.connections:
                logger.warning("edge: shutdown_timeout (%.0fs): cutting %d connection(s) still busy",
                               self.shutdown_timeout, len(proxyserver.connections))
                for handler in list(proxyserver.connections.values()):
                    internals.close_client(master, handler.client)
                cut_by = time.monotonic() + CUT_WAIT
                while proxyserver.connections and time.monotonic() < cut_by:
                    await asyncio.sleep(DRAIN_POLL)
            logger.warning("edge: stopped after %.1fs", time.monotonic() - started)
        except Exception as e:          # stop all the same
            report(Throttle(), "graceful shutdown", e)
        finally:
            master.shutdown()

    @staticmethod
    def _close_idle(master, proxyserver) -> None:
        now = time.time()
        for handler in list(proxyserver.connections.values()):
            if internals.client_idle(handler, now, FIRST_REQUEST):
                internals.goaway(handler)
                internals.close_client(master, handler.client)


def _last_on_connection(flow: http.HTTPFlow) -> None:
    """While stopping, an HTTP/1 client's connection closes after this response (HTTP/2 has
    no Connection field: its idle connections get GOAWAY)."""
    if flow.response is not None and flow.request.http_version.startswith("HTTP/1"):
        flow.response.headers["Connection"] = "close"


def install_signals(loop: asyncio.AbstractEventLoop, lifecycle: Lifecycle) -> None:
    """SIGTERM/SIGINT stop gracefully (a second one at once), SIGHUP reloads, SIGUSR1 reopens
    the access log. The main thread's loop only (`edge run`)."""
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, lifecycle.on_stop_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, lifecycle.on_reload_signal)
    loop.add_signal_handler(signal.SIGUSR1, lifecycle.on_reopen_signal)


class SupervisorLink:
    """A worker's reports to its supervisor (edgecli/supervisor.py) on the pipe EDGE_SUPERVISOR_FD
    names: ready, each reload's outcome, a reload asked for. The pipe is non-blocking: a report
    the supervisor is not reading is dropped, the worker never waits."""

    def __init__(self, index: int, count: int, fd: int) -> None:
        self.index, self.count, self.fd = index, count, fd

    @classmethod
    def from_env(cls) -> SupervisorLink | None:
        try:
            rt = runtime.current()
        except runtime.RuntimeEnvError:
            return None             # the chain refuses to start, with the reason
        if rt is None or rt.supervisor_fd is None:
            return None
        return cls(rt.index, rt.count, rt.supervisor_fd)

    def send(self, kind: str, text: str = "") -> None:
        try:
            os.write(self.fd, encode_report(self.index, os.getpid(), kind, text))
        except OSError as e:
            logger.error("edge: worker %d cannot report %s to its supervisor: %s", self.index, kind, e.strerror)
