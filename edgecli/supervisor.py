"""`edge run` with `workers:` above 1: the supervisor process. It serves nothing itself: it
starts the workers (this same `edge run` command again, with EDGE_WORKER, EDGE_WORKERS,
EDGE_RUNTIME_DIR and EDGE_SUPERVISOR_FD set), and carries out what addons/workers/supervise.py
decides on each event: restarts with back-off, the rolling reload, the graceful stop.

One thread, one selector: the report pipe and a signal wake-up pipe (so that the children are
forked from a single-threaded process). A worker gets PR_SET_PDEATHSIG (SIGTERM) before it
executes: if the supervisor dies, its workers drain and exit instead of serving on unsupervised.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import selectors
import signal
import subprocess
import sys
import time

from addons.config import EdgeConfig
from addons.workers.supervise import Finish, Say, Send, Start, Supervision, parse_report
from edgecli.origins import _die_with    # PR_SET_PDEATHSIG, as for the demo's origins

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD)
STOP = (signal.SIGTERM, signal.SIGINT)


def runtime_dir(config: EdgeConfig, confdir: str) -> str:
    """The machine's shared state: EDGE_RUNTIME_DIR if set, else `<confdir>/run/<hash of the
    config path and the listen addresses>` (two edges on one machine do not share one)."""
    if os.environ.get("EDGE_RUNTIME_DIR"):
        return os.environ["EDGE_RUNTIME_DIR"]
    source = os.path.abspath(config.source) if not config.source.startswith(("<", "--")) else config.source
    listeners = ",".join(f"{h}:{p}" for h, p in (lst.address for lst in config.all_listeners))
    digest = hashlib.sha256(f"{source}|{listeners}".encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser(confdir), "run", digest)


class Supervisor:
    def __init__(self, config: EdgeConfig, confdir: str, argv: list[str]) -> None:
        self.count = config.workers
        self.command = [sys.executable, *_interpreter_flags(), "-m", "edgecli", *argv]
        self.runtime = runtime_dir(config, confdir)
        self.plan = Supervision(self.count)
        self.procs: dict[int, subprocess.Popen] = {}
        self.buffer = b""

    def run(self) -> int:
        try:
            os.makedirs(self.runtime, mode=0o700, exist_ok=True)
            os.chmod(self.runtime, 0o700)       # the workers' shared state: theirs only
        except OSError as e:
            print(f"edge: cannot make the workers' runtime directory {self.runtime}: {e.strerror}",
                  file=sys.stderr, flush=True)
            return 1
        self.reports_in, self.reports_out = os.pipe()
        os.set_blocking(self.reports_in, False)
        os.set_blocking(self.reports_out, False)     # a worker never blocks on a full pipe
        wake_in, wake_out = os.pipe()
        os.set_blocking(wake_in, False)
        os.set_blocking(wake_out, False)
        fcntl.fcntl(self.reports_in, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
        signal.set_wakeup_fd(wake_out, warn_on_full_buffer=False)
        for sig in HANDLED:
            signal.signal(sig, lambda *_: None)      # the wake-up pipe carries the number
        selector = selectors.DefaultSelector()
        selector.register(self.reports_in, selectors.EVENT_READ, "reports")
        selector.register(wake_in, selectors.EVENT_READ, "signals")
        actions = self.plan.begin()
        while True:
            code = self._carry_out(actions)
            if code is not None:
                return code
            timer = self.plan.next_timer()
            timeout = None if timer is None else max(0.0, timer - time.monotonic())
            actions = []
            for key, _ in selector.select(timeout):
                if key.data == "signals":
                    actions += self._signals(wake_in)
                else:
                    actions += self._reports()
            actions += self._reap() + self.plan.due(time.monotonic())

    def _carry_out(self, actions: list) -> int | None:
        while actions:
            action = actions.pop(0)
            if isinstance(action, Start):
                self._start(action.index)
            elif isinstance(action, Send):
                proc = self.procs.get(action.index)
                if proc is not None and proc.poll() is None:
                    proc.send_signal(action.signum)
            elif isinstance(action, Say):
                print(action.text, file=sys.stderr, flush=True)
            elif isinstance(action, Finish):
                for proc in self.procs.values():
                    proc.wait()         # killed or exited: reaped, none left behind
                return action.code
        return None

    def _start(self, index: int) -> None:
        env = {**os.environ, "EDGE_WORKER": str(index), "EDGE_WORKERS": str(self.count),
               "EDGE_RUNTIME_DIR": self.runtime, "EDGE_SUPERVISOR_FD": str(self.reports_out)}
        parent = os.getpid()
        proc = subprocess.Popen(self.command, env=env, pass_fds=(self.reports_out,),
                                preexec_fn=lambda: _die_with(parent))
        self.procs[index] = proc
        self.plan.spawned(index, proc.pid, time.monotonic())

    def _signals(self, wake_in: int) -> list:
        actions: list = []
        try:
            numbers = os.read(wake_in, 512)
        except BlockingIOError:
            return actions
        for signum in numbers:
            if signum in STOP:
                actions += self.plan.stop(signum)
            elif signum == signal.SIGHUP:
                actions += self.plan.reload(time.monotonic())
            elif signum == signal.SIGUSR1:
                actions += self.plan.forward(signum)
        return actions

    def _reports(self) -> list:
        actions: list = []
        try:
            self.buffer += os.read(self.reports_in, 65536)
        except BlockingIOError:
            return actions
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            report = parse_report(line)
            if report is not None:
                actions += self.plan.report(*report, time.monotonic())
        return actions

    def _reap(self) -> list:
        actions: list = []
        for index, proc in list(self.procs.items()):
            if proc.returncode is None and proc.poll() is not None:
                actions += self.plan.exited(index, proc.returncode, time.monotonic())
        return actions


def _interpreter_flags() -> list[str]:
    """The flags this Python runs with that a worker needs too (-O, -P: see edgecli/main.py)."""
    return (["-O"] if sys.flags.optimize else []) + (["-P"] if sys.flags.safe_path else [])


def supervise(config: EdgeConfig, confdir: str, argv: list[str]) -> int:
    """Run `config.workers` workers of `edge run ARGV` until stopped; the exit code."""
    return Supervisor(config, confdir, argv).run()
