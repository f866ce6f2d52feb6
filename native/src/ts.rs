//! Date/time helpers: a strict fast path for the common ISO forms of
//! `flatten.infer.parse_timestamp`; anything else is answered by the Python
//! function itself (the caller makes that call), so results are identical.

fn d2(b: &[u8], i: usize) -> Option<u32> {
    let (x, y) = (b[i], b[i + 1]);
    if x.is_ascii_digit() && y.is_ascii_digit() {
        Some(((x - b'0') * 10 + (y - b'0')) as u32)
    } else {
        None
    }
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn dim(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ => {
            if is_leap(y) {
                29
            } else {
                28
            }
        }
    }
}

/// (year, month, day) of a valid `YYYY-MM-DD` prefix with year >= 1, else None.
fn ymd(b: &[u8]) -> Option<(i64, u32, u32)> {
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let y = d2(b, 0)? as i64 * 100 + d2(b, 2)? as i64;
    let m = d2(b, 5)?;
    let d = d2(b, 8)?;
    if y < 1 || !(1..=12).contains(&m) || d < 1 || d > dim(y, m) {
        return None;
    }
    Some((y, m, d))
}

/// Python's prefilter: `len(v) > 9 and v[4] == "-" and v[7] == "-"` (code points).
pub fn looks(s: &str) -> bool {
    let b = s.as_bytes();
    if s.is_ascii() {
        return b.len() > 9 && b[4] == b'-' && b[7] == b'-';
    }
    let mut n = 0usize;
    let mut ok = true;
    for (i, c) in s.chars().enumerate() {
        if (i == 4 || i == 7) && c != '-' {
            ok = false;
        }
        n += 1;
    }
    ok && n > 9
}

pub enum Fast {
    Yes(String, &'static str),
    /// Not one of the strict forms: ask Python.
    Ask,
}

/// Strict forms: `YYYY-MM-DD` and `YYYY-MM-DDTHH:MM:SS[.f{1,6}]Z` (ASCII, valid ranges).
pub fn parse_fast(s: &str) -> Fast {
    let b = s.as_bytes();
    let n = b.len();
    if !s.is_ascii() {
        return Fast::Ask;
    }
    if n == 10 {
        return match ymd(b) {
            Some(_) => Fast::Yes(s.to_owned(), "DATE"),
            None => Fast::Ask,
        };
    }
    if !(20..=27).contains(&n) || b[10] != b'T' || b[n - 1] != b'Z' || b[13] != b':' || b[16] != b':' {
        return Fast::Ask;
    }
    if ymd(b).is_none() {
        return Fast::Ask;
    }
    let (Some(h), Some(mi), Some(se)) = (d2(b, 11), d2(b, 14), d2(b, 17)) else { return Fast::Ask };
    if h > 23 || mi > 59 || se > 59 {
        return Fast::Ask;
    }
    let frac = if n == 20 {
        ""
    } else {
        if b[19] != b'.' || n == 21 {
            return Fast::Ask;
        }
        let f = &s[20..n - 1];
        if !f.bytes().all(|c| c.is_ascii_digit()) {
            return Fast::Ask;
        }
        f
    };
    let mut out = String::with_capacity(27);
    out.push_str(&s[..10]);
    out.push('T');
    out.push_str(&s[11..19]);
    out.push('.');
    out.push_str(frac);
    for _ in frac.len()..6 {
        out.push('0');
    }
    out.push('Z');
    Fast::Yes(out, "TIMESTAMP")
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `Flattener._event_time`: microseconds -> `YYYY-MM-DDTHH:MM:SS.ffffffZ`, None outside years 1..9999.
pub fn event_time(us: i64) -> Option<String> {
    let sec = us.div_euclid(1_000_000);
    let frac = us.rem_euclid(1_000_000);
    let days = sec.div_euclid(86_400);
    let sod = sec.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    if !(1..=9999).contains(&y) {
        return None;
    }
    // `YYYY-MM-DDTHH:MM:SS.ffffffZ`, digit by digit (this runs per event: no formatting machinery)
    let mut out = String::with_capacity(27);
    fn put(out: &mut String, v: i64, width: u32) {
        for k in (0..width).rev() {
            out.push(char::from(b'0' + ((v / 10i64.pow(k)) % 10) as u8));
        }
    }
    put(&mut out, y, 4);
    out.push('-');
    put(&mut out, m as i64, 2);
    out.push('-');
    put(&mut out, d as i64, 2);
    out.push('T');
    put(&mut out, sod / 3600, 2);
    out.push(':');
    put(&mut out, (sod / 60) % 60, 2);
    out.push(':');
    put(&mut out, sod % 60, 2);
    out.push('.');
    put(&mut out, frac, 6);
    out.push('Z');
    Some(out)
}

/// Microseconds since the epoch of a strict `YYYY-MM-DDTHH:MM:SS[.f{1,6}]Z` string, else None.
pub fn iso_z_to_us(s: &str) -> Option<i64> {
    let Fast::Yes(t, "TIMESTAMP") = parse_fast(s) else { return None };
    let b = t.as_bytes();
    let (y, m, d) = ymd(b)?;
    let secs = days_from_civil(y, m, d) * 86_400
        + d2(b, 11)? as i64 * 3600
        + d2(b, 14)? as i64 * 60
        + d2(b, 17)? as i64;
    let frac: i64 = t[20..26].parse().ok()?;
    Some(secs * 1_000_000 + frac)
}

/// Microseconds of an integer epoch, unit by magnitude (`flatten.infer.epoch_to_timestamp`: < 1e11 seconds,
/// < 1e14 milliseconds, < 1e17 microseconds), exact in i128; None from 1e17 on (nanoseconds: Python divides
/// as a float there, so Python decides).
pub fn epoch_int_us(v: i128) -> Option<i64> {
    let a = v.unsigned_abs();
    let us = if a < 100_000_000_000 {
        v * 1_000_000
    } else if a < 100_000_000_000_000 {
        v * 1_000
    } else if a < 100_000_000_000_000_000 {
        v
    } else {
        return None;
    };
    i64::try_from(us).ok() // |us| < 1e17
}

/// The same for a float epoch: Python's `v * 1_000_000` / `v * 1_000` / `v` (f64 arithmetic) truncated toward
/// zero like `int()`; None for non-finite values and from 1e17 on (Python decides).
pub fn epoch_float_us(v: f64) -> Option<i64> {
    if !v.is_finite() {
        return None;
    }
    let a = v.abs();
    let us = if a < 1e11 {
        v * 1_000_000.0
    } else if a < 1e14 {
        v * 1_000.0
    } else if a < 1e17 {
        v
    } else {
        return None;
    };
    // |us| <= 1e17 (a product may round up to it): exactly representable in i64 after truncation
    Some(us.trunc() as i64)
}
