//! headwater_native: a compiled port of `flatten.mask.Masker.mask_doc` +
//! `flatten.core.Flattener.flatten` + the `orjson.dumps` of each row, used by
//! `flatten/fast.py` when importable. The Python package stays the reference:
//!
//! * anything this port does not reproduce exactly is *declined* (the method
//!   returns None and the caller runs the Python path for that event), never
//!   approximated; declines are counted by reason (`stats()`);
//! * the rare, Unicode-heavy decisions call the Python functions themselves
//!   (`normalize_key` on a name-cache miss, `parse_timestamp` for strings that
//!   look like dates but are not in the strict fast forms, `_canonical_bytes`
//!   for tokenizing non-ASCII strings and floats, `repr` for redacting floats,
//!   `Flattener.column_override` for the per-column timestamp options' rare
//!   values: strings not in the strict forms, epochs of 1e17 and more).
//!
//! Everything it is built from is public Python interface: `Masker.rules()`, `flatten.mask.canonical_bytes`,
//! `flatten.names.normalize_key`, `flatten.infer.parse_timestamp`, `Flattener.column_override`.

mod json;
mod mask;
mod stream;
mod ts;

use hmac::{Hmac, Mac};
use json::{write_f64, write_i64, write_str, write_value, V};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple, PyType};
use rustc_hash::{FxHashMap, FxHashSet, FxHasher};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::hash::Hasher;
use std::sync::Arc as Rc; // Arc: the flattener must be Send + Sync (runner threads share DoFn instances)

type HmacSha256 = Hmac<Sha256>;

// Many small allocations per event (the parsed tree): mimalloc is markedly faster than glibc malloc here.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MAX_NAME: usize = 272;
const MAX_COLUMNS: usize = 10_000;
const MAX_MASK_DEPTH: usize = 200;

/// Why an event was declined (the caller runs the Python path for it).
#[derive(Clone, Copy)]
enum Decline {
    Parse,
    NotObject,
    EventTime,
    TooManyColumns,
    Callback,
    Envelope,
    Input,
}

impl Decline {
    fn name(self) -> &'static str {
        match self {
            Decline::Parse => "parse",
            Decline::NotObject => "not_object",
            Decline::EventTime => "event_time",
            Decline::TooManyColumns => "too_many_columns",
            Decline::Callback => "python_callback_error",
            Decline::Envelope => "envelope",
            Decline::Input => "input_type",
        }
    }
}

type R<T> = Result<T, Decline>;

fn sha_hex(s: &[u8]) -> String {
    json::hex(&Sha256::digest(s))
}

/// The SHA-256 state shared by the ids of one array's child rows (event id, parent row id, child table).
fn child_hasher(eid: &str, parent_id: &str, child: &str) -> Sha256 {
    let mut h0 = Sha256::new();
    h0.update(eid.as_bytes());
    h0.update(b"\x1f");
    h0.update(parent_id.as_bytes());
    h0.update(b"\x1f");
    h0.update(child.as_bytes());
    h0.update(b"\x1f");
    h0
}

fn join_name(prefix: &str, seg: &str) -> String {
    let name = if prefix.is_empty() { seg.to_owned() } else { format!("{prefix}__{seg}") };
    if name.len() > MAX_NAME {
        // names are ASCII ([a-z0-9_]), so byte offsets are code point offsets
        let cut = name[..MAX_NAME - 9].trim_end_matches('_');
        return format!("{cut}_{}", &sha_hex(name.as_bytes())[..8]);
    }
    name
}

// ------------------------------------------------------------------ sites

struct Site {
    table: String,
    prefix: String,
    depth: u32,
    deep: bool,
    subs: FxHashMap<String, usize>,
    arrays: FxHashMap<String, (Rc<str>, usize)>,
    shapes: FxHashMap<u64, Vec<(Vec<Box<str>>, Rc<[String]>)>>,
    nshapes: usize,
    /// the streaming path's per-key names (stream.rs)
    keyindex: FxHashMap<Box<str>, usize>,
    keynames: Vec<stream::KeyName>,
    /// keynames index of the key last seen at each position of an object here
    order: Vec<usize>,
}

impl Site {
    fn new(table: String, prefix: String, depth: u32, max_depth: u32) -> Site {
        Site {
            table,
            prefix,
            depth,
            deep: depth + 1 >= max_depth,
            subs: FxHashMap::default(),
            arrays: FxHashMap::default(),
            shapes: FxHashMap::default(),
            nshapes: 0,
            keyindex: FxHashMap::default(),
            keynames: Vec::new(),
            order: Vec::new(),
        }
    }
}

struct OutRow {
    table: Rc<str>,
    row_id: String,
    cols: Vec<u8>,
    types: Vec<u8>,
    n: usize,
}

impl OutRow {
    fn key(&mut self, name: &str, ty: &str) {
        if self.n > 0 {
            self.cols.push(b',');
            self.types.push(b',');
        }
        self.n += 1;
        // column names are [a-z0-9_] by construction (flatten.names) and types are constants: no escaping
        debug_assert!(name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_'));
        let (nb, tb) = (name.as_bytes(), ty.as_bytes());
        self.cols.reserve(nb.len() + 3);
        self.cols.push(b'"');
        self.cols.extend_from_slice(nb);
        self.cols.extend_from_slice(b"\":");
        self.types.reserve(nb.len() + tb.len() + 5);
        self.types.push(b'"');
        self.types.extend_from_slice(nb);
        self.types.extend_from_slice(b"\":\"");
        self.types.extend_from_slice(tb);
        self.types.push(b'"');
    }
}

struct Ctx<'e> {
    event_id: &'e str,
    et: &'e str,
    rows: Vec<Option<OutRow>>,
}

// ------------------------------------------------------------------ masking

enum Masked<'a> {
    Keep,
    Drop,
    Set(V<'a>),
}

// ------------------------------------------------------------------ the class

#[pyclass]
struct NativeFlattener {
    max_depth: u32,
    scalar_child: bool,
    detect: bool,
    sites: Vec<Site>,
    norm: FxHashMap<Box<str>, Rc<str>>,
    normalize_key: PyObject,
    parse_timestamp: PyObject,
    canonical_bytes: PyObject,
    matcher: mask::Matcher,
    hash_mac: HmacSha256,
    tok_mac: HmacSha256,
    et_cache: (i64, String),
    table_str: FxHashMap<Rc<str>, Py<PyString>>,
    /// identical types JSON (same shape and types) is returned as the same immutable bytes object
    types_bytes: FxHashMap<Vec<u8>, Py<PyBytes>>,
    /// per table, the last types JSON and its bytes object (rows of a table mostly repeat it: no hashing)
    last_types: FxHashMap<Rc<str>, (Vec<u8>, Py<PyBytes>)>,
    pool: Vec<Vec<u8>>,
    ts_cols: FxHashSet<String>,
    no_ts_cols: FxHashSet<String>,
    percol_scalar: Option<PyObject>,
    native_events: u64,
    streamed_events: u64,
    envelope_events: u64,
    envelope_declined: u64,
    streamed_envelopes: u64,
    /// `process_event(want=...)`: events whose main-row values were decoded here / left to the caller
    values_events: u64,
    values_declined: u64,
    /// the last `want` tuple of `process_event` and its names (a partner passes the same tuple every time)
    want_cache: Option<(Py<PyTuple>, Vec<String>)>,
    /// a streaming name cache is over its bound: trim before the next event
    trim_due: bool,
    /// try the one-pass streaming path first (stream.rs)
    streaming: bool,
    declines: FxHashMap<&'static str, u64>,
}

