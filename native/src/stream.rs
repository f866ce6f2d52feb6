//! The streaming path: parse + mask + envelope + flatten in one pass over the payload.
//!
//! Objects are walked straight off the payload (no tree is built for them); scalars are
//! read and written at once; arrays and depth-capped values are read into a [`V`] and go
//! through the tree path's own `value()` (so arrays, child rows, masking policies and JSON
//! columns share one implementation). Whatever this pass cannot decide with certainty
//! makes it give up (`None`), and the caller runs the tree path (`NativeFlattener::flatten`)
//! on the same payload, which produces exactly what Python produces or declines:
//!
//! * duplicate keys, or keys whose normalised names collide in one object (the tree path
//!   resolves those over the whole object);
//! * an envelope field (event id, user id, event time) that is missing, not a scalar,
//!   not on a path of object keys, or not yet seen when the first array arrives (child
//!   rows carry the event id and event time);
//! * anything the parser rejects, and any Python callback error.
//!
//! Giving up never counts as a decline: the tree path counts what it does.

use super::*;
use crate::json::Parser;

/// One site's cached name for a raw key: normalised segment, its hash, column name.
pub(crate) struct KeyName {
    raw: Box<str>,
    seg: Rc<str>,
    seg_hash: u64,
    name: Box<str>,
    /// the nested-object site under this key (`sub`), once seen
    sub: Option<usize>,
    /// the child table and its site for an array of objects under this key (`array_site`), once seen
    arr: Option<(Rc<str>, usize)>,
}

struct SCtx<'p> {
    eid: Option<String>,
    uid: Option<String>,
    us: Option<i64>,
    et: String,
    /// envelope paths (id, user, time) split on '.', when they are to be found in the payload
    parts: [Vec<&'p str>; 3],
    rows: Vec<Option<OutRow>>,
    /// (segment hash, keynames index) of the kept keys of the objects being walked (collision checks)
    seen: Vec<(u64, usize)>,
    /// envelope fields read so far (bits: id, user, time)
    found: u8,
    /// scratch: the current column name (copied out of the site cache, which `self` owns)
    name: String,
}

const MAX_KEYNAMES: usize = 4096;

impl NativeFlattener {
    /// Rows of one payload, or None (use the tree path). `known`: the envelope given by the caller
    /// (`process`); else `paths` are looked up in the payload (`process_event`).
    pub(crate) fn stream(
        &mut self,
        py: Python<'_>,
        payload: &[u8],
        known: Option<(&str, &str, i64)>,
        paths: (&str, &str, &str),
        mask: bool,
    ) -> Option<(String, String, i64, Vec<OutRow>)> {
        let mut p = Parser::new(payload)?;
        if p.peek()? != b'{' {
            return None;
        }
        if self.trim_due {
            self.trim_keynames();
        }
        let mut c = SCtx {
            eid: None,
            uid: None,
            us: None,
            et: String::new(),
            parts: [Vec::new(), Vec::new(), Vec::new()],
            rows: Vec::with_capacity(16),
            seen: Vec::with_capacity(64),
            name: String::new(),
            found: 0,
        };
        let live = match known {
            Some((e, u, us)) => {
                c.eid = Some(e.to_owned());
                c.uid = Some(u.to_owned());
                c.et = self.event_time(us).ok()?;
                c.us = Some(us);
                0
            }
            None => {
                c.parts = [paths.0.split('.').collect(), paths.1.split('.').collect(), paths.2.split('.').collect()];
                0b111
            }
        };
        c.rows.push(None);
        let root = if mask { self.matcher.start() } else { None };
        let mut body = OutRow { table: Rc::from(""), row_id: String::new(), cols: self.buf(), types: self.buf(), n: 0 };
        self.s_obj(py, &mut p, 0, &mut body, None, &mut c, root, live, 0)?;
        if !p.at_end() {
            return None;
        }
        let (eid, uid, us) = (c.eid?, c.uid?, c.us?);
        let mut main = OutRow { table: body.table.clone(), row_id: eid.clone(), cols: self.buf(), types: self.buf(), n: 0 };
        main.cols.push(b'{');
        main.types.push(b'{');
        main.key("_event_id", "STRING");
        write_str(&mut main.cols, &eid);
        main.key("_user_id", "STRING");
        write_str(&mut main.cols, &uid);
        main.key("_event_time", "TIMESTAMP");
        write_str(&mut main.cols, &c.et);
        if body.n > 0 {
            main.cols.push(b',');
            main.types.push(b',');
            main.cols.extend_from_slice(&body.cols);
            main.types.extend_from_slice(&body.types);
            main.n += body.n;
        }
        if main.n > MAX_COLUMNS {
            return None;
        }
        main.cols.push(b'}');
        main.types.push(b'}');
        self.recycle(body);
        c.rows[0] = Some(main);
        let rows = c.rows.into_iter().collect::<Option<Vec<_>>>()?;
        self.streamed_events += 1;
        Some((eid, uid, us, rows))
    }

