//! The compact pieces an org's index row is made of, so that a card costs ~200 bytes of API
//! memory (issue 19: it cost ~1,300 as a decoded record reduced to owned strings):
//! - `CardId`: a MongoDB ObjectId (24 lowercase hex digits) in 12 bytes, anything else boxed,
//!   ordered exactly as its text (the board order's tie-break);
//! - `Names`: people, stages and sources interned per org (a card holds `u32`s);
//! - `Arena`: every card's search texts (and, in others, message times and people) in one
//!   growing buffer, a card holding a span of it; texts contained in another of the card's
//!   texts are dropped (a first name inside the full name finds nothing the full name does not).
//!
//! Pure; `mod.rs` builds rows of them and accounts their bytes.
use hashbrown::{DefaultHashBuilder, HashTable};
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::hash::BuildHasher;

/// A card's id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CardId {
    /// 24 lowercase hex digits as 12 bytes.
    Hex([u8; 12]),
    Text(Box<str>),
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl CardId {
    pub fn new(id: &str) -> CardId {
        let b = id.as_bytes();
        if b.len() == 24 && b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
            let nibble = |c: u8| if c <= b'9' { c - b'0' } else { c - b'a' + 10 };
            let mut out = [0u8; 12];
            for (i, o) in out.iter_mut().enumerate() {
                *o = nibble(b[2 * i]) << 4 | nibble(b[2 * i + 1]);
            }
            CardId::Hex(out)
        } else {
            CardId::Text(id.into())
        }
    }

    /// Calls `f` with the id's text (rendered on the stack for a packed id).
    pub fn with_str<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        match self {
            CardId::Text(s) => f(s),
            CardId::Hex(bytes) => {
                let mut text = [0u8; 24];
                for (i, b) in bytes.iter().enumerate() {
                    text[2 * i] = HEX[(b >> 4) as usize];
                    text[2 * i + 1] = HEX[(b & 15) as usize];
                }
                f(std::str::from_utf8(&text).expect("hex digits are ASCII"))
            }
        }
    }

    pub fn to_text(&self) -> String {
        self.with_str(str::to_string)
    }

    /// Heap bytes beyond the value itself.
    pub fn heap_bytes(&self) -> usize {
        match self {
            CardId::Hex(_) => 0,
            CardId::Text(s) => s.len(),
        }
    }
}

impl Ord for CardId {
    /// As their texts compare: two packed ids byte by byte (hex digits sort as their nibbles).
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (CardId::Hex(a), CardId::Hex(b)) => a.cmp(b),
            (CardId::Text(a), CardId::Text(b)) => a.cmp(b),
            _ => self.with_str(|a| other.with_str(|b| a.cmp(b))),
        }
    }
}

impl PartialOrd for CardId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// One org's distinct names (user ids, stage keys, sources) as small numbers. Each name is held
/// once (the table of numbers finds a name's number by hashing the name it points at: a small
/// org's names were a third of its index when held twice). Stored (an index image) as the names
/// alone; the numbers are their places.
#[derive(Debug, Default, Deserialize)]
#[serde(from = "Vec<Box<str>>")]
pub struct Names {
    number: HashTable<u32>,
    hasher: DefaultHashBuilder,
    names: Vec<Box<str>>,
}

impl Names {
    pub fn intern(&mut self, name: &str) -> u32 {
        if let Some(n) = self.get(name) {
            return n;
        }
        let n = self.names.len() as u32;
        self.names.push(name.into());
        self.insert_number(n);
        n
    }

    pub fn get(&self, name: &str) -> Option<u32> {
        let names = &self.names;
        self.number.find(self.hasher.hash_one(name), |n| &*names[*n as usize] == name).copied()
    }

    /// `n` is in `names` already.
    fn insert_number(&mut self, n: u32) {
        let (names, hasher) = (&self.names, &self.hasher);
        let hash = hasher.hash_one(&*names[n as usize]);
        self.number.insert_unique(hash, n, |x| hasher.hash_one(&*names[*x as usize]));
    }

    pub fn heap_bytes(&self) -> usize {
        let text: usize = self.names.iter().map(|n| n.len()).sum();
        text + self.names.capacity() * 16 + self.number.capacity() * (4 + 1)
    }
}

impl From<Vec<Box<str>>> for Names {
    fn from(names: Vec<Box<str>>) -> Names {
        let count = names.len();
        let mut out = Names { number: HashTable::with_capacity(count), hasher: DefaultHashBuilder::default(), names };
        for n in 0..count {
            out.insert_number(n as u32);
        }
        out
    }
}

impl Serialize for Names {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.names.serialize(s)
    }
}

/// Where one card's values lie in an `Arena`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Span {
    at: u32,
    len: u32,
}

/// Every card's values of one sort (search texts, message times, people) in one buffer, a card
/// holding a span of it: no allocation, no pointer and no capacity per card. A card that
/// changes or goes leaves its old span behind; the buffer is compacted (by the index, which
/// knows the live spans) when more than half of it is such garbage.
#[derive(Debug, Serialize, Deserialize)]
pub struct Arena<T> {
    items: Vec<T>,
    garbage: usize,
}