#[pymethods]
impl NativeFlattener {
    /// `mask_rules`: `Masker.rules()` as `[(name tokens (None for '*'), policy, keep_last, per_element)]`.
    #[new]
    /// `timestamp_columns`/`no_timestamp_columns` as in FlattenOptions; for those columns scalar values are
    /// decided by `percol_scalar(value, name, table) -> (value, type) | None` (the Python Flattener's own rule,
    /// `Flattener.column_override`), reproduced here for the common cases (`percol_native`).
    #[pyo3(signature = (max_depth, scalar_child, detect_timestamps, mask_rules, mask_key, normalize_key, parse_timestamp,
                        canonical_bytes, timestamp_columns=Vec::new(), no_timestamp_columns=Vec::new(), percol_scalar=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        max_depth: u32,
        scalar_child: bool,
        detect_timestamps: bool,
        mask_rules: Vec<(Vec<Option<String>>, String, usize, bool)>,
        mask_key: &[u8],
        normalize_key: PyObject,
        parse_timestamp: PyObject,
        canonical_bytes: PyObject,
        timestamp_columns: Vec<String>,
        no_timestamp_columns: Vec<String>,
        percol_scalar: Option<PyObject>,
    ) -> PyResult<Self> {
        if (!timestamp_columns.is_empty() || !no_timestamp_columns.is_empty()) && percol_scalar.is_none() {
            return Err(PyValueError::new_err("per-column timestamp options need percol_scalar"));
        }
        let mut rules = Vec::with_capacity(mask_rules.len());
        for (tokens, policy, keep_last, per_element) in mask_rules {
            let policy = match policy.as_str() {
                "tokenize" => 1,
                "hash" => 2,
                "redact" => 3,
                "drop" => 4,
                p => return Err(PyValueError::new_err(format!("unknown policy {p:?}"))),
            };
            if tokens.is_empty() || tokens.iter().flatten().any(|t| t.is_empty() || t.contains('_')) {
                return Err(PyValueError::new_err("mask rule tokens must be non-empty and contain no '_'"));
            }
            rules.push((tokens, policy, keep_last, per_element));
        }
        let derive = |label: &[u8]| -> PyResult<HmacSha256> {
            let mut m = HmacSha256::new_from_slice(mask_key).map_err(|_| PyValueError::new_err("bad key"))?;
            m.update(label);
            let sub = m.finalize().into_bytes();
            HmacSha256::new_from_slice(&sub).map_err(|_| PyValueError::new_err("bad key"))
        };
        Ok(NativeFlattener {
            max_depth,
            scalar_child,
            detect: detect_timestamps,
            sites: vec![Site::new(String::new(), String::new(), 0, max_depth)],
            norm: FxHashMap::default(),
            normalize_key,
            parse_timestamp,
            canonical_bytes,
            matcher: mask::Matcher::new(rules),
            hash_mac: derive(b"headwater/hash/v1")?,
            tok_mac: derive(b"headwater/tokenize/v1")?,
            et_cache: (i64::MIN, String::new()),
            table_str: FxHashMap::default(),
            types_bytes: FxHashMap::default(),
            last_types: FxHashMap::default(),
            pool: Vec::new(),
            ts_cols: timestamp_columns.into_iter().collect(),
            no_ts_cols: no_timestamp_columns.into_iter().collect(),
            percol_scalar,
            native_events: 0,
            streamed_events: 0,
            envelope_events: 0,
            envelope_declined: 0,
            streamed_envelopes: 0,
            values_events: 0,
            values_declined: 0,
            want_cache: None,
            trim_due: false,
            streaming: true,
            declines: FxHashMap::default(),
        })
    }

    /// Rows of one event document: `[(table, row_id, orjson(columns), orjson(types))]`, main row first;
    /// masked first when `mask` (and the tree has rules). None = declined: run the Python path.
    #[pyo3(signature = (payload, event_id, user_id, event_time_us, mask))]
    fn process<'py>(
        &mut self,
        py: Python<'py>,
        payload: &[u8],
        event_id: &Bound<'py, PyAny>,
        user_id: &Bound<'py, PyAny>,
        event_time_us: &Bound<'py, PyAny>,
        mask: bool,
    ) -> PyResult<Option<Bound<'py, PyList>>> {
        if let (true, Ok(eid), Ok(uid), Ok(us)) =
            (self.streaming, exact_str(event_id), exact_str(user_id), exact_i64(event_time_us))
        {
            if let Some((_, _, _, rows)) = self.stream(py, payload, Some((eid, uid, us)), ("", "", ""), mask) {
                return self.finish(py, Ok(rows));
            }
        }
        let r = (|| -> R<Vec<OutRow>> {
            let eid = exact_str(event_id)?;
            let uid = exact_str(user_id)?;
            let us = exact_i64(event_time_us)?;
            let mut doc = json::parse(payload).ok_or(Decline::Parse)?;
            if mask {
                self.mask_doc(py, &mut doc)?;
            }
            self.flatten(py, &doc, eid, uid, us)
        })();
        self.finish(py, r)
    }

    /// Parse + mask + envelope (dotted paths, as `ingest.envelope.lookup_path`) + flatten.
    /// Only the common envelope shapes: string/int ids, event time as `YYYY-MM-DDTHH:MM:SS[.f]Z` in 1970..2200;
    /// anything else declines. Returns `(event_id, user_id, event_time_us, rows)` or None.
    ///
    /// With `want` (a tuple of main-row column names), a 5th element: the tuple of those columns' values, each
    /// exactly `orjson.loads(main_row_columns).get(name)` (None when absent), decoded from the serialized main
    /// row itself; or None instead of the tuple when that cannot be done exactly here (the main row is not
    /// first, the row holds something the parser declines: the caller then runs `orjson.loads`).
    #[pyo3(signature = (payload, id_path, user_path, time_path, want=None))]
    fn process_event<'py>(
        &mut self,
        py: Python<'py>,
        payload: &[u8],
        id_path: &str,
        user_path: &str,
        time_path: &str,
        want: Option<&Bound<'py, PyTuple>>,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let (ids, r) = self.event_rows(py, payload, (id_path, user_path, time_path));
        let values = self.event_values(py, want, &r)?;
        match self.finish(py, r)? {
            None => Ok(None),
            Some(rows) => Ok(Some(Self::event_tuple(py, &ids, rows, values)?)),
        }
    }

    /// `ingest.batch.BatchProcessor.process`'s fused path for a run of messages, without a Python frame per
    /// event: from `msgs[start]` on, while the messages are `partner`'s, each message's payload goes through
    /// `process_event` and its `TableRow`s (`table_row`, built as `tuple.__new__` builds them) are appended to
    /// `rows_out` (or carried in the event's `Entry` with `keep_rows`), its `Entry` (`entry`: event id, event
    /// time, aggregate inputs as `(index, str(key), values)` per `agg_index`, rows) to `entries_out`, exactly as
    /// the Python loop builds them. Stops at the first message it does not finish and says why:
    /// `(index, key_missing, code, out)`: code 0, `msgs[index]` is another partner's (or the end); code 1, the
    /// Python path decides `msgs[index]` (not bytes, over `max_bytes`, more than `max_nesting` opening brackets,
    /// or declined here: counted once, as `process_event` counts it); code 2, `out` is `process_event`'s result
    /// for `msgs[index]` whose values could not be decoded here (the caller loads the main row).
    #[pyo3(signature = (msgs, start, partner, paths, want, max_bytes, max_nesting, tables, table_of, table_row,
                        entry, agg_index, keep_rows, rows_out, entries_out))]
    #[allow(clippy::too_many_arguments)]
    fn process_run<'py>(
        &mut self,
        py: Python<'py>,
        msgs: &Bound<'py, PyList>,
        start: usize,
        partner: &Bound<'py, PyString>,
        paths: (String, String, String),
        want: Option<&Bound<'py, PyTuple>>,
        max_bytes: usize,
        max_nesting: usize,
        tables: &Bound<'py, PyDict>,
        table_of: &Bound<'py, PyAny>,
        table_row: &Bound<'py, PyType>,
        entry: &Bound<'py, PyType>,
        agg_index: &Bound<'py, PyTuple>,
        keep_rows: bool,
        rows_out: &Bound<'py, PyList>,
        entries_out: &Bound<'py, PyList>,
    ) -> PyResult<(usize, usize, u8, PyObject)> {
        // agg_index as plain Rust: (key's index in the values or None for user_id, metric indices or None)
        let mut aggs: Vec<(Option<usize>, Option<Vec<usize>>)> = Vec::with_capacity(agg_index.len());
        for a in agg_index.iter() {
            let (k, idx): (Option<usize>, Option<Vec<usize>>) = a.extract()?;
            aggs.push((k, idx));
        }
        let none = py.None();
        let mut nokey = 0usize;
        let n = msgs.len();
        let mut i = start;
        while i < n {
            // Let the job's other threads take the interpreter's lock between events, as the Python loop this
            // replaces let them between its bytecodes: a run of a thousand events holds it for milliseconds, and
            // the row writer waits for it between its DuckDB statements. Releasing it only every switch interval
            // (0.5 ms in bounded runs) left that thread waiting: 1M events without aggregates took 34.1-34.9 s
            // against 30.5-31.1 s for the Python loop; after every event, 28.5-34.6 s against 31.9-34.9 s in
            // alternating pairs (bench/README.md, "Eighth pass"). Uncontended, a release costs ~0.1 us.
            if i > start {
                py.allow_threads(|| ());
            }
            let msg = msgs.get_item(i)?;
            let msg = msg.downcast::<PyTuple>()?;
            let p = msg.get_item(0)?;
            if !p.is(partner) && !p.eq(partner)? {
                return Ok((i, nokey, 0, none));
            }
            let pl = msg.get_item(3)?;
            let Ok(pl) = pl.downcast_exact::<PyBytes>() else { return Ok((i, nokey, 1, none)) };
            let payload = pl.as_bytes();
            if payload.len() > max_bytes
                || payload.iter().filter(|&&b| b == b'{' || b == b'[').count() > max_nesting
            {
                return Ok((i, nokey, 1, none));
            }
            let (ids, r) = self.event_rows(py, payload, (&paths.0, &paths.1, &paths.2));
            let values = self.event_values(py, want, &r)?;
            let rows = match r {
                Err(_) => {
                    self.finish(py, r)?; // counts the decline
                    return Ok((i, nokey, 1, none));
                }
                Ok(rows) => rows,
            };
            let vals = match values {
                Some(v) if v.is_none() => {
                    let list = self.finish(py, Ok(rows))?.expect("accepted rows");
                    let out = Self::event_tuple(py, &ids, list, Some(v))?;
                    return Ok((i, nokey, 2, out.into_any().unbind()));
                }
                Some(v) => Some(v.downcast_into::<PyTuple>()?),
                None => None,
            };
            self.native_events += 1;
            let eid = PyString::new(py, &ids.0).into_any();
            let us = ids.2.into_pyobject(py)?.into_any();
            let mut trows: Vec<Bound<'py, PyAny>> = Vec::with_capacity(rows.len());
            for r in rows {
                let sub = self.table_py(py, &r.table);
                let table = match tables.get_item(&sub)? {
                    Some(t) => t,
                    None => table_of.call1((&sub,))?,
                };
                let types = self.types_py(py, &r.table, &r.types);
                let row = new_subtuple(
                    py,
                    table_row,
                    [
                        partner.clone().into_any(),
                        table,
                        PyString::new(py, &r.row_id).into_any(),
                        eid.clone(),
                        us.clone(),
                        PyBytes::new(py, &r.cols).into_any(),
                        types.into_any(),
                    ],
                )?;
                trows.push(row);
                self.recycle(r);
            }
            let mut ins: Vec<Bound<'py, PyAny>> = Vec::new();
            if !aggs.is_empty() {
                let vals = vals.as_ref();
                for (j, (k, idx)) in aggs.iter().enumerate() {
                    let key = match (k, vals) {
                        (None, _) => PyString::new(py, &ids.1).into_any(),
                        (Some(k), Some(v)) => v.get_item(*k)?,
                        (Some(_), None) => return Err(PyValueError::new_err("aggregate key column without values")),
                    };
                    if key.is_none() || key.is_instance_of::<PyList>() || key.is_instance_of::<PyDict>() {
                        nokey += 1;
                        continue;
                    }
                    let key = key.str()?.into_any();
                    let v: Bound<'py, PyAny> = match (idx, vals) {
                        (None, Some(v)) => v.clone().into_any(),
                        (None, None) => PyTuple::empty(py).into_any(),
                        (Some(ix), Some(v)) => {
                            let mut items = Vec::with_capacity(ix.len());
                            for &x in ix {
                                items.push(v.get_item(x)?);
                            }
                            PyTuple::new(py, items)?.into_any()
                        }
                        (Some(_), None) => return Err(PyValueError::new_err("metric columns without values")),
                    };
                    ins.push(PyTuple::new(py, [j.into_pyobject(py)?.into_any(), key, v])?.into_any());
                }
            }
            let carried = if keep_rows {
                PyTuple::new(py, &trows)?.into_any()
            } else {
                for t in &trows {
                    rows_out.append(t)?;
                }
                py.None().into_bound(py)
            };
            entries_out.append(new_subtuple(py, entry, [eid, us, PyTuple::new(py, ins)?.into_any(), carried])?)?;
            i += 1;
        }
        Ok((n, nokey, 0, none))
    }

    /// `ingest.envelope.EnvelopeParser.parse`'s accepting path, natively: parse, nesting depth (objects and
    /// arrays; the root object is 1) within `max_nesting`, mask, envelope (dotted paths as `lookup_path`,
    /// string/int ids, event time `YYYY-MM-DDTHH:MM:SS[.f]Z` in 1970..2200) and the masked document as
    /// `orjson.dumps` writes it. Returns `(event_id, user_id, event_time_us, masked_doc)`, or None for
    /// anything else (the Python parser then decides, dead letters included). Counted apart from `process*`.
    fn envelope<'py>(
        &mut self,
        py: Python<'py>,
        payload: &[u8],
        max_nesting: usize,
        id_path: &str,
        user_path: &str,
        time_path: &str,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let mut out = Vec::with_capacity(payload.len() + 64);
        let mut r = None;
        if self.streaming {
            r = self.stream_envelope(py, payload, max_nesting, (id_path, user_path, time_path), &mut out);
            self.streamed_envelopes += r.is_some() as u64;
        }
        if r.is_none() {
            // the tree version: duplicate keys, envelope paths through arrays, ...
            r = (|| -> Option<(String, String, i64)> {
                let mut doc = json::parse(payload)?;
                if !matches!(doc, V::Obj(_)) || nesting(&doc, 1, max_nesting) > max_nesting {
                    return None;
                }
                self.mask_doc(py, &mut doc).ok()?;
                let us = match lookup(&doc, time_path) {
                    Some(V::Str(s)) => ts::iso_z_to_us(s)?,
                    _ => return None,
                };
                if !(0..7_258_118_400_000_000).contains(&us) {
                    return None;
                }
                let uid = id_text(lookup(&doc, user_path)).ok()?;
                let eid = id_text(lookup(&doc, id_path)).ok()?;
                out.clear();
                write_value(&mut out, &doc, false);
                Some((eid, uid, us))
            })();
        }
        let Some((eid, uid, us)) = r else {
            self.envelope_declined += 1;
            return Ok(None);
        };
        self.envelope_events += 1;
        Ok(Some(PyTuple::new(
            py,
            [
                PyString::new(py, &eid).into_any(),
                PyString::new(py, &uid).into_any(),
                us.into_pyobject(py)?.into_any(),
                PyBytes::new(py, &out).into_any(),
            ],
        )?))
    }

    /// Turn the one-pass streaming path off (tests compare it with the tree path) or on (the default).
    fn set_streaming(&mut self, on: bool) {
        self.streaming = on;
    }

    /// `{"native_events": n, "streamed_events": n, "declined": {reason: n}}`.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let d = pyo3::types::PyDict::new(py);
        d.set_item("native_events", self.native_events)?;
        d.set_item("streamed_events", self.streamed_events)?;
        d.set_item("envelope_events", self.envelope_events)?;
        d.set_item("envelope_declined", self.envelope_declined)?;
        d.set_item("streamed_envelopes", self.streamed_envelopes)?;
        d.set_item("values_events", self.values_events)?;
        d.set_item("values_declined", self.values_declined)?;
        let dec = pyo3::types::PyDict::new(py);
        for (k, v) in &self.declines {
            dec.set_item(*k, *v)?;
        }
        d.set_item("declined", dec)?;
        Ok(d.into_any())
    }
}