    /// The cached normalised segment / column name of the `pos`-th `key` of an object at `site`
    /// (index into `site.keynames`). Objects at one site mostly repeat their keys in order, so the
    /// key seen at this position last time is tried first (no hashing), then the site's index.
    fn key_name(&mut self, py: Python<'_>, site: usize, pos: usize, key: &str) -> Option<usize> {
        let s = &mut self.sites[site];
        if let Some(&i) = s.order.get(pos) {
            if *s.keynames[i].raw == *key {
                return Some(i);
            }
        }
        let i = match s.keyindex.get(key) {
            Some(&i) => i,
            None => {
                let seg = self.normalize(py, key).ok()?;
                let s = &mut self.sites[site];
                let name: Box<str> = Box::from(join_name(&s.prefix, &seg));
                let mut h = FxHasher::default();
                h.write(seg.as_bytes());
                s.keynames.push(KeyName { raw: Box::from(key), seg_hash: h.finish(), seg, name, sub: None, arr: None });
                s.keyindex.insert(Box::from(key), s.keynames.len() - 1);
                self.trim_due |= s.keynames.len() >= MAX_KEYNAMES;
                s.keynames.len() - 1
            }
        };
        let s = &mut self.sites[site];
        s.order.truncate(pos);
        if s.order.len() == pos {
            s.order.push(i);
        }
        Some(i)
    }

    /// Bounded caches: trimmed between events only (indices into them live for one event).
    fn trim_keynames(&mut self) {
        self.trim_due = false;
        for s in &mut self.sites {
            if s.keynames.len() >= MAX_KEYNAMES {
                s.keynames.clear();
                s.keyindex.clear();
                s.order.clear();
            }
        }
    }

