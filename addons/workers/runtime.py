"""Is this process one worker of several on the machine, and where do the workers meet?

The supervisor (addons/workers/supervise.py) starts each worker with EDGE_WORKER (its index,
0..N-1), EDGE_WORKERS (N) and EDGE_RUNTIME_DIR (a directory only the edge's user may write,
made by the supervisor), and EDGE_SUPERVISOR_FD (the pipe a worker reports to its supervisor
on; absent for a worker started by hand, as the tests do). None of them is set for a single
`edge run` process. current() is the one reader of these variables (the worker's index in the
access log, SO_REUSEPORT on the listeners, the cluster's identity, the supervisor's pipe); it
imports nothing heavy, for `edge --help` and `edge status`. The directory
holds what the workers share: `purge.log` (the cache's removals), `health.lock` and
`health.json` (the machine's health checker and its verdicts), `worker-PID.json` and
`retired.json` (each worker's counters for /status and /metrics), `bots.secret` (the challenge
key). Whoever can write it decides what the edge serves and whom it trusts, so one that others
may write is refused."""

from __future__ import annotations

import errno
import functools
import os
import stat
from dataclasses import dataclass

SECRET_BYTES = 32


class RuntimeEnvError(ValueError):
    """EDGE_WORKER / EDGE_WORKERS / EDGE_RUNTIME_DIR do not describe a worker."""


@dataclass(frozen=True)
class Runtime:
    index: int          # this worker, 0..count-1
    count: int          # workers on the machine
    dir: str            # the machine's shared state
    supervisor_fd: int | None = None    # the pipe of reports to the supervisor; None: no supervisor

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def secret(self, name: str = "bots.secret") -> bytes:
        """A random key made once for all workers, read by the others. Written whole to a
        private temporary file (mode 0600) and linked into place: link(2) fails when the name
        exists (O_CREAT|O_EXCL's rule), so the first worker's key is the one, and nobody ever
        reads half of one."""
        path = self.path(name)
        if not os.path.exists(path):
            import tempfile
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".secret-")     # mode 0600
            try:
                os.write(fd, os.urandom(SECRET_BYTES))
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass                        # another worker made it first
            finally:
                os.unlink(tmp)
        with open(path, "rb") as f:
            key = f.read()
        if len(key) < SECRET_BYTES:
            raise RuntimeEnvError(f"{path}: shorter than {SECRET_BYTES} bytes: delete it to make a new key")
        return key


def current(environ=None) -> Runtime | None:
    """This worker's Runtime, None for a single process. A partial or wrong set of the
    variables, or a directory others may write, raises RuntimeEnvError naming it. Without
    `environ`: this process's, read once (a process's environment is its start's)."""
    if environ is None:
        return _this_process()
    names = ("EDGE_WORKER", "EDGE_WORKERS", "EDGE_RUNTIME_DIR")
    given = [environ.get(n) for n in names]
    if all(v is None for v in given):
        return None
    if any(v is None or v == "" for v in given):
        missing = ", ".join(n for n, v in zip(names, given) if not v)
        raise RuntimeEnvError(f"a worker needs EDGE_WORKER, EDGE_WORKERS and EDGE_RUNTIME_DIR: {missing} not set")
    index, count = _integer("EDGE_WORKER", given[0]), _integer("EDGE_WORKERS", given[1])
    if count < 1 or not 0 <= index < count:
        raise RuntimeEnvError(f"EDGE_WORKER={given[0]} EDGE_WORKERS={given[1]}: expected 0 <= EDGE_WORKER < EDGE_WORKERS")
    folder = os.path.abspath(given[2])
    try:
        st = os.stat(folder)
    except OSError as e:
        raise RuntimeEnvError(f"EDGE_RUNTIME_DIR={given[2]}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise RuntimeEnvError(f"EDGE_RUNTIME_DIR={given[2]}: {os.strerror(errno.ENOTDIR)}")
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise RuntimeEnvError(f"EDGE_RUNTIME_DIR={given[2]}: must belong to this user and be writable by it "
                              f"only (chmod 700 it)")
    fd = environ.get("EDGE_SUPERVISOR_FD")
    return Runtime(index, count, folder, None if fd is None else _integer("EDGE_SUPERVISOR_FD", fd))


def shares_listeners() -> bool:
    """This process is one of several workers: its listeners are bound with SO_REUSEPORT."""
    rt = current()
    return rt is not None and rt.count > 1


@functools.cache
def _this_process() -> Runtime | None:
    return current(os.environ)


def _integer(name: str, value: str) -> int:
    if not (value.isascii() and value.isdigit()):       # no sign, no spaces, no `1_0`
        raise RuntimeEnvError(f"{name}={value}: expected a whole number")
    return int(value)