fn exact_str<'a>(o: &'a Bound<'_, PyAny>) -> R<&'a str> {
    o.downcast_exact::<PyString>().map_err(|_| Decline::Input)?.to_str().map_err(|_| Decline::Input)
}

fn exact_i64(o: &Bound<'_, PyAny>) -> R<i64> {
    o.downcast_exact::<PyInt>().map_err(|_| Decline::EventTime)?.extract::<i64>().map_err(|_| Decline::EventTime)
}

fn lookup<'a, 'b>(doc: &'b V<'a>, path: &str) -> Option<&'b V<'a>> {
    let mut cur = doc;
    for part in path.split('.') {
        cur = match cur {
            V::Obj(o) => &o.iter().find(|(k, _)| k == part)?.1,
            V::Arr(a) => {
                if part.is_empty() || !part.bytes().all(|c| c.is_ascii_digit()) || part.len() > 9 {
                    return None; // (non-ASCII digits: not handled here)
                }
                a.get(part.parse::<usize>().ok()?)?
            }
            _ => return None,
        };
    }
    Some(cur)
}

/// The values of the members named `names` in a row's columns JSON `b` as the row writer makes it (compact, an
/// object of scalar and list values, keys without escapes): the values read, and per name the index of its value
/// in them (None where absent; a duplicate key's last value, as in a Python dict). The wanted values are read by
/// `json::Parser` (orjson's reading, or a decline); the others are only stepped over. None when the bytes are not
/// in that form or the parser declines a wanted value: the caller then runs `orjson.loads` itself.
fn find_members<'a>(b: &'a [u8], names: &[String]) -> Option<(Vec<V<'a>>, Vec<Option<usize>>)> {
    let n = b.len();
    if n < 2 || b[0] != b'{' || b[n - 1] != b'}' {
        return None;
    }
    let mut vals: Vec<V<'a>> = Vec::with_capacity(names.len());
    let mut found: Vec<Option<usize>> = vec![None; names.len()];
    if n == 2 {
        return Some((vals, found));
    }
    let mut parser: Option<json::Parser<'a>> = None;
    let mut i = 1;
    loop {
        // a key: `"name":`, no escapes (column names are [a-z0-9_])
        if *b.get(i)? != b'"' {
            return None;
        }
        let ks = i + 1;
        let ke = json::find_special(b, ks);
        if *b.get(ke)? != b'"' || *b.get(ke + 1)? != b':' {
            return None;
        }
        let key = &b[ks..ke];
        i = ke + 2;
        let mut hit = false;
        for (j, name) in names.iter().enumerate() {
            if name.as_bytes() == key {
                found[j] = Some(vals.len());
                hit = true;
            }
        }
        if hit {
            if parser.is_none() {
                parser = Some(json::Parser::new(b)?);
            }
            let p = parser.as_mut()?;
            p.i = i;
            vals.push(p.value()?);
            i = p.i;
        } else {
            i = skip_value(b, i)?;
        }
        match *b.get(i)? {
            b',' => i += 1,
            b'}' if i == n - 1 => return Some((vals, found)),
            _ => return None,
        }
    }
}