impl<T> Default for Arena<T> {
    fn default() -> Self {
        Arena { items: Vec::new(), garbage: 0 }
    }
}

impl<T: Copy> Arena<T> {
    /// Appends a card's values. An arena holds at most `u32::MAX` values: an org with more is
    /// far over any index budget, and what does not fit is stored empty (the worst case is a
    /// filter that misses, never a panic).
    pub fn push(&mut self, values: impl IntoIterator<Item = T>) -> Span {
        let at = self.items.len();
        self.items.extend(values);
        if self.items.len() > u32::MAX as usize {
            self.items.truncate(at);
            return Span::default();
        }
        Span { at: at as u32, len: (self.items.len() - at) as u32 }
    }

    pub fn get(&self, span: Span) -> &[T] {
        &self.items[span.at as usize..(span.at + span.len) as usize]
    }

    pub fn release(&mut self, span: Span) {
        self.garbage += span.len as usize;
    }

    pub fn wants_compaction(&self) -> bool {
        self.garbage > 4096 && self.garbage * 2 > self.items.len()
    }

    /// A new arena holding only `live` spans, which are rewritten to their new places.
    pub fn compact<'a>(&self, live: impl Iterator<Item = &'a mut Span>) -> Arena<T> {
        let mut out = Arena { items: Vec::with_capacity(self.items.len() - self.garbage), garbage: 0 };
        for span in live {
            let at = out.items.len() as u32;
            out.items.extend_from_slice(self.get(*span));
            span.at = at;
        }
        out
    }

    pub fn shrink(&mut self) {
        self.items.shrink_to_fit();
    }

    pub fn heap_bytes(&self) -> usize {
        self.items.capacity() * std::mem::size_of::<T>()
    }
}

/// Keeps, of `texts`, those not contained in another kept one (longest first; equal texts once).
pub fn distinct_texts(mut texts: Vec<String>) -> Vec<String> {
    texts.sort_by_key(|t| std::cmp::Reverse(t.len()));
    let mut kept: Vec<String> = Vec::with_capacity(texts.len());
    for t in texts {
        if !kept.iter().any(|k| k.contains(t.as_str())) {
            kept.push(t);
        }
    }
    kept
}

/// A card's search texts as arena bytes: each text prefixed by its length (LEB128).
pub fn encode_texts<'a>(texts: impl IntoIterator<Item = &'a str>) -> Vec<u8> {
    let mut out = Vec::new();
    for t in texts {
        let mut n = t.len();
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            out.push(if n > 0 { byte | 0x80 } else { byte });
            if n == 0 {
                break;
            }
        }
        out.extend_from_slice(t.as_bytes());
    }
    out
}

/// The texts `encode_texts` wrote.
pub fn decode_texts(mut rest: &[u8]) -> impl Iterator<Item = &str> {
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (mut n, mut shift, mut used) = (0usize, 0, 0);
        for b in rest {
            n |= ((b & 0x7f) as usize) << shift;
            shift += 7;
            used += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        let (text, tail) = rest[used..].split_at(n.min(rest.len() - used));
        rest = tail;
        // Written from `&str`s whole: valid UTF-8.
        Some(std::str::from_utf8(text).unwrap_or_default())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn object_ids_pack_and_others_stay_text() {
        let id = "65f1a2b3c4d5e6f708192a3b";
        assert!(matches!(CardId::new(id), CardId::Hex(_)));
        assert_eq!(CardId::new(id).to_text(), id);
        for other in ["65F1A2B3C4D5E6F708192A3B", "c1", "65f1a2b3c4d5e6f708192a3", ""] {
            assert!(matches!(CardId::new(other), CardId::Text(_)), "{other}");
            assert_eq!(CardId::new(other).to_text(), other);
        }
    }

    #[test]
    fn contained_texts_are_dropped() {
        let kept = distinct_texts(vec!["JANE".into(), "DOE".into(), "JANE DOE".into(), "+49 171".into(), "JANE".into()]);
        assert_eq!(kept, ["JANE DOE", "+49 171"]);
    }

    #[test]
    fn the_arena_gives_back_each_text_and_compacts() {
        let mut arena = Arena::default();
        let long = "x".repeat(300);
        let a = arena.push(encode_texts(["JANE DOE", "", long.as_str()]));
        let b = arena.push(encode_texts(["ZOË"]));
        assert_eq!(decode_texts(arena.get(a)).collect::<Vec<_>>(), ["JANE DOE", "", long.as_str()]);
        arena.release(a);
        let mut live = [b];
        let compacted = arena.compact(live.iter_mut());
        assert_eq!(decode_texts(compacted.get(live[0])).collect::<Vec<_>>(), ["ZOË"]);
        assert_eq!(compacted.heap_bytes(), "ZOË".len() + 1);
    }

    proptest! {
        #[test]
        fn ids_order_as_their_texts(a in "[0-9a-f]{24}|[0-9a-z]{0,26}", b in "[0-9a-f]{24}|[0-9a-z]{0,26}") {
            prop_assert_eq!(CardId::new(&a).cmp(&CardId::new(&b)), a.cmp(&b));
            prop_assert_eq!(CardId::new(&a) == CardId::new(&b), a == b);
        }
    }
}
