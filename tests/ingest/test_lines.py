import io

import pytest

from ingest import lines
from ingest.lines import split_lines


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 20])
def test_split_lines_across_chunk_boundaries(monkeypatch, chunk):
    monkeypatch.setattr(lines, "_CHUNK", chunk)
    data = b"ab\n\ncd\r\n" + b"x" * 50 + b"\nyz\n" + b"w" * 40
    got = list(split_lines(io.BytesIO(data), 10))
    assert got == [(1, b"ab", 2), (2, b"", 0), (3, b"cd", 3), (4, None, 50), (5, b"yz", 2), (6, None, 40)]


def test_over_long_line_is_never_held_whole(monkeypatch):
    monkeypatch.setattr(lines, "_CHUNK", 1000)

    class Stream:
        """100 MB of one line, produced lazily; fails if anyone buffers more than a few chunks."""

        def __init__(self):
            self.left = 100_000_000

        def read(self, n):
            if self.left <= 0:
                return b""
            k = min(n, self.left)
            self.left -= k
            return b"y" * k if self.left else b"y" * (k - 1) + b"\n"

    out = list(split_lines(Stream(), 4096))
    assert out == [(1, None, 99_999_999)]