/// The offset just past the JSON value starting at `i` (valid JSON assumed, as the writer makes it: strings
/// stepped over escape by escape, containers by depth); None at the end of the bytes or at a control byte.
fn skip_value(b: &[u8], mut i: usize) -> Option<usize> {
    let mut depth = 0usize;
    loop {
        match *b.get(i)? {
            b'"' => {
                i += 1;
                loop {
                    i = json::find_special(b, i);
                    match *b.get(i)? {
                        b'"' => break,
                        b'\\' => i += 2,
                        _ => return None,
                    }
                }
            }
            b'[' | b'{' => depth += 1,
            b']' | b'}' | b',' if depth == 0 => return Some(i),
            b']' | b'}' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
}

/// `orjson.loads(cols).get(name)` for each of `names`, from a row's serialized columns (`find_members`: the
/// object's members in order, a later duplicate key's value replacing an earlier one's, as in a Python dict),
/// values built as orjson builds them (`py_value`); None when `find_members` cannot tell them exactly.
fn row_values<'py>(py: Python<'py>, cols: &[u8], names: &[String]) -> PyResult<Option<Bound<'py, PyTuple>>> {
    if names.is_empty() {
        return Ok(Some(PyTuple::empty(py)));
    }
    let Some((vals, found)) = find_members(cols, names) else { return Ok(None) };
    let mut out = Vec::with_capacity(found.len());
    for j in found {
        out.push(match j {
            Some(j) => py_value(py, &vals[j])?,
            None => py.None().into_bound(py),
        });
    }
    Ok(Some(PyTuple::new(py, out)?))
}

/// The Python object `orjson.loads` builds for a parsed value (dict keys in first-seen order, each with its
/// last value: the parser's own duplicate rule).
fn py_value<'py>(py: Python<'py>, v: &V) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        V::Null => py.None().into_bound(py),
        V::Bool(b) => pyo3::types::PyBool::new(py, *b).to_owned().into_any(),
        V::Int(i) => i.into_pyobject(py)?.into_any(),
        V::UInt(u) => u.into_pyobject(py)?.into_any(),
        V::Float(f) => PyFloat::new(py, *f).into_any(),
        V::Str(s) => PyString::new(py, s).into_any(),
        V::Arr(a) => {
            let mut items = Vec::with_capacity(a.len());
            for x in a {
                items.push(py_value(py, x)?);
            }
            PyList::new(py, items)?.into_any()
        }
        V::Obj(o) => {
            let d = pyo3::types::PyDict::new(py);
            for (k, x) in o {
                d.set_item(PyString::new(py, k), py_value(py, x)?)?;
            }
            d.into_any()
        }
    })
}

/// `ingest.envelope.nesting_depth`: depth of containers (an object is 1), counting stops past `limit`.
fn nesting(v: &V, d: usize, limit: usize) -> usize {
    if d > limit {
        return d;
    }
    let mut deepest = d;
    match v {
        V::Obj(o) => {
            for (_, x) in o {
                if matches!(x, V::Obj(_) | V::Arr(_)) {
                    deepest = deepest.max(nesting(x, d + 1, limit));
                }
            }
        }
        V::Arr(a) => {
            for x in a {
                if matches!(x, V::Obj(_) | V::Arr(_)) {
                    deepest = deepest.max(nesting(x, d + 1, limit));
                }
            }
        }
        _ => {}
    }
    deepest
}

fn id_text(v: Option<&V>) -> R<String> {
    match v {
        Some(V::Str(s)) if !s.is_empty() => Ok(s.to_string()),
        Some(V::Int(i)) => Ok(i.to_string()),
        Some(V::UInt(u)) => Ok(u.to_string()),
        _ => Err(Decline::Envelope),
    }
}

impl NativeFlattener {
    /// `process_event`'s work: envelope ids and rows (or the decline), nothing converted to Python yet.
    fn event_rows(&mut self, py: Python<'_>, payload: &[u8], paths: (&str, &str, &str)) -> ((String, String, i64), R<Vec<OutRow>>) {
        let (id_path, user_path, time_path) = paths;
        let mut ids = (String::new(), String::new(), 0i64);
        let streamed =
            if self.streaming { self.stream(py, payload, None, (id_path, user_path, time_path), true) } else { None };
        let r = (|| -> R<Vec<OutRow>> {
            if let Some((eid, uid, us, rows)) = streamed {
                ids = (eid, uid, us);
                return Ok(rows);
            }
            let mut doc = json::parse(payload).ok_or(Decline::Parse)?;
            if !matches!(doc, V::Obj(_)) {
                return Err(Decline::NotObject);
            }
            self.mask_doc(py, &mut doc)?;
            let us = match lookup(&doc, time_path) {
                Some(V::Str(s)) => ts::iso_z_to_us(s).ok_or(Decline::Envelope)?,
                _ => return Err(Decline::Envelope),
            };
            if !(0..7_258_118_400_000_000).contains(&us) {
                return Err(Decline::Envelope);
            }
            let uid = id_text(lookup(&doc, user_path))?;
            let eid = id_text(lookup(&doc, id_path))?;
            let rows = self.flatten(py, &doc, &eid, &uid, us)?;
            ids = (eid, uid, us);
            Ok(rows)
        })();
        (ids, r)
    }

