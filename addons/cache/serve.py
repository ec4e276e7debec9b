"""Serving stored bodies that are not in memory, through mitmproxy's own streaming path.

mitmproxy sends a response an addon made in one piece, so a body that should not be held whole
(a disk hit of 1 GB, or an object still arriving from the origin) is served by the StoreOrigin:
a small HTTP/1.1 server inside the edge process, on an ephemeral loopback port, that the cache
points such a request at instead of an origin. The relay to the client is then the one every
streamed origin response takes: backpressure, HTTP/2 flow control, compression on the way, the
access log's byte counts.

A request names what to send by a ticket (a 128-bit random token in `Edge-Cache-Ticket`) that
the cache issued for that one flow: used once, dropped when the flow ends, so another process
on the machine reaching the port gets nothing without guessing one.

Fill is a body being stored while it streams past from the origin; requests for the object
arriving meanwhile read it as it grows (ATS's read-while-writer, Varnish's streaming miss), so
a cold popular object costs the origin one fetch. The fill is fed by the request that fetched
it, whose relay goes at its own client's pace: when that client leaves, or readers wait on it
for STALL, the cache fetches the rest itself (a range request, see the cache addon), so one
slow or vanishing client neither slows nor cuts the others."""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, field

logger = logging.getLogger("edge")
TICKET = b"edge-cache-ticket"
FROM_STORE = "edge.cache.from_store"    # flow metadata: the cache serves it through the StoreOrigin
STEP = 2**18                            # bytes read from the store per write to the relay
MAX_HEAD = 2**17                        # a request head the StoreOrigin reads (mitmproxy's are capped lower)
STALL = 1.0                             # seconds a reader waits on a fill that does not grow before it is taken over


class Fill:
    """A body being stored as it streams past (`writer`: the store's MemoryWriter or disk
    BodyWriter), with the entry it will be stored as (`entry`: head, rules, selection; its body
    and times are set at commit). Readers wait for bytes with `wait(offset)`; `finish(ok)` ends
    it either way; `on_stall` is called once when a reader has waited STALL in vain."""

    def __init__(self, writer, entry, expected: int | None) -> None:
        self.writer, self.entry, self.expected = writer, entry, expected
        self.done = False
        self.ok = False
        self.readers = 0
        self.finished = asyncio.get_running_loop().create_future()     # True: stored, False: not
        self.on_stall = None
        self.resume = None          # how the cache would fetch the rest itself, if it can (once)
        self._grew = asyncio.Event()

    @property
    def length(self) -> int:
        return self.writer.length

    def write(self, chunk: bytes) -> None:
        """A chunk of the origin's body: stored, and readers woken. A writer that gave up (past
        max_object, a failing disk) ends the fill; the client's relay is unaffected."""
        if self.done or not chunk:
            return
        if not self.writer.write(chunk):
            self.finish(False)
            return
        self._grew.set()

    def finish(self, ok: bool) -> None:
        if self.done:
            return
        self.done, self.ok = True, ok
        if not ok:
            self.writer.abort()
        self.finished.set_result(ok)
        self._grew.set()
        self._release_if_unread()

    async def wait(self, offset: int) -> bool:
        """Until bytes past `offset` are written (True) or the body is complete (False). Raises
        ConnectionError when the fill failed: the reader's answer is cut, never completed."""
        while offset >= self.length:
            if self.done:
                if not self.ok:
                    raise ConnectionError("the origin's response was not stored")
                return False
            self._grew.clear()
            try:
                await asyncio.wait_for(self._grew.wait(), STALL)
            except TimeoutError:
                stalled, self.on_stall = self.on_stall, None
                if stalled is not None:
                    stalled()
        return True

    def read(self, offset: int, size: int) -> bytes:
        return self.writer.read(offset, size)

    def add_reader(self) -> None:
        self.readers += 1

    def drop_reader(self) -> None:
        self.readers -= 1
        self._release_if_unread()

    def _release_if_unread(self) -> None:
        if self.done and self.readers <= 0:
            self.writer.release()


@dataclass
class Ticket:
    """What the StoreOrigin sends for one request: `head` (status line and fields, framing
    included), then `length` bytes of `source` from `offset` (None: all a Fill will have, as
    chunks). `close` runs once, served or not."""
    head: bytes
    source: object                  # FileBody or Fill: read(offset, size)
    offset: int
    length: int | None
    close: object = field(default=lambda: None)

    def release(self) -> None:
        close, self.close = self.close, lambda: None
        close()


def response_head(status: int, reason: bytes, fields, length: int | None) -> bytes:
    """An HTTP/1.1 head: the stored fields with this answer's framing."""
    lines = [b"HTTP/1.1 %d %s" % (status, reason or b"")]
    lines += [k + b": " + v for k, v in fields if k.lower() not in (b"content-length", b"transfer-encoding")]
    lines.append(b"transfer-encoding: chunked" if length is None else b"content-length: %d" % length)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def ticket_of(head: bytes) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == TICKET:
            return value.strip().decode("ascii", "replace")
    return None


class StoreOrigin:
    def __init__(self) -> None:
        self.tickets: dict[str, Ticket] = {}
        self.server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None
        self.sending: set[asyncio.StreamWriter] = set()

    def bytes_held(self) -> int:
        """Bytes waiting in this server's socket buffers (its share of what backpressure bounds)."""
        return sum(w.transport.get_write_buffer_size() for w in list(self.sending) if not w.transport.is_closing())

    async def start(self) -> None:
        if self.server is None:
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=MAX_HEAD)
            self.address = self.server.sockets[0].getsockname()[:2]

    async def stop(self) -> None:
        for ticket in self.tickets.values():
            ticket.release()
        self.tickets.clear()
        if self.server is not None:
            self.server.close()
            self.server, self.address = None, None

    def issue(self, ticket: Ticket) -> str:
        token = secrets.token_urlsafe(16)
        self.tickets[token] = ticket
        return token

    def cancel(self, token: str) -> None:
        ticket = self.tickets.pop(token, None)
        if ticket is not None:
            ticket.release()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sending.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                ticket = self.tickets.pop(ticket_of(head) or "", None)
                if ticket is None:
                    return                  # unknown or used: nothing is sent
                try:
                    complete = await self._send(ticket, writer)
                finally:
                    ticket.release()
                if not complete:
                    return
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError):
            pass
        except Exception:           # a bug here must not leave the connection open or kill the server
            logger.exception("edge: serving a stored body failed")
        finally:
            self.sending.discard(writer)
            writer.close()

    @staticmethod
    async def _send(ticket: Ticket, writer: asyncio.StreamWriter) -> bool:
        """Send the answer; False when it could not be completed (the connection is closed, so
        the client's answer is cut rather than completed with bytes missing)."""
        writer.write(ticket.head)
        source, offset = ticket.source, ticket.offset
        if ticket.length is not None:
            end = offset + ticket.length
            while offset < end:
                if isinstance(source, Fill) and not await source.wait(offset):
                    return False            # complete, yet shorter than its Content-Length said
                chunk = source.read(offset, min(STEP, end - offset))
                if not chunk:
                    return False
                writer.write(chunk)
                offset += len(chunk)
                await writer.drain()
        else:
            while await source.wait(offset):
                chunk = source.read(offset, STEP)
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                offset += len(chunk)
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True
