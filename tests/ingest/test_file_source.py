"""ingest.file_source: every line of a JSONL file becomes a RawMessage or a dead letter with its line number."""
from __future__ import annotations

import gzip

import pytest
from apache_beam.io import fileio
from apache_beam.io.filesystem import FileMetadata
from apache_beam.pvalue import TaggedOutput

from flatten.records import RawMessage
from ingest import lines
from ingest.file_source import _ReadFileFn


def _read(path, max_bytes=40):
    fn = _ReadFileFn("acme", "auto", max_bytes, "ReadPartnerFiles")
    rf = fileio.ReadableFile(FileMetadata(str(path), path.stat().st_size, last_updated_in_seconds=12.5))
    out = []
    for o in fn.process(rf):
        if isinstance(o, TaggedOutput):
            out.append(("dead", o.value.coords, o.value.reason, o.value.message))
        else:
            assert type(o) is RawMessage
            out.append(tuple(o))
    return out


@pytest.mark.parametrize("chunk", [1, 5, 1 << 20])
@pytest.mark.parametrize("gz", [False, True])
def test_every_line_is_a_message_or_a_dead_letter(tmp_path, monkeypatch, chunk, gz):
    monkeypatch.setattr(lines, "_CHUNK", chunk)
    data = (b'{"a":1}\r\n'          # 1: CRLF, the \r is not part of the record
            b"\n"                   # 2: empty
            b" \t\r\n"              # 3: whitespace only
            b'  {"b":2}\n'          # 4: leading blanks: a record, kept as is
            + b"x" * 60 + b"\n"     # 5: longer than max_bytes
            b'{"c":3}')             # 6: no final newline
    path = tmp_path / ("f.jsonl.gz" if gz else "f.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    where = f"file:{path}"
    got = _read(path)
    assert got == [
        ("acme", "file", f"{where}:1", b'{"a":1}', b"{}", 12_500_000),
        ("dead", f"{where}:2", "empty_line", "line 2 is empty (0 whitespace bytes)"),
        ("dead", f"{where}:3", "empty_line", "line 3 is empty (2 whitespace bytes)"),
        ("acme", "file", f"{where}:4", b'  {"b":2}', b"{}", 12_500_000),
        ("dead", f"{where}:5", "too_large", "line is 60 bytes, limit max_payload_bytes=40"),
        ("acme", "file", f"{where}:6", b'{"c":3}', b"{}", 12_500_000),
    ]
