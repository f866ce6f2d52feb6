//! JSON value, parser (hand-written, orjson-compatible semantics) and an orjson-exact writer.
//!
//! Parsing mirrors what `orjson.loads` produces for the documents we accept:
//! * duplicate keys: first position, last value (a Python dict);
//! * integers in i64/u64 exactly; larger ones decline (Python keeps them exact, `flatten.jsonio`);
//! * `-0` is an int 0 in orjson, so any negative zero is rejected;
//! * non-finite numbers, lone surrogates, invalid UTF-8 and nesting beyond
//!   128 levels are rejected.
//! A rejected payload makes the caller fall back to Python for that event, where orjson decides.
//!
//! The writer reproduces `orjson.dumps` byte for byte: compact separators, only
//! `"`, `\` and control characters escaped (short forms for \b \t \n \f \r,
//! else `\u00xx` lower-case), and orjson's float format (shortest round-trip
//! digits; fixed notation for 1e-5 <= |x| < 1e16, else `de[+-]x`).

use rustc_hash::FxHashMap;
use std::borrow::Cow;

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

/// Parse a whole payload; None when it is not JSON orjson would read the same way (the caller falls back
/// to Python, where orjson decides): a hand-written borrowed parser (strict RFC 8259 grammar, one UTF-8
/// validation up front, strings without escapes borrowed from the payload, children gathered on a scratch
/// stack and moved into exact-size vectors). Declines, beyond invalid JSON: negative zero, non-finite
/// numbers, integers outside i64/u64, lone surrogates, nesting deeper than 128.
pub fn parse(b: &[u8]) -> Option<V<'_>> {
    let mut p = Parser::new(b)?;
    let v = p.value()?;
    if !p.at_end() {
        return None;
    }
    Some(v)
}

const MAX_NESTING: u32 = 128;

/// A cursor over one payload; `flatten`'s streaming path drives it key by key (`stream.rs`).
pub(crate) struct Parser<'a> {
    pub(crate) s: &'a str,
    pub(crate) b: &'a [u8],
    pub(crate) i: usize,
    pub(crate) depth: u32,
    /// the deepest nesting entered so far (the root object is 1)
    pub(crate) max_depth: u32,
    vals: Vec<V<'a>>,
    pairs: Vec<(Cow<'a, str>, V<'a>)>,
}

impl<'a> Parser<'a> {
    /// A parser at the first value of `b` (UTF-8 validated once here); None if `b` is not UTF-8.
    pub(crate) fn new(b: &'a [u8]) -> Option<Parser<'a>> {
        let s = simdutf8::basic::from_utf8(b).ok()?; // SIMD validation, same verdict as std's
        let mut p = Parser { s, b: s.as_bytes(), i: 0, depth: 0, max_depth: 0, vals: Vec::new(), pairs: Vec::new() };
        p.ws();
        Some(p)
    }

    /// Only whitespace left.
    pub(crate) fn at_end(&mut self) -> bool {
        self.ws();
        self.i == self.b.len()
    }

    /// Entering an object or array: false beyond the nesting limit.
    #[inline]
    pub(crate) fn enter(&mut self) -> bool {
        self.depth += 1;
        self.max_depth = self.max_depth.max(self.depth);
        self.depth <= MAX_NESTING
    }

    #[inline(always)]
    pub(crate) fn ws(&mut self) {
        match self.b.get(self.i) {
            Some(&c) if c > b' ' => {} // compact JSON: the common case
            None => {}
            _ => self.ws_run(),
        }
    }

    fn ws_run(&mut self) {
        while let Some(&c) = self.b.get(self.i) {
            if c == b' ' || c == b'\n' || c == b'\r' || c == b'\t' {
                self.i += 1;
            } else {
                break;
            }
        }
    }

    #[inline]
    pub(crate) fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    /// At a `{` or `[`: step in (None beyond the nesting limit). True when a member follows, false when
    /// `close` ends it at once (consumed).
    #[inline(always)]
    pub(crate) fn open(&mut self, close: u8) -> Option<bool> {
        if !self.enter() {
            return None;
        }
        self.i += 1;
        self.ws();
        if self.peek()? == close {
            self.i += 1;
            return Some(false);
        }
        Some(true)
    }

    /// At an object member: its key; the parser is left at the value.
    #[inline(always)]
    pub(crate) fn member_key(&mut self) -> Option<Cow<'a, str>> {
        if self.peek()? != b'"' {
            return None;
        }
        let k = self.string()?;
        self.ws();
        if self.peek()? != b':' {
            return None;
        }
        self.i += 1;
        self.ws();
        Some(k)
    }

