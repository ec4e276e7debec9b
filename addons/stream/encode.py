"""Incremental content coders for streamed responses: each chunk is compressed and flushed as
it passes (a live stream's event must not wait in a coder's buffer), so memory and the time
per call stay bounded by the chunk (at most 64 KiB from an HTTP/1 origin), never the body."""

from __future__ import annotations

import zlib

import brotli

from addons.compress.negotiate import zstd

# cheaper than the buffered path's (br 5, gzip 6): a streamed body is large and encoded per
# request, on the event loop a chunk at a time
LEVELS = {"br": 4, "zstd": 3, "gzip": 4}


class StreamEncoder:
    """`encoder(chunk) -> bytes`, and `encoder(b"")` once at the end (mitmproxy's stream
    function protocol)."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        level = LEVELS[coding]
        if coding == "br":
            self.coder = brotli.Compressor(quality=level)
        elif coding == "zstd":
            self.coder = zstd.ZstdCompressor(level=level)
        else:
            self.coder = zlib.compressobj(level, zlib.DEFLATED, 31)

    def __call__(self, chunk: bytes) -> bytes:
        if self.coding == "br":
            return self.coder.process(chunk) + self.coder.flush() if chunk else self.coder.finish()
        if self.coding == "zstd":
            return self.coder.compress(chunk, zstd.ZstdCompressor.FLUSH_BLOCK) if chunk \
                else self.coder.flush(zstd.ZstdCompressor.FLUSH_FRAME)
        return self.coder.compress(chunk) + self.coder.flush(zlib.Z_SYNC_FLUSH) if chunk else self.coder.flush()
