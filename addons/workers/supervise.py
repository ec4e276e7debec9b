"""What the supervisor of N workers decides, event by event. Pure (no processes, no clock of
its own): edgecli/supervisor.py feeds it what happened (a worker spawned, reported, exited; a
signal; the time) and carries out the actions it answers (start a worker, signal one, say a
line, finish with an exit code).

- Start: worker 0 alone first, the others once it is ready. A config the workers cannot
  start with (an engine that does not load, a port taken) then fails once, with the worker's
  own error line, and the edge exits with its code: no restart loop.
- A worker that dies is restarted after a back-off: 0.5 s, doubling to 30 s, back to 0.5 s
  once a worker had lived 60 s. One that fails START_ATTEMPTS times in a row before it is
  ready (the file was edited into a config it cannot start with) stops the edge.
- Rolling reload (SIGHUP to the supervisor; `edge reload` or the file watch, worker 0's, asking it): one
  worker at a time gets SIGHUP; the next one only after this one reported its outcome. A
  refusal stops the roll there (the others keep their config); a reload asked for during a
  roll runs once after it. A worker that is not serving (restarting) is skipped: it reads the
  file when it starts.
- SIGUSR1 (and `POST /reopen` landing in any worker) reaches every worker: each reopens its
  access log.
- Stop (SIGTERM, SIGINT): SIGTERM to every worker, each drains as a single edge does; the
  supervisor finishes with 0 when the last one exited. A second stop signal: SIGKILL to all,
  exit 128 + the signal's number.

The report channel (worker -> supervisor) is one pipe shared by the workers: a line
`INDEX PID KIND TEXT` per report, shorter than PIPE_BUF so that the kernel writes it whole.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

FIRST_DELAY = 0.5           # seconds before the first restart of a worker that died
MAX_DELAY = 30.0            # the back-off's ceiling
STEADY = 60.0               # a worker that lived this long restarts after FIRST_DELAY again
START_ATTEMPTS = 5          # failed starts in a row (never ready) before the edge stops
ROLL_WAIT = 120.0           # seconds a worker is given to report its reload
MAX_REPORT = 3072           # bytes of a report line (below PIPE_BUF: written whole)

READY, RELOADED, REFUSED, RELOAD, REOPEN = "ready", "reloaded", "refused", "reload", "reopen"   # report kinds


# -- actions -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Start:
    index: int


@dataclass(frozen=True)
class Send:
    index: int
    signum: int


@dataclass(frozen=True)
class Say:
    text: str


@dataclass(frozen=True)
class Finish:
    code: int


Action = Start | Send | Say | Finish


# -- the report channel --------------------------------------------------------------------------

def encode_report(index: int, pid: int, kind: str, text: str = "") -> bytes:
    line = f"{index} {pid} {kind} {' '.join(text.split())}".rstrip()
    return line.encode("utf-8", "replace")[:MAX_REPORT - 1] + b"\n"


def parse_report(line: bytes) -> tuple[int, int, str, str] | None:
    """(index, pid, kind, text) of one line; None for anything else."""
    parts = line.decode("utf-8", "replace").strip().split(" ", 3)
    if len(parts) < 3 or not parts[0].isdigit() or not parts[1].isdigit():
        return None
    return int(parts[0]), int(parts[1]), parts[2], parts[3] if len(parts) == 4 else ""


# -- decisions -----------------------------------------------------------------------------------

def next_delay(previous: float, lived: float) -> float:
    """The back-off before restarting a worker that lived `lived` seconds; `previous` is the
    delay before its last restart (0: none yet)."""
    if previous <= 0 or lived >= STEADY:
        return FIRST_DELAY
    return min(MAX_DELAY, previous * 2)


def describe_exit(code: int) -> str:
    """Popen's returncode in words: `exit 3`, `killed by SIGKILL`."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