    /// After a member of an object or array: true at `,` (consumed, with the whitespace after it), false at
    /// `close` (consumed), None at anything else.
    #[inline(always)]
    pub(crate) fn next_or_close(&mut self, close: u8) -> Option<bool> {
        self.ws();
        match self.peek()? {
            b',' => {
                self.i += 1;
                self.ws();
                Some(true)
            }
            c if c == close => {
                self.i += 1;
                Some(false)
            }
            _ => None,
        }
    }

    /// At an `n`: the literal null.
    pub(crate) fn null(&mut self) -> Option<()> {
        self.lit(b"null", V::Null).map(|_| ())
    }

    fn lit(&mut self, word: &[u8], v: V<'a>) -> Option<V<'a>> {
        if self.b.get(self.i..self.i + word.len())? == word {
            self.i += word.len();
            Some(v)
        } else {
            None
        }
    }

    pub(crate) fn value(&mut self) -> Option<V<'a>> {
        match self.peek()? {
            b'"' => Some(V::Str(self.string()?)),
            b'{' => self.object(),
            b'[' => self.array(),
            b't' => self.lit(b"true", V::Bool(true)),
            b'f' => self.lit(b"false", V::Bool(false)),
            b'n' => self.lit(b"null", V::Null),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn array(&mut self) -> Option<V<'a>> {
        let base = self.vals.len();
        if self.open(b']')? {
            loop {
                let v = self.value()?;
                self.vals.push(v);
                if !self.next_or_close(b']')? {
                    break;
                }
            }
        }
        self.depth -= 1;
        Some(V::Arr(self.vals.split_off(base)))
    }

    fn object(&mut self) -> Option<V<'a>> {
        let base = self.pairs.len();
        let mut idx: Option<FxHashMap<Cow<'a, str>, usize>> = None;
        if self.open(b'}')? {
            loop {
                let k = self.member_key()?;
                let v = self.value()?;
                // duplicate keys: first position, last value (a Python dict)
                let n = self.pairs.len() - base;
                if n < 16 && idx.is_none() {
                    if let Some(p) = self.pairs[base..].iter().position(|(kk, _)| *kk == k) {
                        self.pairs[base + p].1 = v;
                    } else {
                        self.pairs.push((k, v));
                    }
                } else {
                    let pairs = &self.pairs;
                    let m = idx.get_or_insert_with(|| pairs[base..].iter().enumerate().map(|(i, (kk, _))| (kk.clone(), i)).collect());
                    if let Some(&p) = m.get(&k) {
                        self.pairs[base + p].1 = v;
                    } else {
                        m.insert(k.clone(), n);
                        self.pairs.push((k, v));
                    }
                }
                if !self.next_or_close(b'}')? {
                    break;
                }
            }
        }
        self.depth -= 1;
        Some(V::Obj(self.pairs.split_off(base)))
    }