    /// At a `{`: walk the object's members into `row`. `row_id` None = the main row (id: the event id).
    #[allow(clippy::too_many_arguments)]
    fn s_obj<'a>(
        &mut self,
        py: Python<'_>,
        p: &mut Parser<'a>,
        site: usize,
        row: &mut OutRow,
        row_id: Option<&str>,
        c: &mut SCtx,
        mask: Option<u32>,
        live: u8,
        d: usize,
    ) -> Option<()> {
        let base = c.seen.len();
        if p.open(b'}')? {
            let mut pos = 0;
            loop {
                let key = p.member_key()?;
                self.s_member(py, p, &key, pos, site, row, row_id, c, mask, live, d, base)?;
                pos += 1;
                if !p.next_or_close(b'}')? {
                    break;
                }
            }
        }
        p.depth -= 1;
        c.seen.truncate(base);
        Some(())
    }

    /// One `key: value` of an object at `site` (the parser is at the value).
    #[allow(clippy::too_many_arguments)]
    fn s_member<'a>(
        &mut self,
        py: Python<'_>,
        p: &mut Parser<'a>,
        key: &str,
        pos: usize,
        site: usize,
        row: &mut OutRow,
        row_id: Option<&str>,
        c: &mut SCtx,
        mask: Option<u32>,
        live: u8,
        d: usize,
        base: usize,
    ) -> Option<()> {
        let ki = self.key_name(py, site, pos, key)?;
        // envelope paths through this key: `full` ends here, `clive` continues below
        let (mut full, mut clive) = (0u8, 0u8);
        let live = live & !c.found; // a field already read cannot match again (a second one is a duplicate key)
        if live != 0 {
            for j in 0..3 {
                if live & (1 << j) != 0 {
                    let pj = &c.parts[j];
                    if pj[d] == key {
                        if d + 1 == pj.len() {
                            full |= 1 << j;
                        } else {
                            clive |= 1 << j;
                        }
                    }
                }
            }
        }
        // masking: the matcher state after this key (Masker._step), and the policy for its value
        let hit = match mask {
            Some(st) => {
                let seg = self.sites[site].keynames[ki].seg.clone();
                self.matcher.step(st, &seg)
            }
            None => None,
        };
        let b = p.peek()?;
        let pol = hit.and_then(|h| self.mask_pol(h, b == b'['));
        if b == b'{' && pol.is_none() && full == 0 && !self.sites[site].deep {
            self.s_seen(site, ki, c, base)?;
            let sub = match self.sites[site].keynames[ki].sub {
                Some(sub) => sub,
                None => {
                    let mut name = std::mem::take(&mut c.name);
                    name.clear();
                    name.push_str(&self.sites[site].keynames[ki].name);
                    let sub = self.sub(site, &name);
                    c.name = name;
                    self.sites[site].keynames[ki].sub = Some(sub);
                    sub
                }
            };
            return self.s_obj(py, p, sub, row, row_id, c, hit, clive, d + 1);
        }
        if b == b'[' && pol.is_none() && full == 0 && !self.sites[site].deep && c.eid.is_some() && c.us.is_some() {
            // elements are matched in the list's own state (lists are transparent); a policy on the elements
            // themselves (which may drop some and shift the indices) is left to the tree path
            let at = p.i;
            p.i += 1;
            p.ws();
            let objects = p.peek()? == b'{';
            p.i = at;
            if objects && hit.and_then(|h| self.matcher.any(h)).is_none() {
                self.s_seen(site, ki, c, base)?;
                return self.s_objects(py, p, site, ki, row_id, c, hit, d);
            }
        }
        let mut v = match b {
            b'"' => V::Str(p.string()?),
            b'-' | b'0'..=b'9' => p.number()?,
            _ => p.value()?,
        };
        if let Some(n) = pol {
            match self.policy(py, n, &v).ok()? {
                Masked::Keep => {}
                Masked::Drop => return Some(()),
                Masked::Set(nv) => v = nv,
            }
        } else if let (Some(h), true) = (hit, matches!(v, V::Obj(_) | V::Arr(_))) {
            if self.apply(py, &mut v, h, d).ok()? {
                return Some(()); // dropped
            }
        }
        self.s_seen(site, ki, c, base)?;
        if full != 0 {
            self.s_envelope(full, &v, c)?;
        }
        if matches!(&v, V::Arr(a) if !a.is_empty()) && (c.eid.is_none() || c.us.is_none()) {
            return None; // child rows need the event id and time
        }
        let mut name = std::mem::take(&mut c.name);
        name.clear();
        name.push_str(&self.sites[site].keynames[ki].name);
        let rows = std::mem::take(&mut c.rows);
        let eid = c.eid.as_deref().unwrap_or("");
        let mut ctx = Ctx { event_id: eid, et: &c.et, rows };
        self.value(py, &name, &v, site, row, row_id.unwrap_or(eid), &mut ctx).ok()?;
        c.rows = ctx.rows;
        c.name = name;
        Some(())
    }

    /// At a `[` whose first element is an object: one child row per element, streamed (the tree path's
    /// `array` + `child_rows` for an array of objects). Nulls are skipped (their index counts); any other
    /// element means a mixed array, which the tree path decides.
    #[allow(clippy::too_many_arguments)]
    fn s_objects<'a>(
        &mut self,
        py: Python<'_>,
        p: &mut Parser<'a>,
        site: usize,
        ki: usize,
        row_id: Option<&str>,
        c: &mut SCtx,
        el: Option<u32>,
        d: usize,
    ) -> Option<()> {
        if !p.open(b']')? {
            return None; // (the caller saw an object first)
        }
        let (child, es) = match &self.sites[site].keynames[ki].arr {
            Some((child, es)) => (child.clone(), *es),
            None => {
                let name: String = self.sites[site].keynames[ki].name.to_string();
                let x = self.array_site(site, &name);
                self.sites[site].keynames[ki].arr = Some(x.clone());
                x
            }
        };
        let (eid, et) = (c.eid.clone()?, c.et.clone());
        let parent = row_id.unwrap_or(&eid);
        let h0 = child_hasher(&eid, parent, &child);
        let mut i = 0;
        loop {
            match p.peek()? {
                b'{' => {
                    let mut r = self.child_row(&h0, i, &child, parent, &eid, &et);
                    let slot = c.rows.len();
                    c.rows.push(None);
                    let rid = std::mem::take(&mut r.row_id);
                    self.s_obj(py, p, es, &mut r, Some(&rid), c, el, 0, d + 2)?;
                    r.row_id = rid;
                    if r.n > MAX_COLUMNS {
                        return None;
                    }
                    r.cols.push(b'}');
                    r.types.push(b'}');
                    c.rows[slot] = Some(r);
                }
                b'n' => p.null()?,
                _ => return None,
            }
            i += 1;
            if !p.next_or_close(b']')? {
                break;
            }
        }
        p.depth -= 1;
        Some(())
    }

    /// Collision check of a kept key against the other kept keys of its object (`c.seen[base..]`, all at
    /// `site`); None = a duplicate key or a normalised-name collision.
    fn s_seen(&self, site: usize, ki: usize, c: &mut SCtx, base: usize) -> Option<()> {
        let names = &self.sites[site].keynames;
        let k = &names[ki];
        if c.seen[base..].iter().any(|&(h, j)| h == k.seg_hash && (j == ki || *names[j].seg == *k.seg)) {
            return None;
        }
        c.seen.push((k.seg_hash, ki));
        Some(())
    }

    /// Record envelope fields (`full`: bits id, user, time) from their (masked) value.
    fn s_envelope(&mut self, full: u8, v: &V, c: &mut SCtx) -> Option<()> {
        c.found |= full;
        let us = envelope_fields(full, v, &mut c.eid, &mut c.uid)?;
        if let Some(us) = us {
            c.et = self.event_time(us).ok()?;
            c.us = Some(us);
        }
        Some(())
    }
}