@dataclass
class Worker:
    index: int
    pid: int | None = None          # None: not running
    started: float = 0.0
    ready: bool = False             # reported ready since it was (re)started
    served: bool = False            # was ever ready (the initial start is over for it)
    delay: float = 0.0              # the back-off before its last restart
    failed_starts: int = 0
    restart_at: float | None = None


class Supervision:
    """The supervisor's state: its workers, a roll in progress, a stop in progress."""

    def __init__(self, count: int) -> None:
        self.workers = [Worker(i) for i in range(count)]
        self.phase = "starting"         # starting -> serving -> stopping
        self.exit_code = 0
        self.forced = False
        self.roll: list[int] = []       # workers still to reload, in order
        self.rolling: int | None = None     # the worker whose report is awaited
        self.roll_deadline = 0.0
        self.roll_done: list[int] = []
        self.roll_again = False

    # -- start and restart -----------------------------------------------------------------------

    def begin(self) -> list[Action]:
        return [Start(0)]

    def spawned(self, index: int, pid: int, now: float) -> None:
        w = self.workers[index]
        w.pid, w.started, w.ready, w.restart_at = pid, now, False, None

    def report(self, index: int, pid: int, kind: str, text: str, now: float) -> list[Action]:
        """A line from a worker; one from a worker's earlier life (another pid) is ignored."""
        if not 0 <= index < len(self.workers) or self.workers[index].pid != pid:
            return []
        if kind == READY:
            return self._ready(index)
        if kind in (RELOADED, REFUSED):
            return self._reloaded(index, kind == RELOADED, text, now)
        if kind == RELOAD:
            return self.reload(now)
        if kind == REOPEN:              # POST /reopen landed in one worker: every worker's access log
            return self.forward(signal.SIGUSR1)
        return []

    def _ready(self, index: int) -> list[Action]:
        w = self.workers[index]
        w.ready, w.served, w.failed_starts = True, True, 0
        if self.phase != "starting":
            return [Say(f"edge: worker {index} (pid {w.pid}) serving again")]
        actions: list[Action] = []
        if index == 0:
            actions += [Start(w.index) for w in self.workers[1:] if w.pid is None]
        if all(w.ready for w in self.workers):
            self.phase = "serving"
            pids = ", ".join(str(w.pid) for w in self.workers)
            actions.append(Say(f"edge: {len(self.workers)} workers serving (pids {pids})"))
            if self.roll_again:
                self.roll_again = False
                actions += self.reload(0.0)
        return actions

    def exited(self, index: int, code: int, now: float) -> list[Action]:
        w = self.workers[index]
        pid, was_ready, lived = w.pid, w.ready, now - w.started
        w.pid, w.ready = None, False
        if self.phase == "stopping":
            return self._maybe_finish()
        actions: list[Action] = []
        if self.rolling == index:           # its restart reads the file: the roll goes on
            actions += self._roll_next(now)
        if not was_ready:
            w.failed_starts += 1
            if not w.served:                # the initial start: the worker said why
                return actions + self._stop_all(code if code > 0 else 1)
            if w.failed_starts >= START_ATTEMPTS:
                return actions + [Say(f"edge: worker {index} could not start {w.failed_starts} times in a row "
                                      f"(last: {describe_exit(code)}; its error is above): stopping the edge")] \
                    + self._stop_all(code if code > 0 else 1)
        w.delay = next_delay(w.delay, lived)
        w.restart_at = now + w.delay
        state = "after" if was_ready else "before it was ready,"
        actions.append(Say(f"edge: worker {index} (pid {pid}) {describe_exit(code)} {state} {lived:.1f}s up; "
                           f"restarting it in {w.delay:g}s"))
        return actions

    def due(self, now: float) -> list[Action]:
        """What the clock calls for: restarts whose back-off is over, a roll that waited too long."""
        actions: list[Action] = []
        if self.phase == "stopping":
            return actions
        for w in self.workers:
            if w.restart_at is not None and w.restart_at <= now:
                w.restart_at = None
                actions.append(Start(w.index))
        if self.rolling is not None and now >= self.roll_deadline:
            actions.append(Say(f"edge: rolling reload: worker {self.rolling} did not report within "
                               f"{ROLL_WAIT:g}s; going on"))
            actions += self._roll_next(now)
        return actions

    def next_timer(self) -> float | None:
        """When `due` has something to do next (monotonic seconds), or None."""
        times = [w.restart_at for w in self.workers if w.restart_at is not None]
        if self.rolling is not None:
            times.append(self.roll_deadline)
        return min(times) if times and self.phase != "stopping" else None

    # -- rolling reload --------------------------------------------------------------------------

    def reload(self, now: float) -> list[Action]:
        if self.phase == "stopping":
            return [Say("edge: reload ignored: the edge is stopping")]
        if self.phase == "starting" or self.rolling is not None:
            self.roll_again = True          # once the start / this roll is over
            return []
        self.roll = [w.index for w in self.workers]
        self.roll_done = []
        return self._roll_next(now)

    def _roll_next(self, now: float) -> list[Action]:
        while self.roll:
            index = self.roll.pop(0)
            if self.workers[index].ready:
                self.rolling, self.roll_deadline = index, now + ROLL_WAIT
                return [Send(index, signal.SIGHUP)]
        self.rolling = None
        done = ", ".join(map(str, self.roll_done)) or "none"
        skipped = ", ".join(str(w.index) for w in self.workers if w.index not in self.roll_done)
        actions: list[Action] = [Say(f"edge: rolling reload done (workers reloaded: {done}"
                                     + (f"; not {skipped}: not serving, read the file as they start)" if skipped
                                        else ")"))]
        if self.roll_again:
            self.roll_again = False
            actions += self.reload(now)
        return actions

    def _reloaded(self, index: int, applied: bool, text: str, now: float) -> list[Action]:
        if self.rolling != index:           # a SIGHUP sent to the worker itself: its own log says it
            return []
        if applied:
            self.roll_done.append(index)
            return self._roll_next(now)
        self.rolling, self.roll, self.roll_again = None, [], False
        kept = ", ".join(str(w.index) for w in self.workers if w.index not in self.roll_done)
        return [Say(f"edge: rolling reload stopped: worker {index} refused the config ({text}); "
                    f"workers {kept} keep the running one" + (f", {', '.join(map(str, self.roll_done))} "
                                                              "took the new one" if self.roll_done else ""))]

    # -- stop --------------------------------------------------------------------------------------

    def stop(self, signum: int) -> list[Action]:
        """A stop signal to the supervisor: drain every worker; the second one kills them."""
        name = signal.Signals(signum).name
        if self.phase == "stopping":
            self.forced = True
            self.exit_code = 128 + signum
            return [Say(f"edge: {name} again: killing the workers"),
                    *[Send(w.index, signal.SIGKILL) for w in self.workers if w.pid is not None],
                    Finish(self.exit_code)]
        return [Say(f"edge: {name}: stopping {len(self.workers)} workers ({name} again kills them)"),
                *self._stop_all(0)]

    def forward(self, signum: int) -> list[Action]:
        """A signal every running worker gets as well (SIGUSR1: reopen the access log)."""
        return [Send(w.index, signum) for w in self.workers if w.pid is not None]

    def _stop_all(self, code: int) -> list[Action]:
        self.phase, self.exit_code = "stopping", code
        self.rolling, self.roll, self.roll_again = None, [], False
        for w in self.workers:
            w.restart_at = None
        return [*[Send(w.index, signal.SIGTERM) for w in self.workers if w.pid is not None],
                *self._maybe_finish()]

    def _maybe_finish(self) -> list[Action]:
        if any(w.pid is not None for w in self.workers):
            return []
        return [Finish(self.exit_code)]
