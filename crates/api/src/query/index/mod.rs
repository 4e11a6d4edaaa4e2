//! The API's in-memory index of one org: answers, off Redis' thread, every board the Redis sorted
//! sets do not answer directly (search, team, several owners, assignees, unassigned, source, bulk,
//! answered, the last-message windows, and their combinations).
//!
//! Rows are card records (`record::CardRecord`) reduced to what filters look at, in compact form
//! (`compact`: packed ids, interned names, search texts in one arena: ~200 bytes a card);
//! membership filters are Roaring bitmaps over row numbers, so a filter is a few bitmap
//! operations whatever its selectivity, and search terms of 3+ characters start from trigram
//! postings (kept only for orgs of `GRAM_MIN_ROWS` cards or more: a small org's search reads its
//! few candidates' texts, and trigram postings would cost it more than its rows). What remains
//! per candidate (time ranges, the literal search check) runs over the candidates only, under a
//! deadline. Pure: `index_cache.rs` loads and follows the org's change stream.
mod compact;
mod image;

pub use image::{image_layout, ImageError};

use super::board::BoardPlan;
use super::request::{BoardQuery, MessageStatus, OwnerScope};
use board_model::card::{search_fields, trigrams, Trigram};
use board_model::keys::raw_stage_key;
use board_model::model::CardKind;
use board_model::record::{has_message_between, quiet_since, CardRecord};
use board_model::time::Millis;
use compact::{decode_texts, distinct_texts, encode_texts, Arena, CardId, Names, Span};
use hashbrown::DefaultHashBuilder as RandomState;
use hashbrown::HashTable;
use roaring::RoaringBitmap;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::mem::size_of;
use std::time::Instant;

/// Orgs of this many rows cut their trigrams on several threads.
const PARALLEL_GRAM_ROWS: usize = 50_000;

/// Trigram postings while they are built (foldhash: the build hashes tens of millions of keys).
type GramTable = hashbrown::HashMap<Trigram, RoaringBitmap>;

/// `created` of a card without `createdAt` (below every time, as `None` is below `Some`).
const NO_TIME: Millis = Millis::MIN;
/// A name number that names nothing (no stage, no source).
const NO_NAME: u32 = u32::MAX;

const BULK: u8 = 1;
const UNASSIGNED: u8 = 2;
const ANSWERED: u8 = 4;

/// Orgs with fewer cards keep no trigram postings (see the module's comment).
pub const GRAM_MIN_ROWS: usize = 2_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Row {
    id: CardId,
    created: Millis,
    /// In `OrgIndex::times`: the distinct message times, ascending.
    message_times: Span,
    /// In `OrgIndex::people`: how many people, the people's name numbers (sorted), then the
    /// assignees'; kept to take the row out of the bitmaps again.
    people: Span,
    /// In `OrgIndex::texts`: case-folded names and phone numbers (`encode_texts`).
    text: Span,
    stage: u32,
    source: u32,
    kind: CardKind,
    flags: u8,
}

impl Row {
    fn place(&self) -> Place<'_> {
        Place(Reverse((self.created, &self.id)))
    }

    fn heap_bytes(&self) -> usize {
        self.id.heap_bytes()
    }
}

/// A row's place in its column (`board_model::order::BoardPlace`, on compact fields: `created`
/// descending with `NO_TIME` last, then id descending): the smaller place comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Place<'a>(Reverse<(Millis, &'a CardId)>);

/// Why the index did not answer.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IndexError {
    #[error("the board's filters took longer than the index deadline")]
    Deadline,
}

/// Serialized as an index image (`image.rs`), without what is rebuilt from the rest (the slot
/// table) or belongs to one process (hasher, accounting).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct OrgIndex {
    /// The last change-stream entry applied (`0-0`: none).
    pub stream_id: String,
    /// The stream's `entries-added` when `stream_id` was its last entry: the entries up to it
    /// (how many follow it tells whether the stream still holds them all).
    pub stream_added: u64,
    /// The key base (org and generation) it was loaded from.
    pub base: String,
    /// Row numbers, found by their card's (kind, id).
    #[serde(skip)]
    slots: HashTable<u32>,
    /// Seeded per process (foldhash: SipHash was 1.6% of a 1M-card build).
    #[serde(skip)]
    hasher: RandomState,
    rows: Vec<Option<Row>>,
    live: usize,
    free: Vec<u32>,
    names: Names,
    texts: Arena<u8>,
    times: Arena<Millis>,
    people: Arena<u32>,
    /// (kind, stage name number) -> rows
    by_stage: HashMap<(CardKind, u32), RoaringBitmap>,
    /// The rows of each raw stage in board order (createdAt descending, then id descending): a
    /// page is read by walking it and testing the filters' bitmap, so a broad filter (team)
    /// costs about the page, not the matches.
    order: HashMap<(CardKind, u32), Vec<u32>>,
    /// While loading, `order` is appended to and sorted once at the end.
    #[serde(skip)]
    loading: bool,
    by_person: HashMap<u32, RoaringBitmap>,
    by_assignee: HashMap<u32, RoaringBitmap>,
    by_source: HashMap<u32, RoaringBitmap>,
    /// Trigram postings, kept once the org has `gram_min_rows` cards (None: not kept).
    by_gram: Option<HashMap<Trigram, RoaringBitmap>>,
    gram_min_rows: usize,
    bulk: RoaringBitmap,
    unassigned: RoaringBitmap,
    answered: RoaringBitmap,
    /// user -> teams, from the projection's users
    teams_of: HashMap<String, Vec<String>>,
    /// `bytes()` when last counted, the cards then, and the cards put since (`account`).
    #[serde(skip)]
    counted: (usize, usize),
    #[serde(skip)]
    puts_since_count: usize,
}

