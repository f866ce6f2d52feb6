//! JSON value, parser (serde_json, orjson-compatible semantics) and an orjson-exact writer.
//!
//! Parsing mirrors what `orjson.loads` produces for the documents we accept:
//! * duplicate keys: first position, last value (a Python dict);
//! * integers in i64/u64 exactly, larger ones as floats (serde_json's long-integer path);
//! * `-0` is an int 0 in orjson but -0.0 in serde_json, so any negative zero is
//!   rejected (the caller falls back to Python for that event);
//! * non-finite numbers, lone surrogates, invalid UTF-8 and nesting beyond
//!   serde_json's 128 levels are rejected (fallback, where orjson decides).
//!
//! The writer reproduces `orjson.dumps` byte for byte: compact separators, only
//! `"`, `\` and control characters escaped (short forms for \b \t \n \f \r,
//! else `\u00xx` lower-case), and orjson's float format (shortest round-trip
//! digits; fixed notation for 1e-5 <= |x| < 1e16, else `de[+-]x`).

use rustc_hash::FxHashMap;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use std::borrow::Cow;
use std::fmt;

pub enum V<'a> {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(Cow<'a, str>),
    Arr(Vec<V<'a>>),
    Obj(Vec<(Cow<'a, str>, V<'a>)>),
}

struct VVisitor;

impl<'de> Visitor<'de> for VVisitor {
    type Value = V<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, b: bool) -> Result<V<'de>, E> {
        Ok(V::Bool(b))
    }
    fn visit_i64<E>(self, i: i64) -> Result<V<'de>, E> {
        Ok(V::Int(i))
    }
    fn visit_u64<E>(self, u: u64) -> Result<V<'de>, E> {
        Ok(if u <= i64::MAX as u64 { V::Int(u as i64) } else { V::UInt(u) })
    }
    fn visit_f64<E: de::Error>(self, f: f64) -> Result<V<'de>, E> {
        if !f.is_finite() || (f == 0.0 && f.is_sign_negative()) {
            return Err(E::custom("unsupported number"));
        }
        Ok(V::Float(f))
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<V<'de>, E> {
        Ok(V::Str(Cow::Borrowed(s)))
    }
    fn visit_str<E>(self, s: &str) -> Result<V<'de>, E> {
        Ok(V::Str(Cow::Owned(s.to_owned())))
    }
    fn visit_string<E>(self, s: String) -> Result<V<'de>, E> {
        Ok(V::Str(Cow::Owned(s)))
    }
    fn visit_unit<E>(self) -> Result<V<'de>, E> {
        Ok(V::Null)
    }
    fn visit_none<E>(self) -> Result<V<'de>, E> {
        Ok(V::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<V<'de>, A::Error> {
        let mut v = Vec::with_capacity(a.size_hint().unwrap_or(4));
        while let Some(x) = a.next_element::<V<'de>>()? {
            v.push(x);
        }
        Ok(V::Arr(v))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<V<'de>, A::Error> {
        let mut v: Vec<(Cow<'de, str>, V<'de>)> = Vec::with_capacity(8);
        let mut idx: Option<FxHashMap<String, usize>> = None;
        while let Some(Key(k)) = a.next_key::<Key<'de>>()? {
            let val: V<'de> = a.next_value()?;
            if v.len() < 16 && idx.is_none() {
                if let Some(p) = v.iter().position(|(kk, _)| **kk == *k) {
                    v[p].1 = val;
                    continue;
                }
                v.push((k, val));
            } else {
                let m = idx.get_or_insert_with(|| v.iter().enumerate().map(|(i, (kk, _))| (kk.to_string(), i)).collect());
                if let Some(&p) = m.get(&*k) {
                    v[p].1 = val;
                    continue;
                }
                m.insert(k.to_string(), v.len());
                v.push((k, val));
            }
        }
        Ok(V::Obj(v))
    }
}

impl<'de> Deserialize<'de> for V<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(VVisitor)
    }
}

struct Key<'a>(Cow<'a, str>);
struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Key<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("key")
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Borrowed(s)))
    }
    fn visit_str<E>(self, s: &str) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Owned(s.to_owned())))
    }
    fn visit_string<E>(self, s: String) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Owned(s)))
    }
}

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(KeyVisitor)
    }
}

