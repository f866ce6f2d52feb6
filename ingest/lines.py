"""Splitting a byte stream into lines without ever holding an over-long line in memory. Pure (no Beam)."""
from __future__ import annotations

from typing import Iterator, Optional

__all__ = ["split_lines"]

_CHUNK = 1 << 20


def split_lines(fh, max_bytes: int) -> Iterator[tuple[int, Optional[bytes], int]]:
    """Yield (lineno, line without EOL, size); line is None when longer than max_bytes (never held whole)."""
    buf = b""
    lineno = 0
    skipping = 0  # >0 while discarding an over-long line: bytes seen so far
    while True:
        chunk = fh.read(_CHUNK)
        if not chunk:
            break
        buf += chunk
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            lineno += 1
            if skipping:
                yield lineno, None, skipping + nl - start
                skipping = 0
            elif nl - start > max_bytes:
                yield lineno, None, nl - start
            else:
                yield lineno, buf[start:nl].rstrip(b"\r"), nl - start
            start = nl + 1
        buf = buf[start:]
        if len(buf) > max_bytes:
            skipping += len(buf)
            buf = b""
    if skipping or buf:
        lineno += 1
        if skipping or len(buf) > max_bytes:
            yield lineno, None, skipping + len(buf)
        else:
            yield lineno, buf.rstrip(b"\r"), len(buf)
