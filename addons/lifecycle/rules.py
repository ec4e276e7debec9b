"""What reload, the file watch, the admin write side and shutdown decide. Pure (no mitmproxy
imports): the lifecycle addon applies the answers.

- A reload applies a whole config or none of it. Listeners cannot change in place (mitmproxy's
  servers are bound at start, a restart binds the new ones), nor can the admin address: such a
  config is refused with the reason, and the running one stays.
- The file watch reloads when the file's identity or content stamp changed and then held
  still for one more poll: an editor's half-written file is not read.
- The write side takes `Authorization: Bearer TOKEN`, compared in constant time.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import re
import secrets
import signal

from addons.config import MIN_TOKEN, EdgeConfig

# config fields a reload does not report as changes (where the config came from, derived values)
_NOT_SECTIONS = {"source", "listen", "listeners", "admin"}
TOKEN_FILE = "admin-token"            # the generated token, under mitmproxy's confdir


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def restart_needed(running: EdgeConfig, new: EdgeConfig) -> str | None:
    """Why `new` cannot replace `running` in place, or None when it can."""
    was = [(lst.address, lst.tls) for lst in running.all_listeners]
    now = [(lst.address, lst.tls) for lst in new.all_listeners]
    if was != now:
        show = lambda ls: ", ".join(_address(*a) + (" (tls)" if tls else "") for a, tls in ls)
        return f"listen: {show(was)} -> {show(now)}: listeners change only with a restart"
    if running.admin != new.admin:
        show = lambda a: _address(*a) if a else "off"
        return f"admin: {show(running.admin)} -> {show(new.admin)}: the admin endpoint changes only with a restart"
    if running.workers != new.workers:
        return f"workers: {running.workers} -> {new.workers}: the number of workers changes only with a restart"
    return None


def changed_sections(running: EdgeConfig, new: EdgeConfig) -> list[str]:
    """The config's top-level settings that differ (what a reload says it changed)."""
    return [f.name for f in dataclasses.fields(EdgeConfig)
            if f.name not in _NOT_SECTIONS and getattr(running, f.name) != getattr(new, f.name)]


Stamp = tuple[int, int, int, int] | None      # device, inode, mtime (ns), size; None: unreadable


def stamp(path: str) -> Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


class Watch:
    """Decides, one poll at a time, when a watched file should be read again: after it changed
    (a new inode from an editor's rename or a `mv`, a new mtime or size from a write) and then
    stayed the same for one poll. A file that is missing is waited for, not read."""

    def __init__(self, current: Stamp) -> None:
        self.applied = current      # the stamp of what was last read
        self.seen = current         # the stamp at the previous poll

    def poll(self, now: Stamp) -> bool:
        settled = now == self.seen
        self.seen = now
        return settled and now is not None and now != self.applied

    def read(self, at: Stamp) -> None:
        """The file was read (by this watch or another trigger) as of this stamp."""
        self.applied = at


_BEARER = re.compile(rb"(?im)^authorization:[ \t]*bearer[ \t]+([^\s]+)[ \t]*\r?$")


def authorized(head: bytes, token: str | None) -> bool:
    """Does the request head carry `Authorization: Bearer <token>`? Never without a token, and
    never for a head with several Authorization fields (which one would a proxy have checked?)."""
    if not token:
        return False
    found = _BEARER.findall(head)
    if len(found) != 1 or len(re.findall(rb"(?im)^authorization:", head)) != 1:
        return False
    return hmac.compare_digest(found[0], token.encode())


def read_token(path: str) -> str:
    """A token file's token (config.py checked its mode and length). Raises OSError."""
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def generated_token(confdir: str) -> tuple[str, str]:
    """(path, token) of the write side's token when the config names no token file: the one
    under `confdir` if it is sound (only its owner may read it, long enough), else a new one
    written there with mode 0600 (created whole under a temporary name, then renamed)."""
    path = os.path.join(os.path.expanduser(confdir), TOKEN_FILE)
    try:
        if not os.stat(path).st_mode & 0o077:
            token = read_token(path)
            if len(token) >= MIN_TOKEN and not any(c.isspace() for c in token):
                return path, token
    except (OSError, UnicodeDecodeError):
        pass
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    token = secrets.token_urlsafe(32)
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        os.unlink(temporary)            # a stale one, whatever its mode: O_EXCL makes it anew
    except FileNotFoundError:
        pass
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, token.encode() + b"\n")
    finally:
        os.close(fd)
    os.replace(temporary, path)
    return path, token


def forced_exit_code(signum: int) -> int:
    """A second stop signal ends the process at once, with the status a shell reports for a
    process killed by that signal (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
