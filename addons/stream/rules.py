"""When a body is streamed, and how many WebSocket messages are kept: plain functions, no
mitmproxy. A body whose length is known and at most the buffer limit is held whole (the cache
stores it, compression and masking see it); any other is relayed as it arrives, so memory
does not grow with the body and a live stream (server-sent events, a trickled chunked answer)
reaches the client chunk by chunk."""

from __future__ import annotations

from collections.abc import Sequence

from addons.compress.negotiate import compressible

EVENT_STREAM = "text/event-stream"
# what mitmweb keeps of each WebSocket flow's messages under --web (the UI shows them); else none
WEB_MESSAGES = 1000
WEB_BYTES = 16 * 2**20


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def stream_response(length: int | None, content_type: str | None, limit: int) -> bool:
    """`length`: the body's size from its framing, None when unknown (chunked, read until close).
    No body (HEAD, 204, 304, Content-Length: 0) is never streamed; a live stream always is (the
    cache stores a streamed response as it passes)."""
    if length == 0:
        return False
    if media_type(content_type) == EVENT_STREAM:
        return True
    return length is None or length > limit


def compress_stream(status: int, content_type: str | None, content_encoding: str | None,
                    cache_control: str | None, http10: bool) -> bool:
    """A streamed response is compressed as the buffered path would be (compress addon): a
    200 of a compressible type, not already encoded, without no-transform; never to an
    HTTP/1.0 client (its body would have no framing but the close)."""
    return (status == 200 and not content_encoding and compressible(content_type) and not http10
            and "no-transform" not in (cache_control or "").lower())


def request_stream_after(length: int | None, limit: int, inspected: int | None = None) -> int | None:
    """How many bytes of a request body are held before the rest streams: 0 streams it from
    the head (a known length above the limit), `limit` for a body of unknown length (a small
    chunked upload stays whole, and a client that stalls never reaches the origin), None
    holds it whole. `inspected`: a WAF reads this many bytes of the body (ModSecurity's
    ProcessPartial): a body within that is held whole and judged whole; of any other, that
    much is held and judged before any of it goes on, then the rest streams."""
    if length == 0:
        return None
    if inspected is not None:
        return None if length is not None and length <= inspected else inspected
    if length is not None and length <= limit:
        return None
    return limit if length is None else 0


def messages_to_drop(sizes: Sequence[int], web: bool) -> int:
    """How many of a WebSocket flow's oldest messages (`sizes`, oldest first) to forget once
    one more arrived: all of them unless the flows are inspected (mitmweb), then all but the
    newest WEB_MESSAGES that fit in WEB_BYTES (the newest is always kept)."""
    if not web:
        return len(sizes)
    kept, total = 0, 0
    for size in reversed(sizes[-WEB_MESSAGES:]):
        if kept and total + size > WEB_BYTES:
            break
        kept, total = kept + 1, total + size
    return len(sizes) - kept
