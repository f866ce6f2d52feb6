"""Splitting a byte stream into lines without ever holding an over-long line in memory. Pure (no Beam)."""
from __future__ import annotations

from typing import Iterator, Optional

__all__ = ["split_lines", "split_line_chunks"]

_CHUNK = 1 << 20


def split_line_chunks(fh, max_bytes: int) -> Iterator[tuple[int, list]]:
    """Yield ``(number of the first line, items)`` per read of ``fh``: an item is a raw line (bytes without its
    "\n"; a "\r" before it is kept) or, for a line longer than ``max_bytes``, its size (an int; such a line
    is never held whole). Lines are split per read with ``bytes.split``, not one ``find`` per line."""
    buf = b""
    lineno = 1  # the number of the next line
    skipping = 0  # >0 while discarding an over-long line: bytes seen so far
    while True:
        chunk = fh.read(_CHUNK)
        if not chunk:
            break
        parts = (buf + chunk).split(b"\n") if buf else chunk.split(b"\n")
        buf = parts.pop()  # the unterminated tail
        if parts:
            first = None
            if skipping:
                first, skipping = skipping + len(parts[0]), 0
            if max(map(len, parts)) > max_bytes:
                parts = [p if len(p) <= max_bytes else len(p) for p in parts]
            if first is not None:
                parts[0] = first
            yield lineno, parts
            lineno += len(parts)
        if len(buf) > max_bytes:
            skipping += len(buf)
            buf = b""
    if skipping or buf:
        yield lineno, [skipping + len(buf) if skipping or len(buf) > max_bytes else buf]


def split_lines(fh, max_bytes: int) -> Iterator[tuple[int, Optional[bytes], int]]:
    """Yield (lineno, line without EOL, size); line is None when longer than max_bytes (never held whole)."""
    for lineno, items in split_line_chunks(fh, max_bytes):
        for item in items:
            if type(item) is int:
                yield lineno, None, item
            else:
                yield lineno, item.rstrip(b"\r"), len(item)
            lineno += 1