    /// At a `"`: the string's text, borrowed when it has no escapes.
    #[inline(always)]
    pub(crate) fn string(&mut self) -> Option<Cow<'a, str>> {
        let b = self.b;
        self.i += 1;
        let start = self.i;
        let i = find_special(b, start);
        match *b.get(i)? {
            b'"' => {
                self.i = i + 1;
                Some(Cow::Borrowed(&self.s[start..i]))
            }
            b'\\' => self.escaped(start, i),
            _ => None, // a control byte
        }
    }

    /// The rest of a string from its first backslash at `i`: an owned copy with the escapes decoded.
    #[cold]
    #[inline(never)]
    fn escaped(&mut self, start: usize, mut i: usize) -> Option<Cow<'a, str>> {
        let b = self.b;
        let n = b.len();
        let mut out = String::with_capacity(i - start + 16);
        out.push_str(&self.s[start..i]);
        loop {
            let c = *b.get(i)?;
            match c {
                b'"' => {
                    self.i = i + 1;
                    return Some(Cow::Owned(out));
                }
                b'\\' => {
                    let e = *b.get(i + 1)?;
                    i += 2;
                    match e {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let hi = hex4(b.get(i..i + 4)?)?;
                            i += 4;
                            let cp = if (0xD800..0xDC00).contains(&hi) {
                                if b.get(i..i + 2)? != b"\\u" {
                                    return None; // lone high surrogate
                                }
                                let lo = hex4(b.get(i + 2..i + 6)?)?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return None;
                                }
                                i += 6;
                                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                            } else if (0xDC00..0xE000).contains(&hi) {
                                return None; // lone low surrogate
                            } else {
                                hi
                            };
                            out.push(char::from_u32(cp)?);
                        }
                        _ => return None,
                    }
                }
                c if c < 0x20 => return None,
                _ => {
                    // copy the run up to the next quote, backslash or control byte
                    let run = i;
                    while i < n && !needs_esc(b[i]) {
                        i += 1;
                    }
                    out.push_str(&self.s[run..i]);
                }
            }
        }
    }

    pub(crate) fn number(&mut self) -> Option<V<'a>> {
        let b = self.b;
        let start = self.i;
        let mut i = start;
        let neg = b[i] == b'-';
        if neg {
            i += 1;
        }
        let d0 = i;
        match b.get(i)? {
            b'0' => i += 1,
            b'1'..=b'9' => {
                while matches!(b.get(i), Some(b'0'..=b'9')) {
                    i += 1;
                }
            }
            _ => return None,
        }
        let int_end = i;
        let mut float = false;
        if b.get(i) == Some(&b'.') {
            i = digits(b, i + 1)?;
            float = true;
        }
        if matches!(b.get(i), Some(b'e' | b'E')) {
            i += 1;
            if matches!(b.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            i = digits(b, i)?;
            float = true;
        }
        self.i = i;
        if !float {
            let digits = &b[d0..int_end];
            let mag: Option<u64> = if digits.len() <= 19 {
                Some(digits.iter().fold(0u64, |a, &d| a * 10 + (d - b'0') as u64))
            } else {
                self.s[d0..int_end].parse::<u64>().ok()
            };
            let mag = match mag {
                Some(m) if !(neg && m > 1u64 << 63) => m,
                // beyond i64/u64: decline (Python keeps such integers exact: flatten.jsonio)
                _ => return None,
            };
            return if neg {
                if mag == 0 {
                    None // -0: orjson's int 0; decline
                } else {
                    Some(V::Int((mag as i64).wrapping_neg()))
                }
            } else if mag <= i64::MAX as u64 {
                Some(V::Int(mag as i64))
            } else {
                Some(V::UInt(mag))
            };
        }
        let f: f64 = self.s[start..i].parse().ok()?;
        if !f.is_finite() || (f == 0.0 && f.is_sign_negative()) {
            return None;
        }
        Some(V::Float(f))
    }
}

/// The end of a run of at least one ASCII digit starting at `i`.
fn digits(b: &[u8], mut i: usize) -> Option<usize> {
    if !matches!(b.get(i), Some(b'0'..=b'9')) {
        return None;
    }
    while matches!(b.get(i), Some(b'0'..=b'9')) {
        i += 1;
    }
    Some(i)
}

fn hex4(h: &[u8]) -> Option<u32> {
    let mut v = 0u32;
    for &c in h {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => return None,
        };
        v = v * 16 + d as u32;
    }
    Some(v)
}

// ------------------------------------------------------------------ writer

const HEX: &[u8; 16] = b"0123456789abcdef";

/// SWAR over 8 bytes: the high bit set in each byte lane that is < 0x20, '"' or '\\' (bytes >= 0x80
/// never flag). Borrows only run upwards, so the *lowest* flagged lane is exact (lanes above it may be
/// false positives): `trailing_zeros() / 8` is the offset of the first byte to stop at.
#[inline(always)]
fn esc_mask(x: u64) -> u64 {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let lt = x.wrapping_sub(LO * 0x20) & !x & HI;
    let q = x ^ (LO * 0x22);
    let bs = x ^ (LO * 0x5c);
    lt | (q.wrapping_sub(LO) & !q & HI) | (bs.wrapping_sub(LO) & !bs & HI)
}

/// The offset of the first byte at or after `i` that is < 0x20, '"' or '\\', or `b.len()`.
#[inline(always)]
pub(crate) fn find_special(b: &[u8], mut i: usize) -> usize {
    let n = b.len();
    while i + 8 <= n {
        let m = esc_mask(u64::from_le_bytes(b[i..i + 8].try_into().unwrap()));
        if m != 0 {
            return i + (m.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < n && !needs_esc(b[i]) {
        i += 1;
    }
    i
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
        i = find_special(b, i);
        if i >= n {
            break;
        }
        let c = b[i];
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
    out.extend_from_slice(itoa::Buffer::new().format(i).as_bytes());
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