/// Parse a whole payload; None when serde_json rejects it (the caller falls back to Python).
pub fn parse(b: &[u8]) -> Option<V<'_>> {
    // validate UTF-8 once, then parse from &str (no per-string re-validation)
    serde_json::from_str::<V>(std::str::from_utf8(b).ok()?).ok()
}

// ------------------------------------------------------------------ writer

const HEX: &[u8; 16] = b"0123456789abcdef";

#[inline]
fn esc_in_word(x: u64) -> bool {
    // SWAR: any byte < 0x20, == '"' or == '\\' (bytes >= 0x80 never flag)
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let lt = x.wrapping_sub(LO * 0x20) & !x & HI;
    let q = x ^ (LO * 0x22);
    let bs = x ^ (LO * 0x5c);
    (lt | (q.wrapping_sub(LO) & !q & HI) | (bs.wrapping_sub(LO) & !bs & HI)) != 0
}

#[inline]
fn needs_esc(c: u8) -> bool {
    c < 0x20 || c == b'"' || c == b'\\'
}

pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let b = s.as_bytes();
    let n = b.len();
    let mut start = 0;
    let mut i = 0;
    loop {
        while i + 8 <= n && !esc_in_word(u64::from_le_bytes(b[i..i + 8].try_into().unwrap())) {
            i += 8;
        }
        while i < n && !needs_esc(b[i]) {
            i += 1;
            if i % 8 == 0 {
                break;
            }
        }
        if i >= n {
            break;
        }
        let c = b[i];
        if !needs_esc(c) {
            continue;
        }
        out.extend_from_slice(&b[start..i]);
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            _ => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(c >> 4) as usize]);
                out.push(HEX[(c & 15) as usize]);
            }
        }
        i += 1;
        start = i;
    }
    out.extend_from_slice(&b[start..]);
    out.push(b'"');
}

pub fn write_i64(out: &mut Vec<u8>, i: i64) {
    out.extend_from_slice(i.to_string().as_bytes());
}

/// orjson's float text: ryu's shortest round-trip digits and layout (fixed for 1e-5 <= |x| < 1e16),
/// with orjson's explicit `+` in positive exponents (checked against orjson.dumps in the tests).
pub fn write_f64(out: &mut Vec<u8>, f: f64) {
    let mut buf = ryu::Buffer::new();
    let s = buf.format_finite(f).as_bytes();
    match s.iter().position(|&c| c == b'e') {
        Some(p) if s.get(p + 1) != Some(&b'-') => {
            out.extend_from_slice(&s[..=p]);
            out.push(b'+');
            out.extend_from_slice(&s[p + 1..]);
        }
        _ => out.extend_from_slice(s),
    }
}

/// `orjson.dumps(v)` (or with OPT_SORT_KEYS when `sort`).
pub fn write_value(out: &mut Vec<u8>, v: &V, sort: bool) {
    match v {
        V::Null => out.extend_from_slice(b"null"),
        V::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        V::Int(i) => write_i64(out, *i),
        V::UInt(u) => out.extend_from_slice(u.to_string().as_bytes()),
        V::Float(f) => write_f64(out, *f),
        V::Str(s) => write_str(out, s),
        V::Arr(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, x, sort);
            }
            out.push(b']');
        }
        V::Obj(o) => {
            out.push(b'{');
            if sort {
                let mut idx: Vec<usize> = (0..o.len()).collect();
                idx.sort_by(|a, b| o[*a].0.as_bytes().cmp(o[*b].0.as_bytes()));
                for (n, i) in idx.into_iter().enumerate() {
                    if n > 0 {
                        out.push(b',');
                    }
                    write_str(out, &o[i].0);
                    out.push(b':');
                    write_value(out, &o[i].1, sort);
                }
            } else {
                for (n, (k, x)) in o.iter().enumerate() {
                    if n > 0 {
                        out.push(b',');
                    }
                    write_str(out, k);
                    out.push(b':');
                    write_value(out, x, sort);
                }
            }
            out.push(b'}');
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    let mut v = Vec::with_capacity(bytes.len() * 2);
    for b in bytes {
        v.push(HEX[(b >> 4) as usize]);
        v.push(HEX[(b & 15) as usize]);
    }
    // only ASCII hex digits were written
    String::from_utf8(v).unwrap_or_default()
}