    /// `process_event`'s 5th element: None without `want`; else the values tuple, or Python None when the
    /// values cannot be decoded here exactly (counted).
    fn event_values<'py>(
        &mut self,
        py: Python<'py>,
        want: Option<&Bound<'py, PyTuple>>,
        r: &R<Vec<OutRow>>,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        Ok(match (want, r) {
            (Some(w), Ok(rows)) => {
                let v = match rows.first() {
                    Some(main) if main.table.is_empty() => self.main_values(py, &main.cols, w)?,
                    _ => None,
                };
                if v.is_some() {
                    self.values_events += 1;
                } else {
                    self.values_declined += 1;
                }
                Some(v.map_or_else(|| py.None().into_bound(py), |t| t.into_any()))
            }
            _ => None,
        })
    }

    fn event_tuple<'py>(
        py: Python<'py>,
        ids: &(String, String, i64),
        rows: Bound<'py, PyList>,
        values: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let mut items = vec![
            PyString::new(py, &ids.0).into_any(),
            PyString::new(py, &ids.1).into_any(),
            ids.2.into_pyobject(py)?.into_any(),
            rows.into_any(),
        ];
        items.extend(values);
        PyTuple::new(py, items)
    }

    /// The table path's Python string (cached).
    fn table_py<'py>(&mut self, py: Python<'py>, table: &Rc<str>) -> Bound<'py, PyString> {
        if !self.table_str.contains_key(table) {
            if self.table_str.len() > 4096 {
                self.table_str.clear();
            }
            self.table_str.insert(table.clone(), PyString::new(py, table).unbind());
        }
        self.table_str[table].bind(py).clone()
    }

    /// A row's types as Python bytes (the table's last ones reused while they repeat).
    fn types_py<'py>(&mut self, py: Python<'py>, table: &Rc<str>, types: &[u8]) -> Bound<'py, PyBytes> {
        if let Some((t, b)) = self.last_types.get(table) {
            if t.as_slice() == types {
                return b.bind(py).clone();
            }
        }
        let b = self.types_for(py, types);
        if self.last_types.len() >= 4096 {
            self.last_types.clear();
        }
        self.last_types.insert(table.clone(), (types.to_vec(), b.clone().unbind()));
        b
    }

    fn finish<'py>(&mut self, py: Python<'py>, r: R<Vec<OutRow>>) -> PyResult<Option<Bound<'py, PyList>>> {
        match r {
            Err(d) => {
                *self.declines.entry(d.name()).or_insert(0) += 1;
                Ok(None)
            }
            Ok(rows) => {
                self.native_events += 1;
                let mut items = Vec::with_capacity(rows.len());
                for r in rows {
                    let table = self.table_py(py, &r.table);
                    let types = self.types_py(py, &r.table, &r.types);
                    let row = PyTuple::new(
                        py,
                        [
                            table.into_any(),
                            PyString::new(py, &r.row_id).into_any(),
                            PyBytes::new(py, &r.cols).into_any(),
                            types.into_any(),
                        ],
                    )?;
                    // str and bytes only: the tuple can never be part of a reference cycle, so the cyclic GC
                    // need not track it (CPython untracks such tuples itself, one collection later)
                    unsafe { pyo3::ffi::PyObject_GC_UnTrack(row.as_ptr().cast()) };
                    items.push(row);
                    self.recycle(r);
                }
                Ok(Some(PyList::new(py, items)?))
            }
        }
    }

    /// `orjson.loads(cols).get(name)` for each name of `want` (a tuple of str), from a main row's serialized
    /// columns (`row_values`); None when that cannot be done exactly here or `want` holds a non-str (the caller
    /// then runs `orjson.loads` itself).
    fn main_values<'py>(&mut self, py: Python<'py>, cols: &[u8], want: &Bound<'py, PyTuple>) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let hit = matches!(&self.want_cache, Some((t, _)) if t.bind(py).is(want));
        if !hit {
            let mut names = Vec::with_capacity(want.len());
            for x in want.iter() {
                match x.downcast_exact::<PyString>().ok().and_then(|s| s.to_str().ok()) {
                    Some(s) => names.push(s.to_owned()),
                    None => return Ok(None),
                }
            }
            self.want_cache = Some((want.clone().unbind(), names));
        }
        row_values(py, cols, &self.want_cache.as_ref().expect("want cached").1)
    }

    /// The shared bytes object for a row's types JSON (same shape and types, same object).
    fn types_for<'py>(&mut self, py: Python<'py>, types: &[u8]) -> Bound<'py, PyBytes> {
        if let Some(b) = self.types_bytes.get(types) {
            return b.bind(py).clone();
        }
        if self.types_bytes.len() >= 4096 {
            self.types_bytes.clear();
        }
        let b = PyBytes::new(py, types);
        self.types_bytes.insert(types.to_vec(), b.clone().unbind());
        b
    }

    // ---------------------------------------------------------- names

    fn normalize(&mut self, py: Python<'_>, k: &str) -> R<Rc<str>> {
        if let Some(r) = self.norm.get(k) {
            return Ok(r.clone());
        }
        let r: String = self
            .normalize_key
            .call1(py, (k,))
            .and_then(|o| o.extract::<String>(py))
            .map_err(|_| Decline::Callback)?;
        if self.norm.len() >= 200_000 {
            self.norm.clear();
        }
        let r: Rc<str> = Rc::from(r);
        self.norm.insert(Box::from(k), r.clone());
        Ok(r)
    }

    /// Column names for an object's keys at `site` (`Flattener._names`): resolve_keys + join_name, cached per shape.
    fn names<'k, I: Iterator<Item = &'k str> + Clone>(&mut self, py: Python<'_>, site: usize, it: I, n: usize) -> R<Rc<[String]>> {
        let mut h = FxHasher::default();
        for k in it.clone() {
            h.write(k.as_bytes());
            h.write_u8(0xff);
        }
        let hv = h.finish();
        if let Some(list) = self.sites[site].shapes.get(&hv) {
            for (ks, names) in list {
                if ks.len() == n && ks.iter().zip(it.clone()).all(|(a, b)| **a == *b) {
                    return Ok(names.clone());
                }
            }
        }
        let keys: Vec<&str> = it.collect();
        let mut segs: Vec<String> = Vec::with_capacity(keys.len());
        for k in &keys {
            segs.push(self.normalize(py, k)?.to_string());
        }
        let uniq: FxHashSet<&str> = segs.iter().map(|s| s.as_str()).collect();
        if uniq.len() != segs.len() {
            resolve_collisions(&keys, &mut segs);
        }
        let s = &mut self.sites[site];
        let names: Rc<[String]> = segs.iter().map(|g| join_name(&s.prefix, g)).collect::<Vec<_>>().into();
        if s.nshapes >= 1024 {
            s.shapes.clear();
            s.nshapes = 0;
        }
        s.nshapes += 1;
        s.shapes.entry(hv).or_default().push((keys.iter().map(|k| Box::from(*k)).collect(), names.clone()));
        Ok(names)
    }

    fn sub(&mut self, site: usize, name: &str) -> usize {
        if let Some(&i) = self.sites[site].subs.get(name) {
            return i;
        }
        let s = &self.sites[site];
        let new = Site::new(s.table.clone(), name.to_owned(), s.depth + 1, self.max_depth);
        self.sites.push(new);
        let i = self.sites.len() - 1;
        self.sites[site].subs.insert(name.to_owned(), i);
        i
    }

    fn array_site(&mut self, site: usize, name: &str) -> (Rc<str>, usize) {
        if let Some((c, i)) = self.sites[site].arrays.get(name) {
            return (c.clone(), *i);
        }
        let s = &self.sites[site];
        let child = if s.table.is_empty() { name.to_owned() } else { join_name(&s.table, name) };
        let new = Site::new(child.clone(), String::new(), s.depth + 1, self.max_depth);
        self.sites.push(new);
        let i = self.sites.len() - 1;
        let c: Rc<str> = Rc::from(child);
        self.sites[site].arrays.insert(name.to_owned(), (c.clone(), i));
        (c, i)
    }

    // ---------------------------------------------------------- timestamps

    fn parse_ts(&self, py: Python<'_>, s: &str) -> R<Option<(String, &'static str)>> {
        match ts::parse_fast(s) {
            ts::Fast::Yes(v, t) => Ok(Some((v, t))),
            ts::Fast::Ask => {
                let r: Option<(String, String)> = self
                    .parse_timestamp
                    .call1(py, (s,))
                    .and_then(|o| o.extract(py))
                    .map_err(|_| Decline::Callback)?;
                Ok(match r {
                    None => None,
                    Some((v, t)) => Some((
                        v,
                        match t.as_str() {
                            "TIMESTAMP" => "TIMESTAMP",
                            "DATE" => "DATE",
                            _ => return Err(Decline::Callback),
                        },
                    )),
                })
            }
        }
    }

    /// `Flattener.column_override` itself, via the Python callback: for what `percol_native` leaves to it.
    fn percol(&self, py: Python<'_>, v: &V, name: &str, site: usize) -> R<Option<(String, &'static str)>> {
        let f = self.percol_scalar.as_ref().ok_or(Decline::Callback)?;
        let pv: Bound<'_, PyAny> = match v {
            V::Str(_) | V::Int(_) | V::UInt(_) | V::Float(_) => py_value(py, v).map_err(|_| Decline::Callback)?,
            _ => return Ok(None),
        };
        let r: Option<(String, String)> = f
            .call1(py, (pv, name, self.sites[site].table.as_str()))
            .and_then(|o| o.extract(py))
            .map_err(|_| Decline::Callback)?;
        Ok(match r {
            None => None,
            Some((val, t)) => Some((
                val,
                match t.as_str() {
                    "TIMESTAMP" => "TIMESTAMP",
                    "STRING" => "STRING",
                    _ => return Err(Decline::Callback),
                },
            )),
        })
    }

    // ---------------------------------------------------------- flatten

    fn buf(&mut self) -> Vec<u8> {
        self.pool.pop().unwrap_or_else(|| Vec::with_capacity(512))
    }

    /// Give a finished row's buffers back to `buf()`'s pool (bounded).
    fn recycle(&mut self, r: OutRow) {
        if self.pool.len() < 64 {
            let (mut a, mut b) = (r.cols, r.types);
            a.clear();
            b.clear();
            self.pool.push(a);
            self.pool.push(b);
        }
    }

    fn event_time(&mut self, us: i64) -> R<String> {
        // `YYYY-MM-DDT` cached per day; the time of day and fraction written digit by digit
        let day = us.div_euclid(86_400_000_000);
        if self.et_cache.0 != day {
            let full = ts::event_time(day * 86_400_000_000).ok_or(Decline::EventTime)?;
            self.et_cache = (day, full[..11].to_owned());
        }
        let in_day = us.rem_euclid(86_400_000_000);
        let sod = (in_day / 1_000_000) as u32;
        let frac = (in_day % 1_000_000) as u32;
        let mut out = String::with_capacity(27);
        out.push_str(&self.et_cache.1);
        let digits = |out: &mut String, v: u32, places: &[u32]| {
            for &k in places {
                out.push(char::from(b'0' + ((v / k) % 10) as u8));
            }
        };
        digits(&mut out, sod / 3600, &[10, 1]);
        out.push(':');
        digits(&mut out, (sod / 60) % 60, &[10, 1]);
        out.push(':');
        digits(&mut out, sod % 60, &[10, 1]);
        out.push('.');
        digits(&mut out, frac, &[100_000, 10_000, 1_000, 100, 10, 1]);
        out.push('Z');
        Ok(out)
    }

    fn flatten(&mut self, py: Python<'_>, doc: &V, eid: &str, uid: &str, us: i64) -> R<Vec<OutRow>> {
        let V::Obj(obj) = doc else { return Err(Decline::NotObject) };
        let et = self.event_time(us)?;
        let mut main = OutRow { table: Rc::from(""), row_id: eid.to_owned(), cols: self.buf(), types: self.buf(), n: 0 };
        main.cols.push(b'{');
        main.types.push(b'{');
        main.key("_event_id", "STRING");
        write_str(&mut main.cols, eid);
        main.key("_user_id", "STRING");
        write_str(&mut main.cols, uid);
        main.key("_event_time", "TIMESTAMP");
        write_str(&mut main.cols, &et);
        let mut ctx = Ctx { event_id: eid, et: &et, rows: vec![None] };
        if !obj.is_empty() {
            self.walk(py, obj, 0, &mut main, eid, &mut ctx)?;
        }
        if main.n > MAX_COLUMNS {
            return Err(Decline::TooManyColumns);
        }
        main.cols.push(b'}');
        main.types.push(b'}');
        ctx.rows[0] = Some(main);
        Ok(ctx.rows.into_iter().map(|r| r.expect("row slot filled")).collect())
    }

    fn walk(&mut self, py: Python<'_>, obj: &[(Cow<str>, V)], site: usize, row: &mut OutRow, row_id: &str, ctx: &mut Ctx) -> R<()> {
        let names = self.names(py, site, obj.iter().map(|(k, _)| &**k), obj.len())?;
        for (name, (_, v)) in names.iter().zip(obj) {
            self.value(py, name, v, site, row, row_id, ctx)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn value(&mut self, py: Python<'_>, name: &str, v: &V, site: usize, row: &mut OutRow, row_id: &str, ctx: &mut Ctx) -> R<()> {
        if self.percol_scalar.is_some() && matches!(v, V::Str(_) | V::Int(_) | V::UInt(_) | V::Float(_)) {
            let table = &self.sites[site].table;
            let full: Cow<str> = if table.is_empty() { Cow::Borrowed(name) } else { Cow::Owned(format!("{table}__{name}")) };
            let ts_col = self.ts_cols.contains(&*full);
            if ts_col || self.no_ts_cols.contains(&*full) {
                let r = match percol_native(v, ts_col) {
                    Some(r) => r,
                    None => self.percol(py, v, name, site)?.map(|(val, t)| (Cow::Owned(val), t)),
                };
                if let Some((val, t)) = r {
                    row.key(name, t);
                    write_str(&mut row.cols, &val);
                    return Ok(());
                }
            }
        }
        match v {
            V::Null => {}
            V::Str(s) => {
                if self.detect && ts::looks(s) {
                    if let Some((val, t)) = self.parse_ts(py, s)? {
                        row.key(name, t);
                        write_str(&mut row.cols, &val);
                        return Ok(());
                    }
                }
                row.key(name, "STRING");
                write_str(&mut row.cols, s);
            }
            V::Int(i) => {
                row.key(name, "INT64");
                write_i64(&mut row.cols, *i);
            }
            V::UInt(u) => {
                row.key(name, "NUMERIC"); // u64 beyond i64 < 10^29
                write_str(&mut row.cols, &u.to_string());
            }
            V::Float(f) => {
                row.key(name, "FLOAT64");
                write_f64(&mut row.cols, *f);
            }
            V::Bool(b) => {
                row.key(name, "BOOL");
                row.cols.extend_from_slice(if *b { b"true" } else { b"false" });
            }
            V::Obj(o) => {
                if o.is_empty() {
                    return Ok(());
                }
                if self.sites[site].deep {
                    json_col(row, name, v);
                } else {
                    let sub = self.sub(site, name);
                    self.walk(py, o, sub, row, row_id, ctx)?;
                }
            }
            V::Arr(a) => {
                if a.is_empty() {
                    return Ok(());
                }
                if self.sites[site].deep {
                    json_col(row, name, v);
                } else {
                    self.array(py, a, v, name, site, row, row_id, ctx)?;
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn array(&mut self, py: Python<'_>, a: &[V], whole: &V, name: &str, site: usize, row: &mut OutRow, row_id: &str, ctx: &mut Ctx) -> R<()> {
        const NULL: u8 = 1;
        const BOOL: u8 = 2;
        const INT: u8 = 4;
        const FLOAT: u8 = 8;
        const STR: u8 = 16;
        const ARR: u8 = 32;
        const OBJ: u8 = 64;
        let mut k = 0u8;
        for x in a {
            k |= match x {
                V::Null => NULL,
                V::Bool(_) => BOOL,
                V::Int(_) | V::UInt(_) => INT,
                V::Float(_) => FLOAT,
                V::Str(_) => STR,
                V::Arr(_) => ARR,
                V::Obj(_) => OBJ,
            };
        }
        if k.count_ones() != 1 {
            k &= !NULL;
            if k & INT != 0 && k & FLOAT != 0 {
                k &= !INT;
            }
            if k == 0 {
                return Ok(());
            }
            if k.count_ones() > 1 {
                json_col(row, name, whole);
                return Ok(());
            }
        }
        match k {
            NULL => Ok(()),
            OBJ => {
                let (child, es) = self.array_site(site, name);
                self.child_rows(py, a, &child, es, row_id, ctx, false)
            }
            ARR => {
                json_col(row, name, whole);
                Ok(())
            }
            _ if self.scalar_child => {
                let (child, es) = self.array_site(site, name);
                self.child_rows(py, a, &child, es, row_id, ctx, true)
            }
            _ => self.scalar_list(py, a, k, name, site, row),
        }
    }

    fn scalar_list(&mut self, py: Python<'_>, a: &[V], kind: u8, name: &str, site: usize, row: &mut OutRow) -> R<()> {
        let vals = a.iter().filter(|x| !matches!(x, V::Null));
        match kind {
            16 => {
                let strs: Vec<&str> = vals.map(|x| if let V::Str(s) = x { &**s } else { "" }).collect();
                let mut detect = self.detect;
                if self.percol_scalar.is_some() {
                    let table = &self.sites[site].table;
                    let path = if table.is_empty() { name.to_owned() } else { join_name(table, name) };
                    if self.ts_cols.contains(&path) {
                        detect = true;
                    } else if self.no_ts_cols.contains(&path) {
                        detect = false;
                    }
                }
                if detect && strs.iter().all(|s| ts::looks(s)) {
                    let mut conv = Vec::with_capacity(strs.len());
                    let mut ok = true;
                    for s in &strs {
                        match self.parse_ts(py, s)? {
                            Some(c) => conv.push(c),
                            None => ok = false,
                        }
                    }
                    if ok && conv.iter().all(|c| c.1 == conv[0].1) {
                        row.key(name, if conv[0].1 == "DATE" { "DATE[]" } else { "TIMESTAMP[]" });
                        list_out(&mut row.cols, conv.iter().map(|c| c.0.as_str()), |o, s| write_str(o, s));
                        return Ok(());
                    }
                }
                row.key(name, "STRING[]");
                list_out(&mut row.cols, strs.into_iter(), |o, s| write_str(o, s));
            }
            2 => {
                row.key(name, "BOOL[]");
                list_out(&mut row.cols, vals, |o, x| o.extend_from_slice(if matches!(x, V::Bool(true)) { b"true" } else { b"false" }));
            }
            4 => {
                let all_i64 = vals.clone().all(|x| matches!(x, V::Int(_)));
                if all_i64 {
                    row.key(name, "INT64[]");
                    list_out(&mut row.cols, vals, |o, x| if let V::Int(i) = x { write_i64(o, *i) });
                } else {
                    row.key(name, "NUMERIC[]");
                    list_out(&mut row.cols, vals, |o, x| match x {
                        V::Int(i) => write_str(o, &i.to_string()),
                        V::UInt(u) => write_str(o, &u.to_string()),
                        _ => {}
                    });
                }
            }
            _ => {
                row.key(name, "FLOAT64[]");
                list_out(&mut row.cols, vals, |o, x| match x {
                    V::Int(i) => write_f64(o, *i as f64),
                    V::UInt(u) => write_f64(o, *u as f64),
                    V::Float(f) => write_f64(o, *f),
                    _ => {}
                });
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn child_rows(&mut self, py: Python<'_>, a: &[V], child: &Rc<str>, es: usize, parent_id: &str, ctx: &mut Ctx, scalar: bool) -> R<()> {
        let h0 = child_hasher(ctx.event_id, parent_id, child);
        let value_names = if scalar { Some(self.names(py, es, ["value"].into_iter(), 1)?) } else { None };
        for (i, el) in a.iter().enumerate() {
            if matches!(el, V::Null) {
                continue;
            }
            let mut r = self.child_row(&h0, i, child, parent_id, ctx.event_id, ctx.et);
            let slot = ctx.rows.len();
            ctx.rows.push(None);
            let rid = std::mem::take(&mut r.row_id);
            if let Some(vn) = &value_names {
                self.value(py, &vn[0], el, es, &mut r, &rid, ctx)?;
            } else if let V::Obj(o) = el {
                if !o.is_empty() {
                    self.walk(py, o, es, &mut r, &rid, ctx)?;
                }
            }
            r.row_id = rid;
            if r.n > MAX_COLUMNS {
                return Err(Decline::TooManyColumns);
            }
            r.cols.push(b'}');
            r.types.push(b'}');
            ctx.rows[slot] = Some(r);
        }
        Ok(())
    }

    /// A child row opened with its header columns (`flatten.core.child_row_id` for its id); the caller
    /// writes its columns and closes it.
    pub(crate) fn child_row(&mut self, h0: &Sha256, i: usize, child: &Rc<str>, parent_id: &str, eid: &str, et: &str) -> OutRow {
        let mut h = h0.clone();
        h.update(itoa::Buffer::new().format(i).as_bytes());
        let rid = json::hex(&h.finalize()[..16]);
        let mut r = OutRow { table: child.clone(), row_id: String::new(), cols: self.buf(), types: self.buf(), n: 0 };
        r.cols.push(b'{');
        r.types.push(b'{');
        r.key("_row_id", "STRING");
        write_str(&mut r.cols, &rid);
        r.key("_parent_row_id", "STRING");
        write_str(&mut r.cols, parent_id);
        r.key("_event_id", "STRING");
        write_str(&mut r.cols, eid);
        r.key("_index", "INT64");
        write_i64(&mut r.cols, i as i64);
        r.key("_event_time", "TIMESTAMP");
        write_str(&mut r.cols, et);
        r.row_id = rid;
        r
    }

    // ---------------------------------------------------------- masking

    fn mask_doc(&mut self, py: Python<'_>, doc: &mut V) -> R<()> {
        if let (Some(st), V::Obj(o)) = (self.matcher.start(), doc) {
            self.mask_dict(py, o, st, 0)?;
        }
        Ok(())
    }

    /// The matcher state after a key (normalised here) from state `st`; None = nothing can match below.
    fn mask_step(&mut self, py: Python<'_>, st: u32, key: &str) -> R<Option<u32>> {
        let nk = self.normalize(py, key)?;
        Ok(self.matcher.step(st, &nk))
    }

    /// The policy for value `v` in matcher state `st` (a list as a whole, anything else).
    fn mask_pol(&self, st: u32, is_list: bool) -> Option<mask::Pol> {
        if is_list {
            self.matcher.whole(st)
        } else {
            self.matcher.any(st)
        }
    }

    fn mask_dict<'a>(&mut self, py: Python<'_>, o: &mut Vec<(Cow<'a, str>, V<'a>)>, st: u32, depth: usize) -> R<()> {
        let mut i = 0;
        while i < o.len() {
            let Some(ns) = self.mask_step(py, st, &o[i].0)? else {
                i += 1;
                continue;
            };
            if self.apply(py, &mut o[i].1, ns, depth)? {
                o.remove(i);
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    /// `Masker._apply`; true = drop the value.
    fn apply<'a>(&mut self, py: Python<'_>, v: &mut V<'a>, st: u32, depth: usize) -> R<bool> {
        if let Some(p) = self.mask_pol(st, matches!(v, V::Arr(_))) {
            return Ok(match self.policy(py, p, v)? {
                Masked::Keep => false,
                Masked::Drop => true,
                Masked::Set(nv) => {
                    *v = nv;
                    false
                }
            });
        }
        match v {
            V::Obj(o) => {
                if depth >= MAX_MASK_DEPTH {
                    return Ok(true);
                }
                self.mask_dict(py, o, st, depth + 1)?;
            }
            V::Arr(a) => {
                if depth >= MAX_MASK_DEPTH {
                    return Ok(true);
                }
                let mut out = Vec::with_capacity(a.len());
                for mut x in std::mem::take(a) {
                    if !self.apply(py, &mut x, st, depth + 1)? {
                        out.push(x);
                    }
                }
                *a = out;
            }
            _ => {}
        }
        Ok(false)
    }

    fn policy<'a>(&self, py: Python<'_>, (policy, keep_last): mask::Pol, v: &V) -> R<Masked<'a>> {
        if policy == 4 {
            return Ok(Masked::Drop);
        }
        if matches!(v, V::Null) {
            return Ok(Masked::Keep);
        }
        let s = match policy {
            2 => {
                let mut m = self.hash_mac.clone();
                m.update(&value_bytes(v));
                json::hex(&m.finalize().into_bytes())
            }
            1 => {
                let mut m = self.tok_mac.clone();
                m.update(&self.canonical(py, v)?);
                let mut t = String::from("tok_");
                t.push_str(&json::hex(&m.finalize().into_bytes()[..16]));
                t
            }
            _ => self.redact(py, v, keep_last)?,
        };
        Ok(Masked::Set(V::Str(Cow::Owned(s))))
    }

    fn canonical(&self, py: Python<'_>, v: &V) -> R<Vec<u8>> {
        let ask = |o: Bound<'_, PyAny>| -> R<Vec<u8>> {
            self.canonical_bytes.call1(py, (o,)).and_then(|r| r.extract::<Vec<u8>>(py)).map_err(|_| Decline::Callback)
        };
        Ok(match v {
            V::Str(s) if s.is_ascii() => {
                let t = s.trim_matches(|c: char| matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r' | '\x1c'..='\x1f'));
                let mut b = b"s:".to_vec();
                b.extend(t.bytes().map(|c| c.to_ascii_lowercase()));
                b
            }
            V::Str(s) => ask(PyString::new(py, s).into_any())?,
            V::Bool(b) => if *b { b"b:true".to_vec() } else { b"b:false".to_vec() },
            V::Int(i) => format!("s:{i}").into_bytes(),
            V::UInt(u) => format!("s:{u}").into_bytes(),
            V::Float(f) => ask(PyFloat::new(py, *f).into_any())?,
            V::Obj(_) | V::Arr(_) => {
                let mut b = b"j:".to_vec();
                write_value(&mut b, v, true);
                b
            }
            V::Null => return Err(Decline::Callback),
        })
    }

    fn redact(&self, py: Python<'_>, v: &V, keep_last: usize) -> R<String> {
        let s: String = match v {
            V::Str(s) => s.to_string(),
            V::Int(i) => i.to_string(),
            V::UInt(u) => u.to_string(),
            V::Float(f) => PyFloat::new(py, *f).repr().and_then(|r| r.extract::<String>()).map_err(|_| Decline::Callback)?,
            _ => return Ok("****".to_owned()),
        };
        let n = s.chars().count();
        let keep = keep_last.min(n / 2);
        if keep == 0 {
            return Ok("****".to_owned());
        }
        let tail: String = s.chars().skip(n - keep).collect();
        Ok(format!("****{tail}"))
    }
}

/// `flatten.mask._value_bytes` for JSON values.
fn value_bytes(v: &V) -> Vec<u8> {
    match v {
        V::Str(s) => s.as_bytes().to_vec(),
        _ => {
            let mut b = Vec::new();
            write_value(&mut b, v, true); // containers sorted; scalars as orjson.dumps
            b
        }
    }
}

fn json_col(row: &mut OutRow, name: &str, v: &V) {
    let mut text = Vec::with_capacity(128);
    write_value(&mut text, v, false);
    row.key(name, "JSON");
    // orjson text is valid UTF-8
    write_str(&mut row.cols, std::str::from_utf8(&text).expect("utf-8"));
}

fn list_out<T, I: Iterator<Item = T>>(out: &mut Vec<u8>, it: I, mut f: impl FnMut(&mut Vec<u8>, T)) {
    out.push(b'[');
    for (i, x) in it.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        f(out, x);
    }
    out.push(b']');
}

/// `flatten.names.resolve_keys` collision step (segments already normalised, some equal).
fn resolve_collisions(keys: &[&str], norm: &mut [String]) {
    let mut order: Vec<String> = Vec::new();
    let mut groups: FxHashMap<String, Vec<usize>> = FxHashMap::default();
    for (i, n) in norm.iter().enumerate() {
        if !groups.contains_key(n) {
            order.push(n.clone());
        }
        groups.entry(n.clone()).or_default().push(i);
    }
    let mut taken: FxHashSet<String> = groups.keys().cloned().collect();
    let mut losers: Vec<usize> = Vec::new();
    for n in &order {
        let idxs = &groups[n];
        if idxs.len() == 1 {
            continue;
        }
        let winner = idxs.iter().copied().find(|&i| keys[i] == n).unwrap_or_else(|| *idxs.iter().min_by(|&&a, &&b| keys[a].cmp(keys[b])).unwrap());
        losers.extend(idxs.iter().copied().filter(|&i| i != winner));
    }
    losers.sort_by(|&a, &b| keys[a].cmp(keys[b]));
    for i in losers {
        let h = sha_hex(keys[i].as_bytes());
        let mut cand = String::new();
        let mut found = false;
        for w in [8, 16, 64] {
            cand = format!("{}_{}", norm[i], &h[..w]);
            if !taken.contains(&cand) {
                found = true;
                break;
            }
        }
        if !found {
            let mut j = 2;
            while taken.contains(&format!("{}_{}_{}", norm[i], h, j)) {
                j += 1;
            }
            cand = format!("{}_{}_{}", norm[i], h, j);
        }
        taken.insert(cand.clone());
        norm[i] = cand;
    }
}

/// `Flattener.column_override` for a scalar `v` of a configured column (`ts_col`: a timestamp column, else a
/// no-timestamp column), decided here for the common cases: `Some(answer)` (`None` as the answer: not decided by
/// the option, stored by its own type), or None: ask the Python callback. Native: strings in the strict ISO forms
/// (`ts::parse_fast`; a DATE becomes midnight UTC), integer epochs below 1e17 (exact), finite float epochs below
/// 1e17, and everything in a no-timestamp column. Left to Python: other strings (offsets, spaces, non-ASCII ...),
/// u64 integers beyond i64 and |epochs| >= 1e17 (Python divides those as floats).
fn percol_native<'v>(v: &'v V, ts_col: bool) -> Option<Option<(Cow<'v, str>, &'static str)>> {
    if !ts_col {
        // no_timestamp_columns: a string is a STRING as it is; any other value is stored by its own type
        return Some(match v {
            V::Str(s) => Some((Cow::Borrowed(&**s), "STRING")),
            _ => None,
        });
    }
    let us = match v {
        V::Str(s) => {
            return match ts::parse_fast(s) {
                ts::Fast::Yes(mut d, "DATE") => {
                    d.push_str("T00:00:00.000000Z");
                    Some(Some((Cow::Owned(d), "TIMESTAMP")))
                }
                ts::Fast::Yes(t, kind) => Some(Some((Cow::Owned(t), kind))),
                ts::Fast::Ask => None,
            }
        }
        V::Int(i) => ts::epoch_int_us(*i as i128)?,
        V::UInt(u) => ts::epoch_int_us(*u as i128)?,
        V::Float(f) => ts::epoch_float_us(*f)?,
        _ => return Some(None),
    };
    // out of years 1..9999: Python's OverflowError, i.e. not a timestamp (stored by its own type)
    Some(ts::event_time(us).map(|t| (Cow::Owned(t), "TIMESTAMP")))
}

/// Test hooks: the writer's float text and the timestamp fast path (None = would ask Python).
#[pyfunction]
fn _format_float(f: f64) -> String {
    let mut b = Vec::new();
    write_f64(&mut b, f);
    String::from_utf8(b).unwrap()
}

#[pyfunction]
fn _parse_timestamp_fast(s: &str) -> Option<(String, String)> {
    match ts::parse_fast(s) {
        ts::Fast::Yes(v, t) => Some((v, t.to_owned())),
        ts::Fast::Ask => None,
    }
}

/// `row_values` on any bytes (None: the caller would run `orjson.loads`).
#[pyfunction]
fn _row_values<'py>(py: Python<'py>, cols: &[u8], names: Vec<String>) -> PyResult<Option<Bound<'py, PyTuple>>> {
    row_values(py, cols, &names)
}

#[pyfunction]
fn _event_time(us: i64) -> Option<String> {
    ts::event_time(us)
}

/// `epoch_to_timestamp` as the per-column path decides it: `(True, answer)` when decided natively, else
/// `(False, None)` (the Python callback decides). Ints beyond i128 raise OverflowError.
#[pyfunction]
fn _epoch_timestamp_fast(v: &Bound<'_, PyAny>) -> PyResult<(bool, Option<String>)> {
    let us = if v.is_instance_of::<PyFloat>() {
        ts::epoch_float_us(v.extract()?)
    } else {
        ts::epoch_int_us(v.extract::<i128>()?)
    };
    Ok(match us {
        Some(us) => (true, ts::event_time(us)),
        None => (false, None),
    })
}

#[pymodule]
fn headwater_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeFlattener>()?;
    m.add_function(wrap_pyfunction!(_format_float, m)?)?;
    m.add_function(wrap_pyfunction!(_parse_timestamp_fast, m)?)?;
    m.add_function(wrap_pyfunction!(_event_time, m)?)?;
    m.add_function(wrap_pyfunction!(_row_values, m)?)?;
    m.add_function(wrap_pyfunction!(_epoch_timestamp_fast, m)?)?;
    m.add("ABI_VERSION", 2)?;
    Ok(())
}

/// An instance of a tuple subclass (a NamedTuple) holding `items`, as `tuple.__new__(cls, items)` makes it
/// (the class must add no fields of its own: NamedTuples do not).
fn new_subtuple<'py, const N: usize>(
    py: Python<'py>,
    cls: &Bound<'py, PyType>,
    items: [Bound<'py, PyAny>; N],
) -> PyResult<Bound<'py, PyAny>> {
    let t = PyTuple::new(py, items)?;
    let tuple_new = TUPLE_NEW.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
        Ok(py.get_type::<PyTuple>().getattr("__new__")?.unbind())
    })?;
    tuple_new.bind(py).call1((cls, t))
}

static TUPLE_NEW: pyo3::sync::GILOnceCell<Py<PyAny>> = pyo3::sync::GILOnceCell::new();
