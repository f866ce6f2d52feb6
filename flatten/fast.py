"""Rows ready to store, from event bytes: the compiled accelerator when built, else Python.

Pure Python, no Beam. :class:`FastFlattener` returns, per event, the list of
``(table, row_id, orjson(columns), orjson(types))`` tuples, main row first,
exactly what ``Flattener.flatten`` + ``orjson.dumps`` produce (the Python path
*is* that, and stays the reference). When the Rust extension
``headwater_native`` (``native/``, built by ``./hw``'s install step) is
importable, events go through it; it returns byte-identical bytes
(``tests/flatten/test_native.py`` checks this differentially) or *declines* an
event, which then takes the Python path. What declines (counted in
:meth:`FastFlattener.stats`):

* payloads the native parser does not reproduce orjson on: invalid JSON,
  ``-0``/``-0.0``, non-finite numbers, nesting deeper than 128 levels
  (Python then raises or flattens, as before);
* non-object documents, event ids/user ids that are not ``str``, event times
  that are not ``int`` or out of range, more than 10,000 columns (Python then
  raises the :class:`~flatten.core.FlattenError`);

Per-column timestamp options (``timestamp_columns`` / ``no_timestamp_columns``)
are supported: the native side decides the common values itself (strict ISO strings, epoch numbers below
1e17, any value of a no-timestamp column; tests/flatten/test_native.py compares them with Python) and calls
the Python ``Flattener.column_override`` for the rest. The native side is built only from public
interfaces: ``Masker.rules()``, ``flatten.mask.canonical_bytes``,
``flatten.names.normalize_key``, ``flatten.infer.parse_timestamp`` and
``Flattener.column_override``.

Set ``HEADWATER_NO_NATIVE=1`` to force the Python path everywhere.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import orjson

from flatten import jsonio
from flatten.core import Flattener
from flatten.infer import parse_timestamp
from flatten.mask import Masker, canonical_bytes
from flatten.names import normalize_key
from flatten.options import ColumnAnnotation, FlattenOptions

__all__ = ["FastFlattener", "RowBytes", "native_available", "native_import_error"]

RowBytes = tuple  # (table: str, row_id: str, columns: bytes, types: bytes)

try:
    import headwater_native as _native

    _IMPORT_ERROR: Optional[str] = None
    if getattr(_native, "ABI_VERSION", None) != 2:
        _IMPORT_ERROR = f"headwater_native ABI {getattr(_native, 'ABI_VERSION', None)!r} != 2 (rebuild native/)"
        _native = None
except ImportError as exc:  # not built: the Python path is used
    _native = None
    _IMPORT_ERROR = str(exc)


def native_available() -> bool:
    """True when the compiled accelerator is importable and not disabled by ``HEADWATER_NO_NATIVE=1``."""
    return _native is not None and os.environ.get("HEADWATER_NO_NATIVE") != "1"


def native_import_error() -> Optional[str]:
    return _IMPORT_ERROR


def _mask_rules(masker: Optional[Masker]) -> list:
    """The Masker's compiled annotations (its public ``rules()``) as plain tuples for the native side:
    ``[(tokens (None for '*'), policy, keep_last, per_element)]``."""
    if masker is None or not masker.has_rules:
        return []
    return [(list(r.tokens), r.policy.value, r.keep_last, r.per_element) for r in masker.rules()]


class FastFlattener:
    """Flatten (optionally mask first) event bytes into :data:`RowBytes`; one per partner, built in ``DoFn.setup``.

    ``annotations``/``key`` are only needed for :meth:`mask_rows` (parse + mask + flatten).
    Not thread-safe (one per DoFn instance), like :class:`Flattener`.
    """

    def __init__(self, options: FlattenOptions, annotations: Sequence[ColumnAnnotation] = (),
                 key: Optional[bytes] = None, *, use_native: Optional[bool] = None) -> None:
        self.options = options
        self.flattener = Flattener(options)
        self.masker = Masker(annotations, key) if annotations else None
        want = native_available() if use_native is None else (use_native and _native is not None)
        self._nf: Any = None
        if want:
            overrides = bool(options.timestamp_columns or options.no_timestamp_columns)
            self._nf = _native.NativeFlattener(
                options.max_depth, options.scalar_arrays == "child", options.detect_timestamps,
                _mask_rules(self.masker), bytes(key) if self.masker is not None else b"\0" * 32,
                normalize_key, parse_timestamp, canonical_bytes,
                list(options.timestamp_columns), list(options.no_timestamp_columns),
                self.flattener.column_override if overrides else None)
        self.python_events = 0

    @property
    def native(self) -> bool:
        return self._nf is not None

    def rows(self, doc: bytes, event_id: str, user_id: str, event_time_us: int) -> list:
        """Rows of an already masked event document (``Event.doc``). Raises what the Python path raises
        (``FlattenError``, ``orjson.JSONDecodeError`` ...)."""
        if self._nf is not None:
            out = self._nf.process(doc, event_id, user_id, event_time_us, False)
            if out is not None:
                return out
        return self.rows_python(doc, event_id, user_id, event_time_us)

    def mask_rows(self, payload: bytes, event_id: str, user_id: str, event_time_us: int) -> list:
        """Parse + ``Masker.mask_doc`` + flatten (the benchmark's unit of work)."""
        if self._nf is not None:
            out = self._nf.process(payload, event_id, user_id, event_time_us, True)
            if out is not None:
                return out
        return self.rows_python(payload, event_id, user_id, event_time_us, mask=True)

    def rows_python(self, payload: bytes, event_id: str, user_id: str, event_time_us: int,
                    mask: bool = False) -> list:
        """The reference path: orjson + (mask_doc) + Flattener.flatten + orjson.dumps."""
        self.python_events += 1
        doc = jsonio.loads(payload)  # (integers beyond 64 bits exact: the native parser declines those)
        if mask and self.masker is not None:
            doc = self.masker.mask_doc(doc)
        dumps = orjson.dumps
        return [(r.table, r.row_id, dumps(r.columns), dumps(r.types))
                for r in self.flattener.flatten(doc, event_id=event_id, user_id=user_id, event_time_us=event_time_us)]

    def native_event(self, payload: bytes, id_path: str, user_path: str, time_path: str,
                     want: Optional[tuple] = None) -> Optional[tuple]:
        """Native parse + mask + envelope + flatten for the common envelope shapes:
        ``(event_id, user_id, event_time_us, rows)``, or None (declined / not built: use the Python path).

        With ``want`` (a tuple of main-row column names) a 5th element: the tuple of their values, each exactly
        ``orjson.loads(main_row_columns).get(name)``, or None when the native side cannot tell them exactly
        (then load the main row)."""
        if self._nf is None:
            return None
        if want is None:
            return self._nf.process_event(payload, id_path, user_path, time_path)
        return self._nf.process_event(payload, id_path, user_path, time_path, want)

    def native_envelope_fn(self) -> Any:
        """The bound native ``envelope(payload, max_nesting, id_path, user_path, time_path)`` (parse + depth check +
        mask + envelope + masked document bytes, as ``ingest.envelope.EnvelopeParser`` on its accepting path),
        or None when the accelerator is not built. It returns ``(event_id, user_id, event_time_us, doc)`` or None
        (not handled natively: run the Python parser)."""
        return None if self._nf is None else self._nf.envelope

    @property
    def native_event_fn(self) -> Any:
        """The bound native ``process_event`` (hot loops: saves a Python frame per event), or None; its optional
        5th argument is :meth:`native_event`'s ``want``."""
        return None if self._nf is None else self._nf.process_event

    @property
    def native_run_fn(self) -> Any:
        """The bound native ``process_run`` (``ingest.batch``'s loop over a run of one partner's messages), or None
        (no accelerator, or one built before it had the method)."""
        return None if self._nf is None else getattr(self._nf, "process_run", None)

    def stats(self) -> dict:
        """``{"native": bool, "native_events": n, "declined": {reason: n}, "python_events": n}``."""
        s = self._nf.stats() if self._nf is not None else {"native_events": 0, "declined": {}}
        return {"native": self.native, **s, "python_events": self.python_events}