/// The envelope fields `full` (bits: id, user, time) ends at, read from their (masked) value as
/// `process_event` reads them: ids into `eid`/`uid`; the event time (`YYYY-MM-DDTHH:MM:SS[.f]Z`, 1970..2200)
/// returned. None = not readable here (the tree path decides).
fn envelope_fields(full: u8, v: &V, eid: &mut Option<String>, uid: &mut Option<String>) -> Option<Option<i64>> {
    if full & 1 != 0 {
        *eid = Some(id_text(Some(v)).ok()?);
    }
    if full & 2 != 0 {
        *uid = Some(id_text(Some(v)).ok()?);
    }
    if full & 4 == 0 {
        return Some(None);
    }
    let V::Str(s) = v else { return None };
    let us = ts::iso_z_to_us(s)?;
    (0..7_258_118_400_000_000).contains(&us).then_some(Some(us))
}

// ------------------------------------------------------------------ the envelope, in one pass

/// What the one-pass envelope walk has found so far.
struct ECtx<'p, 'a> {
    eid: Option<String>,
    uid: Option<String>,
    us: Option<i64>,
    parts: [Vec<&'p str>; 3],
    found: u8,
    /// raw keys of the objects being walked (duplicate-key checks)
    keys: Vec<Cow<'a, str>>,
}

impl NativeFlattener {
    /// `ingest.envelope.EnvelopeParser`'s accepting path in one pass: the masked document is written while the
    /// payload is parsed (as `orjson.dumps` of `Masker.mask_doc(orjson.loads(payload))`), the envelope fields
    /// are picked up on the way, and the nesting depth is the parser's. None = use the tree version.
    pub(crate) fn stream_envelope(
        &mut self,
        py: Python<'_>,
        payload: &[u8],
        max_nesting: usize,
        paths: (&str, &str, &str),
        out: &mut Vec<u8>,
    ) -> Option<(String, String, i64)> {
        let mut p = Parser::new(payload)?;
        if p.peek()? != b'{' {
            return None;
        }
        let mut c = ECtx {
            eid: None,
            uid: None,
            us: None,
            parts: [paths.0.split('.').collect(), paths.1.split('.').collect(), paths.2.split('.').collect()],
            found: 0,
            keys: Vec::with_capacity(64),
        };
        let root = self.matcher.start();
        self.e_obj(py, &mut p, out, &mut c, root, 0b111, 0)?;
        if !p.at_end() || p.max_depth as usize > max_nesting {
            return None;
        }
        Some((c.eid?, c.uid?, c.us?))
    }