/// One bucket's answer: the exact total and the ids of the page, in board order.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexBucket {
    pub total: u64,
    pub ids: Vec<String>,
}

/// Which rows pass a board's bitmap filters (owner, assignees, source, bulk, trigrams, answered):
/// one bitmap or the complement of one, made once per board and shared by its buckets.
enum Passing<'a> {
    All,
    In(Cow<'a, RoaringBitmap>),
    AllBut(&'a RoaringBitmap),
}

impl<'a> Passing<'a> {
    /// The intersection of `filters`, with the message status applied.
    fn of(filters: Vec<RoaringBitmap>, status: MessageStatus, answered: &'a RoaringBitmap) -> Passing<'a> {
        let mut each = filters.into_iter();
        let both = each.next().map(|first| {
            each.fold(first, |mut all, x| {
                all &= x;
                all
            })
        });
        match (both, status) {
            (None, MessageStatus::All) => Passing::All,
            (None, MessageStatus::Answered) => Passing::In(Cow::Borrowed(answered)),
            (None, MessageStatus::Unanswered) => Passing::AllBut(answered),
            (Some(b), MessageStatus::All) => Passing::In(Cow::Owned(b)),
            (Some(mut b), MessageStatus::Answered) => {
                b &= answered;
                Passing::In(Cow::Owned(b))
            }
            (Some(mut b), MessageStatus::Unanswered) => {
                b -= answered;
                Passing::In(Cow::Owned(b))
            }
        }
    }

    fn contains(&self, row: u32) -> bool {
        match self {
            Passing::All => true,
            Passing::In(b) => b.contains(row),
            Passing::AllBut(b) => !b.contains(row),
        }
    }

    /// How many of `rows` pass.
    fn count_in(&self, rows: &RoaringBitmap) -> u64 {
        match self {
            Passing::All => rows.len(),
            Passing::In(b) => rows.intersection_len(b),
            Passing::AllBut(b) => rows.len() - rows.intersection_len(b),
        }
    }

    /// Keeps in `cand` the rows that pass.
    fn keep_in(&self, cand: &mut RoaringBitmap) {
        match self {
            Passing::All => {}
            Passing::In(b) => *cand &= b.as_ref(),
            Passing::AllBut(b) => *cand -= *b,
        }
    }
}

/// At most this many trigrams of a term are intersected (any subset finds every match; the
/// literal check removes the rest).
const MAX_GRAMS: usize = 8;

/// Puts `row` into (or takes it out of) the bitmap of `key`; an emptied bitmap goes.
fn set<K: std::hash::Hash + Eq>(map: &mut HashMap<K, RoaringBitmap>, key: K, row: u32, on: bool) {
    if on {
        map.entry(key).or_default().insert(row);
    } else if let Some(b) = map.get_mut(&key) {
        b.remove(row);
        if b.is_empty() {
            map.remove(&key);
        }
    }
}

/// The slot table's hash of a row: its card's (kind, id), as `OrgIndex::hash` computes it for a
/// lookup (the table rehashes with this when it grows or shrinks).
fn slot_hash(hasher: &RandomState, rows: &[Option<Row>], row: u32) -> u64 {
    let r = rows[row as usize].as_ref().expect("slots point at live rows");
    hasher.hash_one((r.kind, &r.id))
}

/// Bytes a bitmap holds: its containers, their arrays (u16s, at capacity, which
/// `compact_bitmaps` makes their length after a load) and bitsets (8 KiB). `statistics()` counts
/// an array's capacity as u32s and a bitset as its 65,536 bits: not used for the sizes.
fn bitmap_bytes(b: &RoaringBitmap) -> usize {
    let s = b.statistics();
    let arrays = s.n_bytes_array_containers as usize / 2;
    size_of::<RoaringBitmap>() + s.n_containers as usize * 32 + arrays + s.n_bitset_containers as usize * 8192
}

/// Bytes of a map of bitmaps: its table and the bitmaps.
fn bitmaps_bytes<K>(map: &HashMap<K, RoaringBitmap>) -> usize {
    map.capacity() * (size_of::<K>() + size_of::<RoaringBitmap>() + 1) + map.values().map(bitmap_bytes).sum::<usize>()
}

/// Re-allocates each bitmap's containers at their length (a clone is exact; growth by doubling
/// left up to half of every array container unused).
fn compact_bitmaps<K: std::hash::Hash + Eq>(map: &mut HashMap<K, RoaringBitmap>) {
    for b in map.values_mut() {
        *b = b.clone();
    }
    map.shrink_to_fit();
}

impl OrgIndex {
    pub fn new(stream_id: String) -> Self {
        OrgIndex { stream_id, gram_min_rows: GRAM_MIN_ROWS, ..Default::default() }
    }

    /// Keeps trigram postings from `rows` cards on (tests compare both ways of searching).
    pub fn with_gram_min_rows(mut self, rows: usize) -> Self {
        self.gram_min_rows = rows;
        self
    }

    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    pub fn set_users(&mut self, users: impl IntoIterator<Item = (String, Vec<String>)>) {
        self.teams_of = users.into_iter().collect();
    }

    pub fn set_user(&mut self, user: String, teams: Option<Vec<String>>) {
        match teams {
            Some(t) => self.teams_of.insert(user, t),
            None => self.teams_of.remove(&user),
        };
    }

    /// Whether the org keeps trigram postings.
    pub fn has_grams(&self) -> bool {
        self.by_gram.is_some()
    }

    fn texts_of(&self, r: &Row) -> impl Iterator<Item = &str> {
        decode_texts(self.texts.get(r.text))
    }

    /// (people, assignees) of a row, as name numbers.
    fn people_of(&self, r: &Row) -> (&[u32], &[u32]) {
        match self.people.get(r.people).split_first() {
            Some((n, rest)) => rest.split_at((*n as usize).min(rest.len())),
            None => (&[], &[]),
        }
    }

    fn row(&self, row: u32) -> &Row {
        self.rows[row as usize].as_ref().expect("bitmaps and orders hold live rows")
    }

    fn hash(&self, kind: CardKind, id: &CardId) -> u64 {
        self.hasher.hash_one((kind, id))
    }

    /// The card's row, if it has one.
    fn find_slot(&self, kind: CardKind, id: &CardId) -> Option<u32> {
        let rows = &self.rows;
        self.slots.find(self.hash(kind, id), |r| rows[*r as usize].as_ref().is_some_and(|x| x.kind == kind && x.id == *id)).copied()
    }

    /// The rows of these cards (ids the index does not hold are left out).
    fn rows_of(&self, kind: CardKind, ids: &[String]) -> RoaringBitmap {
        ids.iter().filter_map(|id| self.find_slot(kind, &CardId::new(id))).collect()
    }

    /// Takes the card's row out of the slot table; its number.
    fn take_slot(&mut self, kind: CardKind, id: &CardId) -> Option<u32> {
        let hash = self.hash(kind, id);
        let rows = &self.rows;
        let found = self.slots.find_entry(hash, |r| rows[*r as usize].as_ref().is_some_and(|x| x.kind == kind && x.id == *id));
        found.ok().map(|e| e.remove().0)
    }

    /// The slot table of the rows (an image holds none: its hashes are this process's).
    fn rebuild_slots(&mut self) {
        self.slots = HashTable::with_capacity(self.live);
        for row in 0..self.rows.len() {
            if self.rows[row].is_some() {
                self.insert_slot(row as u32);
            }
        }
    }

    fn insert_slot(&mut self, row: u32) {
        let r = self.row(row);
        let hash = self.hash(r.kind, &r.id);
        let (rows, hasher) = (&self.rows, &self.hasher);
        self.slots.insert_unique(hash, row, |x| slot_hash(hasher, rows, *x));
    }

    /// `bytes()`, counted again once a sixteenth of the cards changed since the last count, and
    /// estimated from it before (a count visits every bitmap: too slow for every catch-up).
    pub fn account(&mut self) -> usize {
        let (bytes, cards) = self.counted;
        if cards == 0 || self.puts_since_count > cards / 16 {
            self.counted = (self.bytes(), self.live);
            self.puts_since_count = 0;
            return self.counted.0;
        }
        (bytes as f64 * self.live as f64 / cards as f64) as usize
    }

    /// Puts a card's current record in (None or a tombstone: takes it out).
    pub fn put(&mut self, kind: CardKind, id: &str, rec: Option<&CardRecord>) {
        self.puts_since_count += 1;
        let card_id = CardId::new(id);
        let old = self.take_slot(kind, &card_id).map(|row| {
            let old = self.rows[row as usize].take().expect("a slot points at a row");
            self.unlink(row, &old);
            self.texts.release(old.text);
            self.times.release(old.message_times);
            self.people.release(old.people);
            self.free.push(row);
            self.live -= 1;
            (row, old)
        });
        let Some((rec, card)) = rec.and_then(|rec| Some((rec, rec.card.as_ref()?))) else {
            if let Some((row, o)) = old {
                self.order_remove(row, &o);
            }
            self.maybe_compact_arenas();
            return;
        };
        let texts = distinct_texts(search_fields(card));
        let mut people: Vec<u32> = rec.people().into_iter().map(|p| self.names.intern(p)).collect();
        people.sort_unstable();
        let assignees: Vec<u32> = rec.derived.assignees.iter().map(|a| self.names.intern(a)).collect();
        let people = std::iter::once(people.len() as u32).chain(people).chain(assignees);
        let stage = raw_stage_key(card.pipeline_id.as_deref(), card.pipeline_stage.as_deref(), card.status.as_deref());
        let r = Row {
            id: card_id,
            created: card.created_at.unwrap_or(NO_TIME),
            message_times: self.times.push(rec.derived.message_times.iter().copied()),
            people: self.people.push(people),
            text: self.texts.push(encode_texts(texts.iter().map(String::as_str))),
            stage: stage.map_or(NO_NAME, |s| self.names.intern(&s)),
            // `source` filters only the Contact board (CONTRACT.md 3).
            source: match (&card.source, kind) {
                (Some(s), CardKind::Contact) => self.names.intern(s),
                _ => NO_NAME,
            },
            kind,
            flags: (if card.is_bulk_sms == Some(true) { BULK } else { 0 })
                | (if rec.unassigned() { UNASSIGNED } else { 0 })
                | (if rec.derived.answered() { ANSWERED } else { 0 }),
        };
        let row = self.free.pop().unwrap_or_else(|| {
            self.rows.push(None);
            (self.rows.len() - 1) as u32
        });
        self.link(row, &r, true);
        // A card that keeps its row, stage and createdAt (messages, assignments) keeps its place.
        let moved = match &old {
            Some((orow, o)) => !(*orow == row && o.stage == r.stage && o.created == r.created),
            None => true,
        };
        let (stage, kind_) = (r.stage, r.kind);
        self.rows[row as usize] = Some(r);
        self.insert_slot(row);
        self.live += 1;
        if moved {
            if let Some((orow, o)) = &old {
                self.order_remove(*orow, o);
            }
            self.order_insert(row, kind_, stage);
        }
        if self.by_gram.is_none() && !self.loading && self.live >= self.gram_min_rows {
            self.build_grams();
        }
        self.maybe_compact_arenas();
    }

    fn maybe_compact_arenas(&mut self) {
        if self.texts.wants_compaction() {
            self.texts = self.texts.compact(self.rows.iter_mut().flatten().map(|r| &mut r.text));
        }
        if self.times.wants_compaction() {
            self.times = self.times.compact(self.rows.iter_mut().flatten().map(|r| &mut r.message_times));
        }
        if self.people.wants_compaction() {
            self.people = self.people.compact(self.rows.iter_mut().flatten().map(|r| &mut r.people));
        }
    }

    /// `row` is in `rows` already.
    fn order_insert(&mut self, row: u32, kind: CardKind, stage: u32) {
        if stage == NO_NAME {
            return;
        }
        let mut list = self.order.remove(&(kind, stage)).unwrap_or_default();
        if self.loading {
            list.push(row);
        } else {
            let place = self.row(row).place();
            let at = list.partition_point(|x| self.row(*x).place() < place);
            list.insert(at, row);
        }
        self.order.insert((kind, stage), list);
    }

    /// `r` is the row's old content (already taken out of `rows`).
    fn order_remove(&mut self, row: u32, r: &Row) {
        if r.stage == NO_NAME {
            return;
        }
        let Some(mut list) = self.order.remove(&(r.kind, r.stage)) else { return };
        if self.loading {
            list.retain(|x| *x != row);
        } else {
            // The rows before it in board order. Its own row number is skipped: it is empty (a
            // delete) or already holds the card's new content (an update reuses the number).
            let place = r.place();
            let at = list.partition_point(|x| *x != row && self.row(*x).place() < place);
            if let Some(i) = list[at..].iter().position(|x| *x == row) {
                list.remove(at + i);
            }
        }
        if !list.is_empty() {
            self.order.insert((r.kind, r.stage), list);
        }
    }

    /// Starts a bulk load of about `cards` cards: `put` appends to the stage orders,
    /// `finish_load` sorts them once. The rows and their slots are made that large at once (grown
    /// by doubling, a million cards' rows were copied into fresh memory again and again).
    pub fn start_load(&mut self, cards: usize) {
        self.loading = true;
        self.rows.reserve(cards);
        let (rows, hasher) = (&self.rows, &self.hasher);
        self.slots.reserve(cards, |x| slot_hash(hasher, rows, *x));
    }

    pub fn finish_load(&mut self) {
        self.loading = false;
        let mut order = std::mem::take(&mut self.order);
        for list in order.values_mut() {
            list.sort_unstable_by(|a, b| self.row(*a).place().cmp(&self.row(*b).place()));
            list.shrink_to_fit();
        }
        order.shrink_to_fit();
        self.order = order;
        if self.live >= self.gram_min_rows {
            self.build_grams();
        }
        compact_bitmaps(&mut self.by_stage);
        compact_bitmaps(&mut self.by_person);
        compact_bitmaps(&mut self.by_assignee);
        compact_bitmaps(&mut self.by_source);
        if let Some(g) = &mut self.by_gram {
            compact_bitmaps(g);
        }
        for b in [&mut self.bulk, &mut self.unassigned, &mut self.answered] {
            *b = b.clone();
        }
        self.rows.shrink_to_fit();
        self.free.shrink_to_fit();
        let (rows, hasher) = (&self.rows, &self.hasher);
        self.slots.shrink_to_fit(|x| slot_hash(hasher, rows, *x));
        self.texts.shrink();
        self.times.shrink();
        self.people.shrink();
    }

    /// Trigram postings of every row (an org reached `GRAM_MIN_ROWS`).
    fn build_grams(&mut self) {
        // Tens of millions of (trigram, row) pairs at a million cards (a third of a cold load).
        // Each worker takes one range of rows and appends them in ascending order (`push`) to
        // bitmaps in a table with a fast hasher; the ranges' bitmaps are then OR-ed together.
        // Threads only where they pay (an org reaching `GRAM_MIN_ROWS` on a catch-up cuts its
        // trigrams inline).
        let workers = match self.rows.len() {
            0..PARALLEL_GRAM_ROWS => 1,
            _ => std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4),
        };
        let grams = if workers == 1 { self.grams_of_rows(0, self.rows.len()) } else { self.grams_in_parallel(workers) };
        self.by_gram = Some(grams.into_iter().collect());
    }

    /// The trigram postings of every row, `workers` ranges of rows at once.
    fn grams_in_parallel(&self, workers: usize) -> GramTable {
        let per_worker = self.rows.len().div_ceil(workers);
        let mut parts: Vec<GramTable> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|w| scope.spawn(move || self.grams_of_rows(w * per_worker, ((w + 1) * per_worker).min(self.rows.len()))))
                .collect();
            handles.into_iter().map(|h| h.join().expect("a gram worker does not panic")).collect()
        });
        let mut grams = parts.remove(0);
        for part in parts {
            for (g, rows) in part {
                *grams.entry(g).or_default() |= rows;
            }
        }
        grams
    }

    /// The trigram postings of rows `from..to`.
    fn grams_of_rows(&self, from: usize, to: usize) -> GramTable {
        let mut grams = GramTable::new();
        for row in from..to {
            if let Some(r) = &self.rows[row] {
                for g in trigrams(self.texts_of(r)) {
                    grams.entry(g).or_default().push(row as u32);
                }
            }
        }
        grams
    }

    fn unlink(&mut self, row: u32, r: &Row) {
        self.link(row, r, false)
    }

    fn link(&mut self, row: u32, r: &Row, on: bool) {
        if r.stage != NO_NAME {
            set(&mut self.by_stage, (r.kind, r.stage), row, on);
        }
        let (people, assignees) = self.people_of(r);
        let (people, assignees) = (people.to_vec(), assignees.to_vec());
        for p in people {
            set(&mut self.by_person, p, row, on);
        }
        for a in assignees {
            set(&mut self.by_assignee, a, row, on);
        }
        if r.source != NO_NAME {
            set(&mut self.by_source, r.source, row, on);
        }
        let grams = if self.by_gram.is_some() { trigrams(self.texts_of(r)) } else { Vec::new() };
        if let Some(by_gram) = &mut self.by_gram {
            for g in grams {
                set(by_gram, g, row, on);
            }
        }
        for (flag, bitmap) in [(BULK, &mut self.bulk), (UNASSIGNED, &mut self.unassigned), (ANSWERED, &mut self.answered)] {
            if r.flags & flag != 0 {
                if on {
                    bitmap.insert(row);
                } else {
                    bitmap.remove(row);
                }
            }
        }
    }

    /// The API memory this index holds, in bytes: what its rows, tables, texts and bitmaps
    /// allocated (the allocator's own overhead aside). Checked against a counting allocator in
    /// `tests/index_memory.rs`.
    pub fn bytes(&self) -> usize {
        self.bytes_by_part().iter().map(|(_, n)| n).sum()
    }

    /// `bytes`, by part (logged when an org is loaded).
    pub fn bytes_by_part(&self) -> [(&'static str, usize); 7] {
        let rows = self.rows.capacity() * size_of::<Option<Row>>()
            + self.rows.iter().flatten().map(Row::heap_bytes).sum::<usize>()
            + self.slots.capacity() * (size_of::<u32>() + 1)
            + self.free.capacity() * 4;
        let orders = self.order.capacity() * (size_of::<(CardKind, u32)>() + size_of::<Vec<u32>>() + 1)
            + self.order.values().map(|l| l.capacity() * 4).sum::<usize>();
        let teams: usize = self.teams_of.iter().map(|(u, ts)| 64 + u.len() + ts.iter().map(|t| 24 + t.len()).sum::<usize>()).sum();
        let filters = bitmaps_bytes(&self.by_stage)
            + bitmaps_bytes(&self.by_person)
            + bitmaps_bytes(&self.by_assignee)
            + bitmaps_bytes(&self.by_source)
            + [&self.bulk, &self.unassigned, &self.answered].into_iter().map(bitmap_bytes).sum::<usize>();
        [
            ("rows", size_of::<OrgIndex>() + rows),
            ("texts", self.texts.heap_bytes()),
            ("times and people", self.times.heap_bytes() + self.people.heap_bytes()),
            ("names", self.names.heap_bytes() + teams),
            ("orders", orders),
            ("filters", filters),
            ("trigrams", self.by_gram.as_ref().map_or(0, bitmaps_bytes)),
        ]
    }

    fn union_of<'a>(&self, map: &HashMap<u32, RoaringBitmap>, keys: impl IntoIterator<Item = &'a str>) -> RoaringBitmap {
        let mut out = RoaringBitmap::new();
        for k in keys {
            if let Some(b) = self.names.get(k).and_then(|n| map.get(&n)) {
                out |= b;
            }
        }
        out
    }

    /// The members of the caller's teams (`ownerFilter: team`).
    fn team_members(&self, user: &str) -> BTreeSet<&str> {
        let Some(teams) = self.teams_of.get(user) else { return BTreeSet::new() };
        self.teams_of.iter().filter(|(_, ts)| ts.iter().any(|t| teams.contains(t))).map(|(u, _)| u.as_str()).collect()
    }

    /// The stages' name numbers (a stage no card ever named has none).
    fn stage_numbers(&self, raw_keys: &[String]) -> Vec<u32> {
        raw_keys.iter().filter_map(|k| self.names.get(k)).collect()
    }

    /// The ids of ranks [offset, offset + limit) among the rows of `stages` that pass, in board
    /// order: a merge of the stages' ordered lists that skips rows that do not pass.
    fn walk(
        &self,
        kind: CardKind,
        stages: &[u32],
        cand: &Passing<'_>,
        offset: usize,
        limit: usize,
        deadline: Instant,
    ) -> Result<Vec<String>, IndexError> {
        let lists: Vec<&[u32]> = stages.iter().filter_map(|s| self.order.get(&(kind, *s)).map(Vec::as_slice)).collect();
        let mut at = vec![0usize; lists.len()];
        let (mut seen, mut out, mut steps) = (0usize, Vec::with_capacity(limit), 0usize);
        while out.len() < limit {
            // Advance each list to its next row in `cand`, then take the first in board order.
            let mut best: Option<usize> = None;
            for (i, list) in lists.iter().enumerate() {
                while at[i] < list.len() && !cand.contains(list[at[i]]) {
                    at[i] += 1;
                    steps += 1;
                    if steps % 4096 == 0 && Instant::now() >= deadline {
                        return Err(IndexError::Deadline);
                    }
                }
                if at[i] < list.len() && best.is_none_or(|b| self.row(list[at[i]]).place() < self.row(lists[b][at[b]]).place()) {
                    best = Some(i);
                }
            }
            let Some(b) = best else { break };
            let row = lists[b][at[b]];
            at[b] += 1;
            if seen >= offset {
                out.push(self.row(row).id.to_text());
            }
            seen += 1;
        }
        Ok(out)
    }

    /// Answers every bucket of `plan`. `user` is the caller; `now` anchors the quiet window.
    /// `among`: only these cards may match (the ids MongoDB found for the request's custom
    /// fields, which the index does not hold); the request's other filters apply as always.
    pub fn answer(
        &self,
        plan: &BoardPlan,
        q: &BoardQuery,
        (user, now): (&str, Millis),
        among: Option<&[String]>,
        deadline: Instant,
    ) -> Result<Vec<IndexBucket>, IndexError> {
        let f = &q.filters;
        // Everything that is one bitmap operation, shared by every bucket.
        let mut filters: Vec<RoaringBitmap> = Vec::new();
        if let Some(ids) = among {
            filters.push(self.rows_of(q.kind, ids));
        }
        match &f.owner {
            OwnerScope::All => {}
            OwnerScope::Mine => filters.push(self.union_of(&self.by_person, [user])),
            OwnerScope::Users(us) => filters.push(self.union_of(&self.by_person, us.iter().map(String::as_str))),
            OwnerScope::Team => filters.push(self.union_of(&self.by_person, self.team_members(user))),
            OwnerScope::Unassigned => filters.push(self.unassigned.clone()),
        }
        if let Some(a) = &f.assignees {
            filters.push(self.union_of(&self.by_assignee, a.iter().map(String::as_str)));
        }
        if let (Some(s), CardKind::Contact) = (&f.source, q.kind) {
            filters.push(self.union_of(&self.by_source, [s.as_str()]));
        }
        if f.bulk_only {
            filters.push(self.bulk.clone());
        }
        let term = f.search.as_deref().map(board_model::text::fold);
        if let (Some(t), Some(by_gram)) = (&term, &self.by_gram) {
            let grams = trigrams([t.as_str()]);
            if !grams.is_empty() {
                let step = grams.len().div_ceil(MAX_GRAMS);
                for g in grams.iter().step_by(step) {
                    filters.push(by_gram.get(g).cloned().unwrap_or_default());
                }
            }
        }
        let passing = Passing::of(filters, f.message_status, &self.answered);
        let quiet = f.quiet_for.map(|d| now - d);
        // Filters checked card by card (times, the literal search).
        let per_row = f.created.is_some() || quiet.is_some() || f.messaged_in.is_some() || term.is_some();
        let mut out = Vec::with_capacity(plan.buckets.len());
        for b in &plan.buckets {
            if Instant::now() >= deadline {
                return Err(IndexError::Deadline);
            }
            let mut stages = self.stage_numbers(&plan.raw_keys(b));
            stages.sort_unstable();
            stages.dedup();
            let stage_rows = || stages.iter().filter_map(|s| self.by_stage.get(&(q.kind, *s)));
            if !per_row {
                // Every filter is in the bitmaps: the total is counted stage by stage (a card is
                // in one raw stage), and the page is found by walking the bucket's stages in
                // board order; the candidates are never materialized (a broad filter, team, made
                // that most of a board's CPU).
                let total = stage_rows().map(|rows| passing.count_in(rows)).sum();
                let ids = self.walk(q.kind, &stages, &passing, b.offset as usize, b.limit as usize, deadline)?;
                out.push(IndexBucket { total, ids });
                continue;
            }
            let mut cand = RoaringBitmap::new();
            for rows in stage_rows() {
                cand |= rows;
            }
            passing.keep_in(&mut cand);
            let mut hits: Vec<Place> = Vec::new();
            for (n, row) in cand.iter().enumerate() {
                if n % 4096 == 4095 && Instant::now() >= deadline {
                    return Err(IndexError::Deadline);
                }
                let r = self.row(row);
                let created = (r.created != NO_TIME).then_some(r.created);
                if let Some(c) = f.created {
                    if !created.is_some_and(|t| c.contains(t)) {
                        continue;
                    }
                }
                let times = self.times.get(r.message_times);
                if quiet.is_some_and(|since| !quiet_since(times, since)) {
                    continue;
                }
                if f.messaged_in.is_some_and(|m| !has_message_between(times, m.start, m.end)) {
                    continue;
                }
                if let Some(t) = &term {
                    if !self.texts_of(r).any(|x| x.contains(t.as_str())) {
                        continue;
                    }
                }
                hits.push(r.place());
            }
            let total = hits.len() as u64;
            let want = (b.offset + b.limit) as usize;
            // In board order; only the first `want` matter.
            if hits.len() > want && want > 0 {
                hits.select_nth_unstable(want - 1);
                hits.truncate(want);
            }
            hits.sort_unstable();
            let ids = hits.into_iter().skip(b.offset as usize).take(b.limit as usize).map(|p| (p.0).0 .1.to_text()).collect();
            out.push(IndexBucket { total, ids });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::request::ContactsRequest;
    use board_model::model::{CardDoc, Phone, Pipeline, Stage};
    use board_model::record::Derived;

    fn card(id: &str, stage: &str, created: i64, owner: &str, name: &str) -> CardDoc {
        CardDoc {
            id: id.into(),
            org_id: "o".into(),
            first_name: Some(name.into()),
            phone_numbers: Some(vec![Phone { value: Some("+49 171 555".into()), kind: None }]),
            owner: Some(owner.into()),
            pipeline_id: Some("p".into()),
            pipeline_stage: Some(stage.into()),
            created_at: Some(created),
            version: Some(1),
            ..Default::default()
        }
    }

    fn board(body: &str, index: &OrgIndex) -> Vec<IndexBucket> {
        board_among(body, index, None)
    }

    fn board_among(body: &str, index: &OrgIndex, among: Option<&[String]>) -> Vec<IndexBucket> {
        let pipelines = vec![Pipeline {
            id: "p".into(),
            org_id: "o".into(),
            kind: Some("Contact".into()),
            is_active: Some(true),
            stages: Some(vec![Stage { id: "s1".into(), name: Some("New".into()), order: Some(0) }]),
            ..Default::default()
        }];
        let q = ContactsRequest::parse(body.as_bytes()).unwrap().into_query().unwrap();
        let plan = crate::query::board::plan(&pipelines, &q).unwrap();
        index.answer(&plan, &q, ("u1", 1_000), among, Instant::now() + std::time::Duration::from_secs(5)).unwrap()
    }

    #[test]
    fn filters_order_pages_and_updates_with_and_without_trigram_postings() {
        for gram_min_rows in [0, GRAM_MIN_ROWS] {
            let ix = filters_order_pages_and_updates(OrgIndex::new("0-0".into()).with_gram_min_rows(gram_min_rows));
            assert_eq!(ix.has_grams(), gram_min_rows == 0);
        }
    }

    fn filters_order_pages_and_updates(mut ix: OrgIndex) -> OrgIndex {
        ix.put(CardKind::Contact, "c1", Some(&CardRecord::live(&card("c1", "s1", 10, "u1", "Jane"), Derived::default())));
        ix.put(CardKind::Contact, "c2", Some(&CardRecord::live(&card("c2", "s1", 20, "u2", "Janet"), Derived::default())));
        ix.put(
            CardKind::Contact,
            "c3",
            Some(&CardRecord::live(&card("c3", "s1", 20, "u2", "Bob"), Derived { assignees: vec!["u1".into()], message_times: vec![900] })),
        );
        let all = board("{}", &ix);
        assert_eq!((all[0].total, all[0].ids.clone()), (3, vec!["c3".to_string(), "c2".into(), "c1".into()]));
        assert_eq!(board(r#"{"ownerFilter": "my"}"#, &ix)[0].ids, ["c3", "c1"]);
        assert_eq!(board(r#"{"search": "JAN"}"#, &ix)[0].ids, ["c2", "c1"]);
        assert_eq!(board(r#"{"search": "t"}"#, &ix)[0].ids, ["c2"]);
        assert_eq!(board(r#"{"search": "171 5"}"#, &ix)[0].total, 3);
        assert_eq!(board(r#"{"messageStatus": "answered"}"#, &ix)[0].ids, ["c3"]);
        assert_eq!(board(r#"{"lastMessageTimeRange": {"value": 1, "unit": "hours"}}"#, &ix)[0].total, 2, "c3 wrote 100 ms ago");
        assert_eq!(board(r#"{"size": 1, "page": {"New": 2}}"#, &ix)[0].ids, ["c2"]);
        // Among given ids (MongoDB's custom-field matches): unknown ids are no cards, and the
        // other filters still apply.
        let among: Vec<String> = ["c1", "c3", "nope"].map(String::from).to_vec();
        let b = &board_among("{}", &ix, Some(&among))[0];
        assert_eq!((b.total, b.ids.clone()), (2, vec!["c3".to_string(), "c1".into()]));
        assert_eq!(board_among(r#"{"search": "jan"}"#, &ix, Some(&among))[0].ids, ["c1"]);
        assert_eq!(board_among("{}", &ix, Some(&[]))[0].total, 0);
        // An update moves the row; a delete takes it out.
        ix.put(CardKind::Contact, "c1", Some(&CardRecord::live(&card("c1", "s1", 10, "u2", "Zed"), Derived::default())));
        assert_eq!(board(r#"{"ownerFilter": "my"}"#, &ix)[0].ids, ["c3"]);
        assert_eq!(board(r#"{"search": "jan"}"#, &ix)[0].ids, ["c2"]);
        ix.put(CardKind::Contact, "c2", Some(&CardRecord::tombstone(2)));
        assert_eq!(board("{}", &ix)[0].total, 2);
        assert_eq!(ix.len(), 2);
        ix
    }

    /// An org large enough to cut its trigrams on several threads gets the postings one pass
    /// over its rows makes.
    #[test]
    fn trigrams_cut_on_several_threads_are_those_of_one_pass() {
        let rows = PARALLEL_GRAM_ROWS + 7;
        let mut ix = OrgIndex::new("0-0".into());
        ix.start_load(rows);
        for n in 0..rows {
            let (id, name) = (format!("c{n}"), format!("Zoë {}", n * 7919 % 100_003));
            ix.put(CardKind::Contact, &id, Some(&CardRecord::live(&card(&id, "s1", n as i64, "u1", &name), Derived::default())));
        }
        ix.finish_load();
        let one_pass: HashMap<Trigram, RoaringBitmap> = ix.grams_of_rows(0, ix.rows.len()).into_iter().collect();
        assert!(one_pass.len() > 1_000);
        assert!(ix.by_gram.as_ref() == Some(&one_pass));
    }

    #[test]
    fn an_image_answers_as_its_index_and_takes_changes_after() {
        let bodies = [
            "{}",
            r#"{"ownerFilter": "my"}"#,
            r#"{"search": "ze"}"#,
            r#"{"search": "zed"}"#,
            r#"{"search": "171 5"}"#,
            r#"{"messageStatus": "answered"}"#,
            r#"{"size": 1, "page": {"New": 2}}"#,
        ];
        for gram_min_rows in [0, GRAM_MIN_ROWS] {
            let ix = filters_order_pages_and_updates(OrgIndex::new("0-0".into()).with_gram_min_rows(gram_min_rows));
            let mut copy = OrgIndex::from_image(&ix.to_image()).unwrap();
            assert_eq!((copy.len(), copy.has_grams()), (ix.len(), ix.has_grams()));
            // Read at their lengths: no more than the index held.
            assert!(copy.bytes() <= ix.bytes());
            for body in bodies {
                assert_eq!(board(body, &copy), board(body, &ix), "{body}");
            }
            // The copy's slot table finds its rows: a card put again replaces its row, a deleted
            // one goes.
            copy.put(CardKind::Contact, "c3", Some(&CardRecord::tombstone(2)));
            copy.put(CardKind::Contact, "c1", Some(&CardRecord::live(&card("c1", "s1", 10, "u1", "Jana"), Derived::default())));
            assert_eq!(copy.len(), 1);
            assert_eq!(board("{}", &copy)[0].ids, ["c1"]);
            assert_eq!(board(r#"{"search": "jana"}"#, &copy)[0].ids, ["c1"]);
            assert_eq!(board(r#"{"ownerFilter": "my"}"#, &copy)[0].ids, ["c1"]);
        }
    }
}
