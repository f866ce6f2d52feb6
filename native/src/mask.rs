//! Annotation matching: a port of `flatten.mask.Masker`'s matcher (the specification is the Python one;
//! docs/flatten.md "Masking"). Built from `Masker.rules()` (public), never from Masker internals.
//!
//! An annotation is a sequence of name tokens (`None` from Python = `*`: one token, then any number more).
//! A *state* is the set of positions in the annotations reached by the name tokens of the keys walked so
//! far (lists are transparent: they do not change the state). Per state: the policy for a value that is
//! not a list (`any`: the strongest annotation ending here) and for a list as a whole (`whole`: the
//! strongest ending here that does not end in `[]`; None = look inside the list).

use rustc_hash::FxHashMap;

#[derive(Clone, PartialEq)]
enum Tok {
    Lit(Box<str>),
    Any,
    AnyStar,
}

/// (policy strength 1 tokenize .. 4 drop, keep_last)
pub(crate) type Pol = (u8, usize);

pub(crate) struct MState {
    pos: Vec<(u32, u32)>,
    pub(crate) any: Option<Pol>,
    pub(crate) whole: Option<Pol>,
    next: FxHashMap<Box<str>, Option<u32>>,
}

pub(crate) struct Matcher {
    pats: Vec<Vec<Tok>>,
    /// per annotation: (policy, keep_last, per_element)
    rules: Vec<(u8, usize, bool)>,
    states: Vec<MState>,
    index: FxHashMap<Vec<(u32, u32)>, u32>,
    start: Option<u32>,
}

/// `flatten.mask._rank`: strongest policy; among redactions the fewest characters kept.
fn rank(p: Pol) -> (u8, i64) {
    (p.0, if p.0 == 3 { -(p.1 as i64) } else { 0 })
}

impl Matcher {
    /// `rules`: `[(tokens, policy 1..4, keep_last, per_element)]`.
    pub(crate) fn new(rules: Vec<(Vec<Option<String>>, u8, usize, bool)>) -> Matcher {
        let mut m = Matcher { pats: Vec::new(), rules: Vec::new(), states: Vec::new(), index: FxHashMap::default(), start: None };
        for (toks, pol, keep, per_element) in rules {
            let mut p = Vec::new();
            for t in toks {
                match t {
                    None => {
                        p.push(Tok::Any);
                        p.push(Tok::AnyStar);
                    }
                    Some(s) => p.push(Tok::Lit(s.into_boxed_str())),
                }
            }
            m.pats.push(p);
            m.rules.push((pol, if pol == 3 { keep } else { 0 }, per_element));
        }
        if !m.pats.is_empty() {
            let init: Vec<(u32, u32)> = (0..m.pats.len() as u32).map(|r| (r, 0)).collect();
            let pos = m.closure(init);
            m.start = Some(m.state(pos));
        }
        m
    }

    /// The root state, or None when there are no annotations.
    #[inline]
    pub(crate) fn start(&self) -> Option<u32> {
        self.start
    }

    #[inline]
    pub(crate) fn any(&self, st: u32) -> Option<Pol> {
        self.states[st as usize].any
    }

    #[inline]
    pub(crate) fn whole(&self, st: u32) -> Option<Pol> {
        self.states[st as usize].whole
    }

    fn closure(&self, mut pos: Vec<(u32, u32)>) -> Vec<(u32, u32)> {
        let mut i = 0;
        while i < pos.len() {
            let (r, k) = pos[i];
            let p = &self.pats[r as usize];
            if (k as usize) < p.len() && p[k as usize] == Tok::AnyStar && !pos.contains(&(r, k + 1)) {
                pos.push((r, k + 1));
            }
            i += 1;
        }
        pos.sort_unstable();
        pos.dedup();
        pos
    }

    fn state(&mut self, pos: Vec<(u32, u32)>) -> u32 {
        if let Some(&s) = self.index.get(&pos) {
            return s;
        }
        let mut any: Option<Pol> = None;
        let mut whole: Option<Pol> = None;
        for &(r, k) in &pos {
            if k as usize == self.pats[r as usize].len() {
                let (pol, keep, per_element) = self.rules[r as usize];
                let p = (pol, keep);
                if any.is_none_or(|a| rank(p) > rank(a)) {
                    any = Some(p);
                }
                if !per_element && whole.is_none_or(|a| rank(p) > rank(a)) {
                    whole = Some(p);
                }
            }
        }
        let id = self.states.len() as u32;
        self.states.push(MState { pos: pos.clone(), any, whole, next: FxHashMap::default() });
        self.index.insert(pos, id);
        id
    }

    /// The state after a key whose normalised name (`flatten.names.normalize_key`) is `seg`
    /// (None: no annotation can match below it). `Masker._step`.
    pub(crate) fn step(&mut self, st: u32, seg: &str) -> Option<u32> {
        if let Some(&n) = self.states[st as usize].next.get(seg) {
            return n;
        }
        let mut pos = self.states[st as usize].pos.clone();
        for tok in seg.split('_') {
            let mut new = Vec::new();
            for &(r, k) in &pos {
                let p = &self.pats[r as usize];
                if (k as usize) < p.len() {
                    match &p[k as usize] {
                        Tok::Lit(t) if **t == *tok => new.push((r, k + 1)),
                        Tok::Any => new.push((r, k + 1)),
                        Tok::AnyStar => new.push((r, k)),
                        Tok::Lit(_) => {}
                    }
                }
            }
            pos = self.closure(new);
            if pos.is_empty() {
                break;
            }
        }
        let n = if pos.is_empty() { None } else { Some(self.state(pos)) };
        let next = &mut self.states[st as usize].next;
        if next.len() >= 10_000 {
            next.clear();
        }
        next.insert(Box::from(seg), n);
        n
    }
}