    /// At a `{`: write the masked object.
    #[allow(clippy::too_many_arguments)]
    fn e_obj<'a>(&mut self, py: Python<'_>, p: &mut Parser<'a>, out: &mut Vec<u8>, c: &mut ECtx<'_, 'a>,
                 mask: Option<u32>, live: u8, d: usize) -> Option<()> {
        out.push(b'{');
        let base = c.keys.len();
        let mut first = true;
        if p.open(b'}')? {
            loop {
                let key = p.member_key()?;
                if c.keys[base..].iter().any(|k| *k == key) {
                    return None; // a duplicate key: Python keeps the first position and the last value
                }
                let at = out.len();
                if !first {
                    out.push(b',');
                }
                write_str(out, &key);
                out.push(b':');
                if self.e_member(py, p, &key, out, c, mask, live, d)? {
                    first = false;
                } else {
                    out.truncate(at); // dropped by a masking policy
                }
                c.keys.push(key);
                if !p.next_or_close(b'}')? {
                    break;
                }
            }
        }
        out.push(b'}');
        p.depth -= 1;
        c.keys.truncate(base);
        Some(())
    }

    /// One member's (masked) value; false = dropped.
    #[allow(clippy::too_many_arguments)]
    fn e_member<'a>(&mut self, py: Python<'_>, p: &mut Parser<'a>, key: &str, out: &mut Vec<u8>,
                    c: &mut ECtx<'_, 'a>, mask: Option<u32>, live: u8, d: usize) -> Option<bool> {
        let (mut full, mut clive) = (0u8, 0u8);
        let live = live & !c.found;
        if live != 0 {
            for j in 0..3 {
                if live & (1 << j) != 0 && c.parts[j][d] == key {
                    if d + 1 == c.parts[j].len() {
                        full |= 1 << j;
                    } else {
                        clive |= 1 << j;
                    }
                }
            }
        }
        let hit = match mask {
            Some(st) => self.mask_step(py, st, key).ok()?,
            None => None,
        };
        let b = p.peek()?;
        let pol = hit.and_then(|h| self.mask_pol(h, b == b'['));
        if pol.is_none() && full == 0 {
            if b == b'{' {
                self.e_obj(py, p, out, c, hit, clive, d + 1)?;
                return Some(true);
            }
            if b == b'[' {
                self.e_arr(py, p, out, c, hit)?;
                return Some(true);
            }
        }
        let mut v = p.value()?;
        if let Some(n) = pol {
            match self.policy(py, n, &v).ok()? {
                Masked::Keep => {}
                Masked::Drop => return Some(false),
                Masked::Set(nv) => v = nv,
            }
        } else if let (Some(h), true) = (hit, matches!(v, V::Obj(_) | V::Arr(_))) {
            if self.apply(py, &mut v, h, d).ok()? {
                return Some(false);
            }
        }
        if full != 0 {
            if let Some(us) = envelope_fields(full, &v, &mut c.eid, &mut c.uid)? {
                c.us = Some(us);
            }
            c.found |= full;
        }
        write_value(out, &v, false);
        Some(true)
    }

    /// At a `[` in matcher state `hit` (Masker._mask_list: lists are transparent, every element is matched in
    /// the list's state): write the masked array.
    fn e_arr<'a>(&mut self, py: Python<'_>, p: &mut Parser<'a>, out: &mut Vec<u8>, c: &mut ECtx<'_, 'a>,
                 hit: Option<u32>) -> Option<()> {
        out.push(b'[');
        let mut first = true;
        if p.open(b']')? {
            loop {
                let at = out.len();
                if !first {
                    out.push(b',');
                }
                let b = p.peek()?;
                let pol = hit.and_then(|h| self.mask_pol(h, b == b'['));
                let kept = match (pol, b) {
                    (None, b'{') => self.e_obj(py, p, out, c, hit, 0, 0).map(|_| true)?,
                    (None, b'[') => self.e_arr(py, p, out, c, hit).map(|_| true)?,
                    (Some(n), _) => {
                        let v = p.value()?;
                        match self.policy(py, n, &v).ok()? {
                            Masked::Keep => {
                                write_value(out, &v, false);
                                true
                            }
                            Masked::Drop => false,
                            Masked::Set(nv) => {
                                write_value(out, &nv, false);
                                true
                            }
                        }
                    }
                    (None, _) => {
                        let v = p.value()?;
                        write_value(out, &v, false);
                        true
                    }
                };
                if kept {
                    first = false;
                } else {
                    out.truncate(at);
                }
                if !p.next_or_close(b']')? {
                    break;
                }
            }
        }
        out.push(b']');
        p.depth -= 1;
        Some(())
    }
}
